"""Backbones: one shape for the digits world, SD1.5 and SDXL.

A ``Backbone`` wraps a stock diffusers pipeline (so sampling equals what diffusers
gives) and exposes what trainers need: prompt encoding (with the unconditional
embeddings each model expects), VAE encode/decode, the noise schedule and the
prediction type.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hypersd_core.models.vae_precision import first_parameter, keep_vae_fp32, vae_precision
from hypersd_core.paths import DIGITS_ADAPTERS, DIGITS_PIPELINE, SCENES_ADAPTERS, SCENES_PIPELINE

KINDS = ("digits", "scenes", "sd15", "sdxl")
WORLDS = {"digits": (DIGITS_PIPELINE, "build-digits"),  # pipeline, the command that builds it
          "scenes": (SCENES_PIPELINE, "build-scenes")}


def shipped_adapters(kind: str) -> Path | None:
    """The folder of a world's shipped adapters (read at call time, so it can be redirected)."""
    return {"digits": DIGITS_ADAPTERS, "scenes": SCENES_ADAPTERS}.get(kind)


def _quiet_libraries() -> None:
    """Loading bars of diffusers/transformers add nothing to our own progress output."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
DEFAULT_GUIDANCE = {"sd15": 7.5, "sdxl": 7.5, "digits": 2.0, "scenes": 3.0}


class ModelNotFoundError(FileNotFoundError):
    """A model that is neither on disk nor obtainable from the hub."""


def detect_kind(folder: str | Path) -> str:
    """Kind of a diffusers pipeline folder from its ``model_index.json``."""
    index_path = Path(folder) / "model_index.json"
    if not index_path.is_file():
        raise ModelNotFoundError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_path.read_text())
    if index.get("_hypersd", {}).get("kind") in KINDS:
        return index["_hypersd"]["kind"]
    cls = index.get("_class_name", "")
    if "XL" in cls:
        return "sdxl"
    if cls.startswith("StableDiffusion"):
        return "sd15"
    raise ValueError(f"{folder}: unsupported pipeline class {cls!r}; expected SD1.5 or SDXL")


def _resolve(model: str) -> tuple[str, Path | None]:
    """(source, local folder or None for a hub id)."""
    if model in WORLDS:
        pipeline, command = WORLDS[model]
        if not (pipeline / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"the {model} world is missing from assets/{model}/pipeline; "
                f"build it with `python -m hypersd_core {command}`")
        return str(pipeline), pipeline
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{model} is a file but not a .safetensors checkpoint; pass a diffusers "
                "pipeline folder, an SD1.5 / SDXL single-file .safetensors or a hub id")
        return str(path), path
    if path.suffix.lower() in (".safetensors", ".ckpt"):
        raise ModelNotFoundError(f"no checkpoint file {model}")
    return model, None


WEIGHT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


def has_variant(folder: Path, variant: str) -> bool:
    """True when every weight folder of a pipeline holds ``*.{variant}.safetensors``."""
    present = [folder / f for f in WEIGHT_FOLDERS if (folder / f / "config.json").is_file()]
    return bool(present) and all(any(p.glob(f"*.{variant}.safetensors")) for p in present)


def _download(repo_id: str, variant: str | None = None) -> tuple[Path, str | None]:
    """(snapshot folder, variant used): with ``variant`` ("fp16") only the variant's
    weights are fetched when the repository has them for every component (SDXL base:
    about 7 GB instead of 14); otherwise the plain weights."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if variant is not None:
        try:
            folder = Path(snapshot_download(
                repo_id, local_files_only=offline,
                allow_patterns=["model_index.json", "*/*.json", "*/*.txt", "*/*.model",
                                f"*/*.{variant}.safetensors"]))
            if has_variant(folder, variant):
                return folder, variant
        except Exception:  # no such variant, or not cached: the plain weights below
            pass
    try:
        return Path(snapshot_download(
            repo_id, local_files_only=offline,
            # only the pipeline's component folders: a root single-file checkpoint
            # (e.g. sd_xl_base_1.0.safetensors) would add 7-14 GB per model
            allow_patterns=["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors",
                            "*/*.model"],
            ignore_patterns=["*.fp16.safetensors", "*non_ema*", "*.ckpt"])), None
    except Exception as err:  # hub errors are many and long: say one thing instead
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the "
            f"Hugging Face hub ({type(err).__name__}). Download it on a connected machine "
            f"(`huggingface-cli download {repo_id} --local-dir models/{repo_id.split('/')[-1]}`) "
            "and pass that folder instead") from None


@dataclass
class PromptEmbeds:
    """Conditioning for the UNet: hidden states plus SDXL's pooled embeds and time ids."""

    hidden: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor | None = None  # [B, D2] (SDXL)
    time_ids: torch.Tensor | None = None  # [B, 6] (SDXL)

    def unet_kwargs(self) -> dict:
        kw: dict = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw

    def index(self, idx) -> PromptEmbeds:
        return PromptEmbeds(self.hidden[idx],
                            None if self.pooled is None else self.pooled[idx],
                            None if self.time_ids is None else self.time_ids[idx])

    def cat(self, other: PromptEmbeds) -> PromptEmbeds:
        """Stack two batches (e.g. conditional and unconditional) along the batch axis."""
        def join(a, b):
            return None if a is None else torch.cat([a, b])
        return PromptEmbeds(join(self.hidden, other.hidden), join(self.pooled, other.pooled),
                            join(self.time_ids, other.time_ids))

    def where(self, mask: torch.Tensor, other: PromptEmbeds) -> PromptEmbeds:
        """Per-sample choice: ``other`` where mask is True (CFG dropout)."""
        def pick(a, b, m):
            return None if a is None else torch.where(m.view(-1, *[1] * (a.dim() - 1)), b, a)
        return PromptEmbeds(pick(self.hidden, other.hidden, mask),
                            pick(self.pooled, other.pooled, mask),
                            pick(self.time_ids, other.time_ids, mask))


@dataclass
class Backbone:
    """A loaded base model: the stock pipeline plus what trainers and samplers need."""

    kind: str
    source: str
    pipe: object
    guidance_scale: float
    adapter_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return first_parameter(self.pipe.unet).device  # not unet.device: see first_parameter

    @property
    def dtype(self) -> torch.dtype:
        return first_parameter(self.pipe.unet).dtype

    @property
    def resolution(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    @property
    def num_train_timesteps(self) -> int:
        return self.pipe.scheduler.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.prediction_type

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """[T] float64 cumulative alphas of the training noise schedule."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config).alphas_cumprod.double()

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative: bool = False) -> PromptEmbeds:
        """Embeddings of ``prompts``; ``negative=True`` gives the unconditional ones
        the model expects (empty-prompt embeds; zeros for SDXL, as its pipeline does)."""
        pipe, device = self.pipe, self.device
        if self.kind == "sdxl":
            cond, uncond, pooled, pooled_u = pipe.encode_prompt(
                prompts, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=negative)
            hidden, pooled = (uncond, pooled_u) if negative else (cond, pooled)
            res = self.resolution
            time_ids = pipe._get_add_time_ids(
                (res, res), (0, 0), (res, res), dtype=hidden.dtype,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            return PromptEmbeds(hidden, pooled, time_ids.to(device).repeat(len(prompts), 1))
        if negative:
            prompts = [""] * len(prompts)
        cond, _ = pipe.encode_prompt(prompts, device, 1, False)
        return PromptEmbeds(cond)

    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> scaled latents [B,4,H/f,W/f] (posterior mean)."""
        vae = self.vae
        weight = first_parameter(vae)
        with vae_precision(vae):
            latents = vae.encode(images.to(weight.device, weight.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B,3,H,W] in [-1,1] (differentiable)."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with vae_precision(vae):
            return vae.decode(latents.to(first_parameter(vae).dtype) / vae.config.scaling_factor
                              + shift).sample

    def adapter_path(self, name: str) -> Path:
        """Folder of a named adapter shipped with this backbone (digits)."""
        if name not in self.adapter_dirs:
            known = ", ".join(sorted(self.adapter_dirs)) or "none"
            raise FileNotFoundError(
                f"no adapter named {name!r} for model {self.source} (known: {known}); "
                "pass a LoRA file with --lora")
        return self.adapter_dirs[name]


def load_backbone(model: str = "digits", kind: str | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Backbone:
    """Load ``digits``, a local diffusers folder, a single-file checkpoint or a hub id.

    Args:
        model: "digits", a pipeline folder, an SD1.5 / SDXL ``.safetensors`` single file
            (A1111 / ComfyUI layout; architecture from assets/configs), or a hub id.
        kind: override the detected kind ("digits", "sd15", "sdxl").
        device, dtype: where the weights live; fp32 on CPU is the default.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from hypersd_core.models.single_file import is_single_file, load_single_file

    _quiet_libraries()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if model.startswith("random:"):  # full-size architecture, random weights, no download
        from hypersd_core.models import random_model

        rkind, tiny = random_model.parse_random(model)
        cfgs = random_model.load_configs(rkind)
        pipe = random_model.build_pipeline(rkind, random_model.shrink(rkind, cfgs) if tiny else cfgs,
                                           device, dtype)
        return Backbone(rkind, model, pipe, DEFAULT_GUIDANCE[rkind])
    if is_single_file(model):
        kind, pipe = load_single_file(model, kind, dtype=dtype)
        keep_vae_fp32(pipe, dtype)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return Backbone(kind, str(model), pipe, DEFAULT_GUIDANCE[kind])
    source, folder = _resolve(model)
    half = dtype == torch.float16
    variant = "fp16" if half and folder is not None and has_variant(folder, "fp16") else None
    if folder is None:  # a hub id: half precision fetches the fp16 files where there are
        folder, variant = _download(source, "fp16" if half else None)
    kind = kind or detect_kind(folder)
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    if variant is not None:
        extra["variant"] = variant
    pipe = cls.from_pretrained(folder, dtype=dtype, **extra)
    keep_vae_fp32(pipe, dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    index = json.loads((Path(folder) / "model_index.json").read_text())
    guidance = index.get("_hypersd", {}).get("guidance_scale", DEFAULT_GUIDANCE[kind])
    adapters = {}
    shipped = shipped_adapters(kind)
    if shipped is not None and shipped.is_dir():  # a world's adapters fit its every pipeline
        adapters = {p.name: p for p in sorted(shipped.iterdir())
                    if (p / "pytorch_lora_weights.safetensors").is_file()}
    return Backbone(kind, source, pipe, float(guidance), adapters)
