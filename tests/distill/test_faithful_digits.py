"""Short digits runs of the faithful stages (a few CPU minutes each): PCM's discriminator
and DMD2's classifier learn, judged on held-out batches they never trained on."""

from __future__ import annotations

import pytest
import torch

from hypersd_core.paths import DIGITS_ADAPTERS, DIGITS_PIPELINE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

HELD_OUT_SEEDS = (10_001, 10_002, 10_003, 10_004)


def _need_world():
    if not (DIGITS_PIPELINE / "model_index.json").is_file():
        pytest.skip("the digits world is not built")


def _train(preset: str, init: str, steps: int, **overrides):
    """(stage, data): ``steps`` trainer steps of ``preset`` in this process."""
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.training.config import load_preset
    from hypersd_core.training.data import DigitsData
    from hypersd_core.training.trainer import make_stage, setup_student

    cfg = load_preset(preset, {"init_adapter": str(DIGITS_ADAPTERS / init / "pytorch_lora_weights.safetensors"),
                               **overrides})
    backbone = load_backbone("digits")
    torch.manual_seed(0)
    params = setup_student(backbone, cfg)
    stage = make_stage(cfg, backbone)
    params = stage.setup(params)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    data = DigitsData(backbone)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        stage.begin_step(step)
        loss, _ = stage.loss(data.sample(cfg.batch_size, g), g)
        if loss is not None:
            loss.mean().backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        stage.after_step(step)
    return stage, data, cfg


def _held_out(check, data, batch_size):
    logs = [check(data.sample(batch_size, torch.Generator().manual_seed(s)),
                  torch.Generator().manual_seed(s)) for s in HELD_OUT_SEEDS]
    return {k: sum(d[k] for d in logs) / len(logs) for k in logs[0] if not k.startswith("adv_d_edge")}


# Known and open: in this short run PCM's discriminator does not get past chance on
# held-out batches. Measured (docs/protocol.md, "What this run shows"): with real = the
# target's jump it holds hinge 2.00 after 40 and after 200 D steps (real and fake are the
# same network's jumps one teacher step apart), against 1.97 / 1.89 with real = data.
# DMD2's classifier check passes from the protocol-v2 k=1 adapter (held-out accuracy 0.41
# -> 0.56, loss 1.433 -> 1.378); from the previous k=1 adapter it stayed at chance.
# strict: when the discriminator learns, the test passes, the xfail fails, the mark comes off.
NOT_YET = pytest.mark.xfail(strict=True, reason="does not learn past chance in a short run yet")


@NOT_YET
def test_pcm_discriminator_learns_on_held_out_digits():
    """k=1 from the k=2 adapter, 80 steps (40 D steps): on held-out batches the per-pixel
    hinge is below chance (2) and real and fake pixels are told apart (accuracy > 0.5)."""
    _need_world()
    stage, data, cfg = _train("digits-tscd-k1", "hypersd-k2", 80, batch_size=16)
    m = _held_out(stage.discriminator_check, data, cfg.batch_size)
    acc = (m["adv_acc_real"] + m["adv_acc_fake"]) / 2
    print(f"held-out PCM discriminator after 80 steps: {m}")
    assert m["loss_adv_d"] < 1.9 and acc > 0.55, m


def test_dmd2_classifier_learns_on_held_out_digits():
    """DMD2 reward-free from the k=1 adapter, 60 steps (60 classifier updates at the
    preset's head rate) on clean inputs (DMD2's cls_on_clean_image without diffusion_gan;
    the presets noise them, which needs a longer run): on held-out data against fresh
    generator samples its accuracy rises above chance."""
    _need_world()
    kw = {"batch_size": 8, "dmd_cls_t_max": 0}
    stage, data, cfg = _train("digits-dmd-nofb", "hypersd-k1", 0, **kw)
    before = _held_out(stage.classifier_check, data, cfg.batch_size)
    stage, data, cfg = _train("digits-dmd-nofb", "hypersd-k1", 60, **kw)
    after = _held_out(stage.classifier_check, data, cfg.batch_size)
    acc = (after["cls_acc_real"] + after["cls_acc_fake"]) / 2
    acc0 = (before["cls_acc_real"] + before["cls_acc_fake"]) / 2
    print(f"held-out DMD2 classifier: before {before}, after 60 steps {after}")
    assert acc > 0.55 and acc > acc0 and after["loss_cls"] < before["loss_cls"], (before, after)
