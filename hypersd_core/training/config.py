"""Stage configuration: one typed dataclass, YAML presets merged with ``key=value``
overrides, validated with clear messages before any model loads."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hypersd_core import safe_yaml
from hypersd_core.paths import PRESETS

RUN_NAME = re.compile(r"(?!\.)[A-Za-z0-9_.-]{1,64}")  # a run folder's label: never a path

STAGES = ("tscd", "lcm", "tcd", "feedback", "dmd")
PERCEPTUAL_BACKENDS = ("digits", "maskrcnn", "solo")
TSCD_CHAIN = (8, 4, 2, 1)
NUM_TIMESTEPS = 1000  # the training schedule every supported model uses (T)
MAX_SEED = 2**32 - 1
FROZEN_DTYPES = ("auto", "fp32", "fp16", "bf16")


class ConfigError(ValueError):
    """An invalid stage config; ``errors`` lists every problem, one line each."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid stage config: " + "; ".join(self.errors))


@dataclass
class StageConfig:
    """Every setting of a training stage; the paper leaves most of these open."""

    stage: str = "tscd"
    model: str = "digits"
    name: str = ""  # adapter name when exported (e.g. hypersd-k4)
    init_adapter: str = ""  # LoRA the student starts from (previous stage's final/)
    # "digits", an image folder (metadata.jsonl), a datasets save_to_disk folder, .parquet /
    # .arrow file or glob, hf:OWNER/NAME, webdataset .tar shards (glob or {000..099}), or a
    # cache-data folder (cache.json): see training/data.py
    data: str = "digits"
    data_image_column: str = "image"  # datasets column; webdataset: the image extension (default jpg/png/webp)
    data_caption_column: str = "text"  # datasets column; webdataset: .json key (a .txt caption is always read)
    data_split: str = "train"  # datasets split (hub ids and DatasetDict folders)
    data_streaming: bool = False  # stream a datasets source instead of loading / memory-mapping it
    data_shuffle_buffer: int = 1000  # encoded samples held to shuffle a streamed source (datasets, webdataset)
    data_shuffle_buffer_mb: float = 256.0  # ... and at most this many MB of them per process
    data_workers: int = -1  # DataLoader processes that read + decode; -1: auto (training/loader.py)
    data_prefetch: int = 2  # batches each data worker prepares ahead
    data_buckets: bool = False  # image folders: aspect-ratio buckets (batches share a bucket)
    # TSCD / consistency
    k: int = 8
    num_solver_steps: int = 40
    t_end: str = "uniform"  # "uniform" (Algorithm 1) or "edge"
    w_min: float = 2.0
    w_max: float = 4.0
    distance: str = "mse"  # "mse" or "huber"
    huber_c: float = 0.001
    offset_noise: float = 0.0
    target: str = "online"  # "online" (no_grad student) or "ema"
    ema_decay: float = 0.95
    adv_weight: float = 0.0
    adv_lr: float = 1e-5
    adv_hidden: int = 0  # width of the discriminator heads; 0: the feature map's channels (PCM)
    adv_heads: int = 4  # heads per teacher feature map (PCM: 4 on each of 9 maps)
    adv_real: str = "target"  # "target": the target's edge jump re-noised (PCM); "data": latents
    adv_schedule: str = "alternate"  # "alternate": D on even steps, G on odd (PCM); "joint": both every step
    adv_dynamic: bool = False  # scale the adversarial term by VQGAN's last-layer grad-norm ratio
    adv_dynamic_max: float = 10.0  # clamp of that ratio
    adv_renoise_span: int = 0  # real/fake re-noised to t' in [edge, edge + span); 0: T/k
    loss_scale: str = "none"  # "none" (edge space) or "x0": divide by the clamped d x_edge / d x0 squared
    loss_scale_min: float = 0.01  # clamp of that squared weight
    # LoRA and optimisation
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # "adamw" or "adamw8bit" (bitsandbytes: 8-bit moments)
    warmup_steps: int = 20
    grad_clip: float = 1.0
    batch_size: int = 32
    grad_accum: int = 1
    steps: int = 500
    mixed_precision: str = "no"  # "no", "fp16" (CUDA, loss-scaled), "bf16" (autocast)
    frozen_dtype: str = "auto"  # frozen UNet/VAE/text weights: "auto" (CUDA: as mixed_precision; CPU: fp32), fp32, fp16, bf16
    gradient_checkpointing: str = "auto"  # "auto" (on with CUDA), "on", "off"; UNet, and VAE for feedback/DMD
    seed: int = 0
    max_nonfinite: int = 5
    cpu_threads: int = 0  # CPU runs: 0 = cores // live training runs (training/threads.py), or a count
    # feedback (ReFL) and perceptual losses
    rewards: dict[str, float] = field(default_factory=dict)  # reward name -> weight
    reward_alpha: float = 1.0
    reward_alphas: dict[str, float] = field(default_factory=dict)  # per-reward alpha (overrides)
    perceptual_weight: float = 0.0
    perceptual_backend: str = "digits"
    feedback_steps_range: tuple[int, int] = (1, 1)  # ReFL: sampling steps N ~ U{lo..hi}; grad on the last
    perceptual_t_range: tuple[int, int] = (250, 750)  # real images are noised to t in this range
    merge_scale: float = 1.0
    # DMD
    dmd_weight: float = 1.0
    dmd_real_guidance: float = 4.0
    fake_lr: float = 1e-4
    critic_steps: int = 5  # fake-score optimizer steps per generator optimizer step (DMD2 TTUR)
    dmd_cls_weight: float = 0.0  # DMD2's classifier on the fake score's bottleneck (guidance_cls_loss_weight)
    dmd_gan_weight: float = 0.0  # the generator's GAN loss through that classifier (gen_cls_loss_weight)
    dmd_cls_t_max: int = 0  # classifier inputs noised to t ~ U[0, t_max) (DMD2 diffusion_gan); 0: clean
    dmd_cls_lr: float = 0.0  # the classifier head's learning rate; 0: fake_lr (DMD2's one rate)
    mse_weight: float = 0.0
    one_step_t: int = 999
    fake_rank: int = 16  # LoRA rank of the fake score (its alpha = rank)
    multistep_prob: float = 0.0  # share of generator samples started at a later TCD timestep
    multistep_max: int = 8  # ... drawn from the TCD timesteps of 2..multistep_max steps
    # bookkeeping
    log_every: int = 10
    sample_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    reward_every: int = 0  # score the fixed samples with the rewards every N steps (0: off)
    sample_prompts: list[str] = field(default_factory=lambda: [
        "a red handwritten digit 7", "a green handwritten digit 3",
        "a blue handwritten digit 0", "a yellow handwritten digit 5"])
    sample_steps: int = 0  # 0: the stage's own (k for TSCD, 4 for LCM/TCD, 1 for DMD)
    report_to: str = "none"  # tracker beside metrics.jsonl: none, tensorboard, wandb, trackio
    lora_ema_decay: float = 0.0  # > 0: keep an EMA of the student's LoRA, exported as final_ema/

    def validate(self) -> StageConfig:
        """Raise ValueError naming every bad field; return self."""
        errors = _type_errors(self)
        if errors:  # the range checks below compare numbers
            raise ConfigError(errors)

        def need(cond: bool, msg: str):
            if not cond:
                errors.append(msg)

        need(self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}")
        need(not self.name or RUN_NAME.fullmatch(self.name) is not None,
             f"name must be letters, digits, '-', '_' or '.' (at most 64, no path), "
             f"got {self.name[:80]!r}")
        need(self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.w_min <= self.w_max, f"w_min ({self.w_min}) must be <= w_max ({self.w_max})")
        need(self.w_min >= 0, f"w_min must be >= 0, got {self.w_min}")
        need(self.t_end in ("uniform", "edge"), f"t_end must be 'uniform' or 'edge', got {self.t_end!r}")
        need(self.distance in ("mse", "huber"), f"distance must be 'mse' or 'huber', got {self.distance!r}")
        need(self.target in ("online", "ema"), f"target must be 'online' or 'ema', got {self.target!r}")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(self.adv_weight >= 0, f"adv_weight must be >= 0, got {self.adv_weight}")
        need(self.adv_real in ("target", "data"),
             f"adv_real must be 'target' or 'data', got {self.adv_real!r}")
        need(self.adv_schedule in ("alternate", "joint"),
             f"adv_schedule must be 'alternate' or 'joint', got {self.adv_schedule!r}")
        need(self.adv_hidden >= 0 and self.adv_heads >= 1,
             f"adv_hidden must be >= 0 and adv_heads >= 1, got {self.adv_hidden}, {self.adv_heads}")
        need(self.adv_dynamic_max > 0, f"adv_dynamic_max must be > 0, got {self.adv_dynamic_max}")
        need(0 <= self.adv_renoise_span <= 1000,
             f"adv_renoise_span must be in [0, 1000], got {self.adv_renoise_span}")
        need(self.loss_scale in ("none", "x0"), f"loss_scale must be 'none' or 'x0', got {self.loss_scale!r}")
        need(0 < self.loss_scale_min <= 1, f"loss_scale_min must be in (0, 1], got {self.loss_scale_min}")
        need(self.mixed_precision in ("no", "fp16", "bf16"),
             f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        need(self.frozen_dtype in FROZEN_DTYPES,
             f"frozen_dtype must be one of {FROZEN_DTYPES}, got {self.frozen_dtype!r}")
        need(self.frozen_dtype not in ("fp16", "bf16") or self.mixed_precision != "no",
             f"frozen_dtype={self.frozen_dtype} needs mixed_precision=bf16 or fp16 (autocast "
             "runs the fp32 LoRA over half-precision weights)")
        need(self.gradient_checkpointing in ("auto", "on", "off"),
             f"gradient_checkpointing must be 'auto', 'on' or 'off', got {self.gradient_checkpointing!r}")
        need(self.num_solver_steps >= 1 and 1000 % self.num_solver_steps == 0,
             f"num_solver_steps must divide T=1000, got {self.num_solver_steps}")
        if self.stage == "tscd":
            need(self.k in TSCD_CHAIN, f"k must be one of the TSCD chain {TSCD_CHAIN}, got {self.k}")
            if self.k in TSCD_CHAIN and self.num_solver_steps >= 1:
                spacing = 1000 // self.num_solver_steps if 1000 % self.num_solver_steps == 0 else 0
                need(spacing > 0 and 125 % spacing == 0,
                     f"num_solver_steps={self.num_solver_steps} does not divide the segments: "
                     "its spacing T/N must divide T/8 = 125 so every edge is on the grid "
                     "(e.g. N=40 or N=8)")
        need(all(v >= 0 for v in self.rewards.values()), "reward weights must be >= 0")
        from hypersd_core.rewards.base import available_rewards

        known = [n for n in available_rewards() if not n.endswith("perception")]
        for name in self.rewards:
            need(name in known, f"unknown reward {name!r} in rewards; known: {', '.join(known)}"
                 + (" (perception losses go through perceptual_weight)"
                    if name.endswith("perception") else ""))
        unused = sorted(set(self.reward_alphas) - set(self.rewards))
        need(not unused, f"reward_alphas names rewards not in rewards: {unused}")
        need(self.perceptual_weight >= 0, f"perceptual_weight must be >= 0, got {self.perceptual_weight}")
        need(self.perceptual_backend in PERCEPTUAL_BACKENDS,
             f"perceptual_backend must be one of {PERCEPTUAL_BACKENDS}, got {self.perceptual_backend!r}")
        for key in ("feedback_steps_range", "perceptual_t_range"):
            lo_hi = getattr(self, key)
            need(len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1],
                 f"{key} must be [lo, hi] with 0 <= lo <= hi, got {list(lo_hi)}")
        need(len(self.feedback_steps_range) != 2 or self.feedback_steps_range[0] >= 1,
             f"feedback_steps_range must start at >= 1 step, got {list(self.feedback_steps_range)}")
        need(len(self.perceptual_t_range) != 2 or self.perceptual_t_range[1] < 1000,
             f"perceptual_t_range must lie in [0, 1000), got {list(self.perceptual_t_range)}")
        need(self.stage != "feedback" or any(w > 0 for w in self.rewards.values())
             or self.perceptual_weight > 0,
             "the feedback stage needs rewards with a weight > 0 (e.g. {digits-quality: 1.0}) "
             "or perceptual_weight > 0")
        need(self.fake_rank >= 1, f"fake_rank must be >= 1, got {self.fake_rank}")
        need(self.fake_lr > 0, f"fake_lr must be > 0, got {self.fake_lr}")
        need(self.dmd_weight >= 0 and self.mse_weight >= 0,
             f"dmd_weight and mse_weight must be >= 0, got {self.dmd_weight}, {self.mse_weight}")
        need(self.dmd_real_guidance >= 1, f"dmd_real_guidance must be >= 1 (CFG scale), got "
             f"{self.dmd_real_guidance}")
        need(0 <= self.multistep_prob <= 1, f"multistep_prob must be in [0, 1], got {self.multistep_prob}")
        need(self.multistep_max >= 2, f"multistep_max must be >= 2, got {self.multistep_max}")
        need(self.merge_scale >= 0, f"merge_scale must be >= 0, got {self.merge_scale}")
        need(self.critic_steps >= 1, f"critic_steps must be >= 1, got {self.critic_steps}")
        need(self.dmd_cls_weight >= 0 and self.dmd_gan_weight >= 0,
             f"dmd_cls_weight and dmd_gan_weight must be >= 0, got {self.dmd_cls_weight}, "
             f"{self.dmd_gan_weight}")
        need(self.dmd_gan_weight == 0 or self.dmd_cls_weight > 0,
             "dmd_gan_weight > 0 needs dmd_cls_weight > 0 (the generator's GAN loss goes "
             "through the classifier that dmd_cls_weight trains)")
        need(0 <= self.dmd_cls_t_max <= 1000 and self.dmd_cls_lr >= 0,
             f"dmd_cls_t_max must be in [0, 1000] and dmd_cls_lr >= 0, got {self.dmd_cls_t_max}, "
             f"{self.dmd_cls_lr}")
        need(0 < self.one_step_t < 1000, f"one_step_t must be in (0, 1000), got {self.one_step_t}")
        for key in ("log_every", "sample_every", "checkpoint_every"):
            need(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.data_shuffle_buffer >= 1, f"data_shuffle_buffer must be >= 1, got {self.data_shuffle_buffer}")
        need(self.data_shuffle_buffer_mb > 0,
             f"data_shuffle_buffer_mb must be > 0, got {self.data_shuffle_buffer_mb}")
        need(self.data_workers >= -1, f"data_workers must be >= -1 (-1: auto), got {self.data_workers}")
        need(self.data_prefetch >= 1, f"data_prefetch must be >= 1, got {self.data_prefetch}")
        from hypersd_core.training.optimizers import OPTIMIZERS, have_bitsandbytes

        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.optimizer != "adamw8bit" or have_bitsandbytes(),
             "optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes==0.50.2)")
        need(bool(self.data_image_column and self.data_caption_column and self.data_split),
             "data_image_column, data_caption_column and data_split must not be empty")
        for key in ("adv_lr", "fake_lr"):
            need(getattr(self, key) > 0, f"{key} must be > 0, got {getattr(self, key)}")
        need(self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.cpu_threads >= 0, f"cpu_threads must be >= 0 (0: share the cores), got {self.cpu_threads}")
        need(self.max_nonfinite >= 1, f"max_nonfinite must be >= 1, got {self.max_nonfinite}")
        need(0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        need(0 <= self.sample_steps <= NUM_TIMESTEPS,
             f"sample_steps must be in [0, {NUM_TIMESTEPS}] (0: the stage's own), got {self.sample_steps}")
        need(self.num_solver_steps <= NUM_TIMESTEPS,
             f"num_solver_steps must be <= {NUM_TIMESTEPS}, got {self.num_solver_steps}")
        need(len(self.feedback_steps_range) != 2 or self.feedback_steps_range[1] <= NUM_TIMESTEPS,
             f"feedback_steps_range must stay within {NUM_TIMESTEPS} steps, got {list(self.feedback_steps_range)}")
        need(bool(self.sample_prompts) and all(p.strip() for p in self.sample_prompts),
             "sample_prompts must be a non-empty list of non-empty prompts "
             f"(the fixed sample grid), got {self.sample_prompts!r}")
        from hypersd_core.training.trackers import TRACKERS, tracker_missing

        need(self.report_to in TRACKERS, f"report_to must be one of {TRACKERS}, got {self.report_to!r}")
        missing = tracker_missing(self.report_to) if self.report_to in TRACKERS else ""
        need(not missing, missing)
        need(0 <= self.lora_ema_decay < 1,
             f"lora_ema_decay must be in [0, 1) (0: no EMA export), got {self.lora_ema_decay}")
        if errors:
            raise ConfigError(errors)
        return self

    @property
    def default_sample_steps(self) -> int:
        if self.sample_steps:
            return self.sample_steps
        return {"tscd": self.k, "dmd": 1, "feedback": 1}.get(self.stage, 4)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


_FIELDS = {f.name: f for f in dataclasses.fields(StageConfig)}


def _is_number(value, hint) -> bool:
    if isinstance(value, bool):  # True is an int to Python, never a step count or a rate
        return False
    return isinstance(value, int) if hint is int else isinstance(value, (int, float))


def _type_errors(cfg: StageConfig) -> list[str]:
    """Numbers that are booleans, not numbers, or not finite (nan, inf)."""
    errors = []
    for key, hint in typing.get_type_hints(StageConfig).items():
        value = getattr(cfg, key)
        origin = typing.get_origin(hint)
        if hint in (int, float):
            items = [value]
        elif origin is dict:
            items, hint = list(value.values()) if isinstance(value, dict) else [value], float
        elif origin is tuple:
            items, hint = list(value) if isinstance(value, (list, tuple)) else [value], int
        else:
            continue
        for v in items:
            if not _is_number(v, hint):
                errors.append(f"{key} must be {'an integer' if hint is int else 'a number'}, got {v!r}")
                break
            if not math.isfinite(v):
                errors.append(f"{key} must be finite, got {v!r}")
                break
    return errors


def _coerce(key: str, value):
    """Turn a YAML/CLI value into the field's type, with a clear error."""
    hint = typing.get_type_hints(StageConfig)[key]
    origin = typing.get_origin(hint)
    try:
        if isinstance(value, str) and hint is not str:
            value = safe_yaml.load(value, key)
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint in (int, float) and isinstance(value, bool):
            raise TypeError  # `steps: true` is not 1
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise TypeError
            if hint is str and not isinstance(value, str):
                raise TypeError
            return hint(value)
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            if any(isinstance(v, bool) for v in value.values()):
                raise TypeError
            return {str(k): float(v) for k, v in value.items()}
        if origin is list:
            if not isinstance(value, list):
                raise TypeError
            return [str(v) for v in value]
        if origin is tuple:
            if isinstance(value, (str, bool)) or any(isinstance(v, bool) for v in value):
                raise TypeError
            return tuple(int(v) for v in value)
    except (TypeError, ValueError, yaml.YAMLError):
        pass
    else:
        return value
    raise ValueError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def make_config(values: dict) -> StageConfig:
    """StageConfig from a dict; unknown keys, wrong types and bad values are errors.

    Raises ConfigError listing every problem at once: a key of the wrong type is left at
    its default while the others are range-checked, and checks that would only restate
    that key's problem are left out.
    """
    if not isinstance(values, dict):
        raise ValueError(f"a stage config is a mapping of settings (key: value), "
                         f"got a {type(values).__name__}: {str(values)[:60]!r}")
    errors, bad, good = [], [], {}
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        errors.append(f"unknown config keys {unknown}; known: {sorted(_FIELDS)}")
    for key, value in values.items():
        if key not in _FIELDS:
            continue
        try:
            good[key] = _coerce(key, value)
        except ValueError as err:
            errors.append(str(err))
            bad.append(key)
    cfg = StageConfig(**good)
    try:
        cfg.validate()
    except ConfigError as err:
        errors += [e for e in err.errors
                   if not any(re.search(rf"\b{k}\b", e) for k in bad)]
    if errors:
        raise ConfigError(errors)
    return cfg


def preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
    return path


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_preset(name: str, overrides: list[str] | dict | None = None) -> StageConfig:
    """A preset (name in assets/presets or a YAML path) with ``key=value`` overrides."""
    values = read_yaml_mapping(preset_path(name))
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"--set expects key=value, got {item!r}")
            key, value = item.split("=", 1)
            values[key.strip()] = value
    return make_config(values)


def load_config_file(path: str | Path) -> StageConfig:
    return make_config(read_yaml_mapping(path))


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file that must hold a mapping; errors are one line with the file and line."""
    path = Path(path)
    try:
        values = safe_yaml.load(path.read_text(), str(path))
    except safe_yaml.YAMLBoundsError:
        raise
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text (YAML) file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings (key: value lines), "
                         f"got a {type(values).__name__}: {str(values)[:60]!r}")
    return values


def save_config(cfg: StageConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
