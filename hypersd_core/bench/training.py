"""Training-step benchmarks: each stage type against one plain student step.

The unit is one plain LoRA-student step on the same batch: epsilon-prediction MSE,
forward + backward + gradient clip + AdamW update. Each stage step is timed the way
the trainer runs it (``stage.loss`` then the same backward/clip/update, plus the
stage's own per-step updates), interleaved with plain steps so machine load hits
both alike. Every stage gets a freshly loaded backbone, so no adapter or hook of
one stage is left on the UNet of the next.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import torch

from hypersd_core.bench.measure import PeakMemory, summarise, time_call
from hypersd_core.distill import schedule as S

# stage type -> (preset, overrides): the digits presets' settings, used for every model
STAGE_PRESETS: dict[str, tuple[str, dict]] = {
    "tscd": ("digits-tscd-k8", {"adv_weight": 0.0}),
    "tscd+adv": ("digits-tscd-k1", {"adv_weight": 0.2}),
    "lcm": ("digits-lcm", {}),
    "tcd": ("digits-tcd", {}),
    "feedback": ("digits-feedback", {}),
    "dmd": ("digits-dmd", {}),  # a generator step: fake-score update + generator update
    "dmd-critic": ("digits-dmd", {}),  # a critic-only step (critic_steps - 1 of every critic_steps)
}


def stage_config(stage: str, backbone, batch_size: int):
    """The stage's config for benchmarking; returns (config, notes)."""
    from hypersd_core.training.config import load_preset
    from hypersd_core.training.trainer import SEPARATE_INIT_STAGES

    if stage not in STAGE_PRESETS:
        raise ValueError(f"unknown stage type {stage!r}; choose from {', '.join(STAGE_PRESETS)}")
    preset, overrides = STAGE_PRESETS[stage]
    values = {"batch_size": batch_size, **overrides}
    notes = []
    cfg = load_preset(preset, values)
    if cfg.init_adapter and not Path(cfg.init_adapter).exists():
        notes.append(f"init adapter {cfg.init_adapter} absent: started from scratch")
        values["init_adapter"] = ""
    elif cfg.init_adapter and backbone.kind != cfg.model:
        notes.append(f"init adapter belongs to the {cfg.model} model: started from scratch")
        values["init_adapter"] = ""
    elif cfg.init_adapter and stage not in SEPARATE_INIT_STAGES:
        values["init_adapter"] = ""  # the starting weights do not change the step's cost
    if backbone.kind != "digits" and cfg.perceptual_weight > 0:
        notes.append("no ground-truth masks outside the digits world: perceptual_weight=0")
        values["perceptual_weight"] = 0.0
    own = [r for r in cfg.rewards if r.startswith("digits-")]
    if backbone.kind != "digits" and own:  # they read 32x32 digits images
        # the stage keeps a reward term: a loadable one here, swapped by StepRunner for the
        # stand-in that reads the decoded image at 224^2 (the cost of a CLIP-sized reward)
        notes.append(f"digits-world rewards {own} replaced by a stand-in for a "
                     f"{backbone.kind} model")
        values["rewards"] = {"digits-quality": 1e-3}
        values["reward_alphas"] = {}
    return load_preset(preset, values), notes


def make_batch(backbone, batch_size: int, seed: int = 0):
    """A training batch: the digits training split, or random latents with digits
    captions (tiny test models and real models without a dataset)."""
    from hypersd_core.training.data import Batch, make_data

    g = torch.Generator().manual_seed(seed)
    if backbone.kind == "digits":
        return make_data(backbone, "digits").sample(batch_size, g)
    from hypersd_core.bench.measure import bench_prompts

    res = backbone.resolution
    f = backbone.pipe.vae_scale_factor
    prompts = bench_prompts("digits", batch_size)
    latents = torch.randn(batch_size, backbone.unet.config.in_channels, res // f, res // f,
                          generator=g).to(backbone.device)
    images = (torch.rand(batch_size, 3, res, res, generator=g) * 2 - 1).to(backbone.device)
    return Batch(latents, backbone.encode_prompt(prompts),
                 backbone.encode_prompt(prompts, negative=True), prompts, images)


class StepRunner:
    """One stage (or the plain student) on a fresh backbone, stepped like the trainer."""

    def __init__(self, model: str, stage: str | None, batch_size: int, device: str):
        from hypersd_core.models.backbone import load_backbone
        from hypersd_core.training.trainer import make_stage, setup_student

        self.backbone = load_backbone(model, device=device)
        self.notes: list[str] = []
        name = stage or "tscd"
        self.cfg, self.notes = stage_config(name, self.backbone, batch_size)
        torch.manual_seed(0)
        self.params = setup_student(self.backbone, self.cfg)
        self.stage = None
        if stage is not None:
            self.stage = make_stage(self.cfg, self.backbone)
            if hasattr(self.stage, "setup"):
                self.params = self.stage.setup(self.params)
            if self.backbone.kind != "digits":
                from hypersd_core.bench.gpu_train import use_stand_in_rewards

                use_stand_in_rewards(self.stage)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-6)
        self.kind = stage
        self.ac = self.backbone.alphas_cumprod.to(self.backbone.device).float()

    def _update(self, loss: torch.Tensor | None) -> None:
        if loss is not None:
            loss.float().mean().backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def plain_step(self, batch, seed: int = 0) -> None:
        """The unit: the student's epsilon-MSE forward + backward + update."""
        g = torch.Generator().manual_seed(seed)
        x0 = batch.latents
        t = torch.randint(0, self.backbone.num_train_timesteps, (x0.shape[0],), generator=g)
        t = t.to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        x_t = S.add_noise(x0, noise, S.alpha_bar(self.ac, t))
        out = self.backbone.unet(x_t, t, **batch.embeds.unet_kwargs()).sample
        self._update((out.float() - noise).square().flatten(1).mean(1))

    def stage_step(self, batch, seed: int = 0) -> None:
        """One trainer step of the stage (DMD: a generator step, or a critic-only step; the
        adversarial term: a generator step, odd in PCM's alternation, whose discriminator
        steps cost less: no student backward)."""
        stage = self.stage
        step = {"dmd": self.cfg.critic_steps - 1, "dmd-critic": 0}.get(self.kind, 1)
        if hasattr(stage, "begin_step"):
            stage.begin_step(step)
        loss, _ = stage.loss(batch, torch.Generator().manual_seed(seed))
        self._update(loss)
        if hasattr(stage, "after_step"):
            stage.after_step(step)


def _interleaved(runner: StepRunner, batch, repeats: int, warmup: int) -> tuple[dict, dict]:
    """Median times of plain and stage steps, alternating which goes first."""
    device = runner.backbone.device
    for i in range(warmup):
        runner.plain_step(batch, i)
        runner.stage_step(batch, i)
    plain, stage = [], []
    for i in range(repeats):
        pair = [(runner.plain_step, plain), (runner.stage_step, stage)]
        for fn, bucket in (pair if i % 2 == 0 else pair[::-1]):
            bucket.append(time_call(lambda: fn(batch, 100 + i), device))  # noqa: B023
    return summarise(plain), summarise(stage)


def bench_training(model: str, plan, device: str, log=print) -> list[dict]:
    """Per stage type: step time / plain step time, samples/s and peak memory."""
    rows = []
    batch = None
    for stage in plan.stages:
        try:
            runner = StepRunner(model, stage, plan.train_batch, device)
        except (ImportError, FileNotFoundError) as err:
            rows.append({"stage": stage, "skipped": f"{type(err).__name__}: {err}"})
            log(f"  {stage}: skipped ({err})")
            continue
        if stage == "dmd-critic" and runner.cfg.critic_steps < 2:
            rows.append({"stage": stage, "skipped": "critic_steps < 2: every step is a generator step"})
            continue
        if batch is None:
            batch = make_batch(runner.backbone, plan.train_batch)
        plain, step = _interleaved(runner, batch, plan.train_repeats, plan.warmup)
        with PeakMemory(runner.backbone.device) as mem:
            runner.stage_step(batch, 999)
        row = {"stage": stage, "batch": plan.train_batch, "step": step, "plain": plain,
               "ratio": step["median_s"] / plain["median_s"],
               "samples_per_s": plan.train_batch / step["median_s"],
               "memory": mem.as_dict(), "notes": runner.notes,
               "settings": _settings(runner.cfg, stage)}
        rows.append(row)
        log(f"  {stage:>10}: {1000 * step['median_s']:8.1f} ms/step = {row['ratio']:.2f} x plain "
            f"({1000 * plain['median_s']:.1f} ms), {row['samples_per_s']:.0f} samples/s, "
            f"peak {row['memory']['peak_mb']:.0f} MB")
        del runner
    return rows


def _settings(cfg, stage: str) -> dict:
    keys = {"tscd": ("k", "adv_weight"), "tscd+adv": ("k", "adv_weight"), "lcm": (), "tcd": (),
            "feedback": ("rewards", "perceptual_weight", "feedback_steps_range", "init_adapter"),
            "dmd": ("critic_steps", "mse_weight", "perceptual_weight", "rewards"),
            "dmd-critic": ("critic_steps",)}[stage]
    d = dataclasses.asdict(cfg)
    return {"lora_rank": cfg.lora_rank, **{k: d[k] for k in keys}}


def bench_training_scaling(model: str, plan, device: str, log=print) -> list[dict]:
    """TSCD (no adversarial term) and plain step times against batch size."""
    if "tscd" not in plan.stages:
        return []
    runner = StepRunner(model, "tscd", plan.train_batch, device)
    rows = []
    for bs in plan.train_batches:
        batch = make_batch(runner.backbone, bs, seed=bs)
        plain, step = _interleaved(runner, batch, max(1, plan.train_repeats - 1), plan.warmup)
        rows.append({"batch": bs, "tscd": step, "plain": plain,
                     "tscd_samples_per_s": bs / step["median_s"],
                     "plain_samples_per_s": bs / plain["median_s"],
                     "ratio": step["median_s"] / plain["median_s"]})
        log(f"  training batch {bs:>3}: TSCD {bs / step['median_s']:8.1f} samples/s, "
            f"plain {bs / plain['median_s']:8.1f} samples/s")
    return rows


def median_ratio(rows: list[dict]) -> float:
    """Median TSCD/plain ratio over the scaling rows (a steadier figure than one batch)."""
    return statistics.median(r["ratio"] for r in rows)
