"""Feedback (ReFL + perceptual) and DMD stages: the pure losses against closed forms,
gradients from the differentiable rewards to the LoRA, a few steps of each stage on tiny
models and on the digits world, the merge equals both adapters, a resumed DMD run
keeps its fake score, and bad inputs fail clearly."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_image_folder

from hypersd_core.distill import dmd
from hypersd_core.distill import feedback as fb
from hypersd_core.models.lora import WEIGHT_NAME
from hypersd_core.training.config import make_config
from hypersd_core.training.runs import Run
from hypersd_core.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("fbdata"), 4)


@pytest.fixture(scope="module")
def k1_lora(tiny_sd15, tmp_path_factory):
    """A random rank-4 LoRA standing in for the TSCD k=1 adapter."""
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.lora import add_lora, save_lora

    unet = load_backbone(str(tiny_sd15)).unet
    torch.manual_seed(1)
    for p in add_lora(unet, 4, 4.0, "k1"):
        p.data.normal_(0, 0.05)
    return save_lora(unet, tmp_path_factory.mktemp("k1"), "k1")


def _cfg(model, data, **kw):
    values = {"model": str(model), "data": str(data), "steps": 2, "batch_size": 2,
              "log_every": 1, "sample_every": 2, "checkpoint_every": 2, "lora_rank": 4,
              "lora_alpha": 4, "sample_prompts": ["a red handwritten digit 1"], **kw}
    return make_config(values)


# ---------------------------------------------------------------- pure functions


def test_reward_hinge_and_weights():
    r = torch.tensor([0.2, 1.5])
    assert torch.equal(fb.reward_hinge(r, 1.0), torch.tensor([0.8, 0.0]))
    loss = fb.weighted_reward_loss({"a": r, "b": torch.tensor([1.0, 0.0])}, {"a": 2.0, "b": 0.5}, 1.0)
    assert torch.allclose(loss, torch.tensor([1.6, 0.5]))
    loss = fb.weighted_reward_loss({"a": r}, {"a": 1.0}, 1.0, {"a": 2.0})
    assert torch.allclose(loss, torch.tensor([1.8, 0.5]))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_trailing_timesteps_match_ddim(n):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(timestep_spacing="trailing")
    sched.set_timesteps(n)
    assert fb.trailing_timesteps(n).tolist() == sched.timesteps.tolist()


def test_dm_gradient_closed_form():
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    grad = dmd.dm_gradient(x, real, fake)
    assert grad.dtype == torch.float64
    for i in range(3):
        w = (x[i] - real[i]).abs().mean().double()
        assert torch.allclose(grad[i], (fake[i] - real[i]).double() / w)
    assert torch.equal(dmd.dm_gradient(x, x, fake)[0], torch.zeros_like(grad[0]))  # 0/0 -> 0
    # the surrogate's gradient is grad / numel, per sample
    xg = x.clone().requires_grad_(True)
    loss = dmd.dmd_loss(xg, grad)
    assert loss.shape == (3,)
    loss.sum().backward()
    assert torch.allclose(xg.grad.double(), grad / x[0].numel(), atol=1e-7)


def test_cfg_standard_and_fake_loss():
    c, u = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(dmd.cfg_standard(c, u, 4.0), torch.full((2, 3), 4.0))
    assert torch.equal(dmd.fake_score_loss(c, u), torch.ones(2))


def test_multistep_starts_are_tcd_timesteps():
    from diffusers import DDIMScheduler

    cfg = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    starts = dmd.multistep_start_timesteps(cfg, 4).tolist()
    assert starts == sorted({499, 679, 339, 759, 259})
    assert 999 not in dmd.multistep_start_timesteps(cfg, 8).tolist()


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("values, match", [
    ({"stage": "feedback", "rewards": {"no-such-reward": 1.0}}, "unknown reward 'no-such-reward'"),
    ({"stage": "feedback", "rewards": {"digits-perception": 1.0}}, "perceptual_weight"),
    ({"stage": "feedback"}, "feedback stage needs rewards"),
    ({"stage": "feedback", "rewards": {"digits-quality": 1.0}, "feedback_steps_range": [0, 2]},
     "feedback_steps_range"),
    ({"stage": "feedback", "rewards": {"digits-quality": 1.0}, "reward_alphas": {"aesthetic": 5}},
     "reward_alphas names rewards not in rewards"),
    ({"stage": "dmd", "fake_rank": 0}, "fake_rank must be >= 1"),
    ({"stage": "dmd", "multistep_prob": 1.5}, "multistep_prob"),
    ({"stage": "dmd", "perceptual_backend": "yolo"}, "perceptual_backend"),
])
def test_bad_configs_fail_before_any_model_loads(values, match, monkeypatch):
    import hypersd_core.models.backbone as models

    monkeypatch.setattr(models, "load_backbone", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match=match):
        make_config(values)


def test_perceptual_without_ground_truth_is_clear(tiny_sd15, data_dir, tmp_path):
    run = Run.create(tmp_path / "run", _cfg(tiny_sd15, data_dir, stage="feedback",
                                            perceptual_weight=1.0, steps=1))
    with pytest.raises(ValueError, match="ground-truth masks"):
        train(run.dir)


# ---------------------------------------------------------------- feedback


def _stage_on(backbone, cfg):
    from hypersd_core.training.trainer import make_stage, setup_student

    params = setup_student(backbone, cfg)
    stage = make_stage(cfg, backbone)
    return stage, stage.setup(params)


def test_reward_gradients_reach_the_feedback_lora(tiny_sd15, k1_lora, data_dir):
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.training.data import make_data

    cfg = _cfg(tiny_sd15, data_dir, stage="feedback", init_adapter=str(k1_lora),
               rewards={"digits-quality": 1.0, "digits-alignment": 1.0}, reward_alpha=2.0,
               feedback_steps_range=[2, 2])
    backbone = load_backbone(cfg.model)
    torch.manual_seed(0)
    stage, params = _stage_on(backbone, cfg)
    for p in params:  # a non-zero student, so grads also reach its lora_A
        p.data.normal_(0, 0.01)
    batch = make_data(backbone, cfg.data).sample(2, torch.Generator().manual_seed(0))
    loss, logs = stage.loss(batch, torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and "train_reward/digits-quality" in logs
    loss.sum().backward()
    assert all(p.grad is not None for p in params)
    assert sum(p.grad.abs().sum() for p in params) > 0
    assert all(p.grad is None and not p.requires_grad for p in stage.frozen)  # TSCD stays frozen


def test_feedback_run_merges_into_one_lora_equal_to_both(tiny_sd15, k1_lora, data_dir, tmp_path):
    from safetensors.torch import load_file

    from hypersd_core.models.backbone import load_backbone

    cfg = _cfg(tiny_sd15, data_dir, stage="feedback", init_adapter=str(k1_lora), merge_scale=0.7,
               rewards={"digits-quality": 1.0}, lr=1e-2)
    run = Run.create(tmp_path / "fb", cfg)
    assert train(run.dir)["state"] == "done"
    records, _ = run.read_metrics()
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert any("reward/digits-quality" in r for r in records)
    merged = load_file(str(run.final_dir / WEIGHT_NAME))
    assert {v.shape[0] for k, v in merged.items() if "lora_A" in k} == {8}  # 4 + 4, padded

    def unet_out(loras):  # stock diffusers loading: (name, file, scale)
        pipe = load_backbone(cfg.model).pipe
        for name, path, _ in loras:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        pipe.set_adapters([n for n, _, _ in loras], [s for _, _, s in loras])
        g = torch.Generator().manual_seed(0)
        x, e = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 8, 32, generator=g)
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=e).sample

    both = unet_out([("k1", k1_lora, 1.0), ("fb", run.dir / fb.FEEDBACK_ONLY / WEIGHT_NAME, 0.7)])
    one = unet_out([("merged", run.final_dir / WEIGHT_NAME, 1.0)])
    k1_only = unet_out([("k1", k1_lora, 1.0)])
    assert not torch.allclose(both, k1_only, atol=1e-5)  # the feedback LoRA changed something
    assert torch.allclose(both, one, atol=1e-5)


# ---------------------------------------------------------------- DMD


def test_dmd_runs_and_resume_keeps_the_fake_score(tiny_sd15, k1_lora, data_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = _cfg(tiny_sd15, data_dir, stage="dmd", init_adapter=str(k1_lora), steps=4,
               critic_steps=2, mse_weight=1.0, multistep_prob=0.5, fake_rank=2,
               rewards={"digits-quality": 0.5}, checkpoint_every=2, sample_every=4)
    straight = Run.create(tmp_path / "straight", cfg)
    assert train(straight.dir)["state"] == "done"
    records, _ = straight.read_metrics()
    gen = [r for r in records if "loss_dmd" in r]
    assert [r["step"] for r in gen] == [2, 4] and all("loss_mse" in r for r in gen)
    assert all("loss_fake" in r for r in records if "loss" in r)
    extra = torch.load(straight.checkpoints_dir / "step-0000002" / "trainer.pt", weights_only=True)
    fake = extra["stage"]["fake"]
    assert extra["stage"]["step"] == 2
    assert any(v.abs().max() > 0 for k, v in fake.items() if "lora_B" in k)  # it trained

    # a copy stopped at step 2, resumed: the same weights as the straight run
    resumed = Run(tmp_path / "resumed")
    shutil.copytree(straight.dir, resumed.dir)
    shutil.rmtree(resumed.checkpoints_dir / "step-0000004")
    shutil.rmtree(resumed.final_dir)
    assert train(resumed.dir, resume=True)["state"] == "done"
    a = load_file(str(straight.final_dir / WEIGHT_NAME))
    b = load_file(str(resumed.final_dir / WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_dmd_on_sdxl(tiny_sdxl, data_dir, tmp_path):
    cfg = _cfg(tiny_sdxl, data_dir, stage="dmd", critic_steps=1, mse_weight=0.5, fake_rank=2,
               steps=1, sample_every=1)
    run = Run.create(tmp_path / "xl", cfg)
    assert train(run.dir)["state"] == "done"
    assert any("loss_dmd" in r for r in run.read_metrics()[0])


# ---------------------------------------------------------------- digits world


@pytest.mark.slow
@pytest.mark.parametrize("stage, extra", [
    ("feedback", {"rewards": {"digits-quality": 1.0, "digits-alignment": 1.0},
                  "perceptual_weight": 0.5, "feedback_steps_range": [1, 2]}),
    ("dmd", {"rewards": {"digits-alignment": 0.5}, "perceptual_weight": 0.1, "critic_steps": 1,
             "mse_weight": 1.0, "multistep_prob": 0.5, "lora_rank": 8, "lora_alpha": 8}),
])
def test_digits_stages_run(stage, extra, tmp_path):
    from hypersd_core.paths import DIGITS_PIPELINE

    if not (DIGITS_PIPELINE / "model_index.json").is_file():
        pytest.skip("the digits world is not built")
    cfg = make_config({"model": "digits", "stage": stage, "steps": 2, "batch_size": 4,
                       "log_every": 1, "sample_every": 2, "checkpoint_every": 2, "lora_rank": 4,
                       "lora_alpha": 4, **extra})
    run = Run.create(tmp_path / stage, cfg)
    assert train(run.dir)["state"] == "done"
    records, _ = run.read_metrics()
    assert any("loss_perceptual" in r for r in records)
    scored = [r for r in records if "reward/digits-alignment" in r]
    assert scored and 0 <= scored[-1]["reward/digits-quality"] <= 1
