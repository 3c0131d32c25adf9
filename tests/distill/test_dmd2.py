"""DMD as DMD2 does it: critic_steps fake-score updates per generator optimizer step
whatever the gradient accumulation, the classifier head on the fake score's bottleneck
(its shape as DMD2's), and the generator's GAN loss reaching the student only."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image_folder

from hypersd_core.distill.dmd_gan import ClassifierHead, bottleneck_size, cls_d_loss, cls_g_loss
from hypersd_core.training.config import make_config
from hypersd_core.training.runs import Run
from hypersd_core.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("dmd2data"), 4)


def _cfg(model, data, **kw):
    values = {"model": str(model), "data": str(data), "stage": "dmd", "steps": 4,
              "batch_size": 2, "log_every": 1, "sample_every": 100, "checkpoint_every": 100,
              "lora_rank": 4, "lora_alpha": 4, "fake_rank": 2, "dmd_cls_weight": 0.01,
              "dmd_gan_weight": 0.001, "sample_prompts": ["a red handwritten digit 1"], **kw}
    return make_config(values)


def test_cls_losses_closed_form():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -2.0])
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(cls_d_loss(real, fake), torch.stack([2 * sp(torch.tensor(0.0)),
                                                                    2 * sp(torch.tensor(-2.0))]))
    torch.testing.assert_close(cls_g_loss(fake), sp(-fake))


@pytest.mark.parametrize("size, strided", [(8, 1), (32, 3), (4, 0)])
def test_classifier_head_is_dmd2s_branch(size, strided):
    """SD1.5 (8x8 bottleneck): one stride-2 4x4 conv to 4x4, a 4x4/4 conv to 1x1, a 1x1
    conv (sd_guidance.py:125-133); SDXL (32x32): three stride-2 convs first; digits: 4x4."""
    head = ClassifierHead(64, size)
    convs = [m for m in head.net if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2] * strided + [4, 1]
    assert [c.kernel_size[0] for c in convs] == [4] * (strided + 1) + [1]
    assert head(torch.randn(3, 64, size, size)).shape == (3,)


def test_bottleneck_size_of_the_unets(tiny_sd15):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    assert bottleneck_size(unet) == unet.config.sample_size // 2  # one downsampling block


def test_critic_updates_per_optimizer_step_under_accumulation(tiny_sd15, data_dir, tmp_path):
    """grad_accum 3, critic_steps 2, 4 steps: 4 fake-score updates (one per optimizer
    step, not 12), the generator on steps 2 and 4; the classifier trains with it."""
    run = Run.create(tmp_path / "acc", _cfg(tiny_sd15, data_dir, grad_accum=3, critic_steps=2))
    assert train(run.dir)["state"] == "done"
    records = [r for r in run.read_metrics()[0] if "loss" in r]
    assert [r["critic_updates"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "loss_dmd" in r] == [2, 4]
    assert [r["step"] for r in records if "loss_gan_g" in r] == [2, 4]
    assert all("loss_cls" in r and 0 <= r["cls_acc_real"] <= 1 for r in records)


def test_gan_loss_reaches_the_student_not_the_guidance(tiny_sd15, data_dir):
    from hypersd_core.distill.dmd import DMDStage
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.training.data import DataOptions, make_data
    from hypersd_core.training.trainer import setup_student

    cfg = _cfg(tiny_sd15, data_dir, critic_steps=1, dmd_weight=0.0, dmd_gan_weight=1.0)
    backbone = load_backbone(str(tiny_sd15))
    params = setup_student(backbone, cfg)
    stage = DMDStage(cfg, backbone)
    stage.setup(params)
    batch = make_data(backbone, cfg.data, DataOptions.from_config(cfg)).sample(
        2, torch.Generator().manual_seed(0))
    stage.begin_step(0)
    loss, logs = stage.loss(batch, torch.Generator().manual_seed(0))
    assert "loss_gan_g" in logs and "loss_dmd" not in logs
    guidance = [p.grad.clone() if p.grad is not None else None for p in stage.guidance_params]
    assert any(g is not None and g.abs().sum() > 0 for g in guidance)  # the critic's own loss
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    for p, before in zip(stage.guidance_params, guidance):  # untouched by the generator loss
        assert (p.grad is None and before is None) or torch.equal(p.grad, before)
    assert stage.after_step(0)["critic_updates"] == 1


def test_schedule_period_of_each_stage():
    from hypersd_core.training.config import load_preset
    from hypersd_core.training.trainer import schedule_period

    assert schedule_period(load_preset("digits-dmd")) == load_preset("digits-dmd").critic_steps
    assert schedule_period(load_preset("digits-tscd-k1")) == 2  # PCM: D, then G
    assert schedule_period(load_preset("digits-tscd-k1", {"adv_schedule": "joint"})) == 1
    assert schedule_period(load_preset("digits-tscd-k8")) == 1
