"""ControlNet: load one (the digits ControlNet, a local folder or a hub id), prepare the
control image, and wrap a base pipeline in the stock ControlNet pipeline class.

Hyper-SD's adapters are UNet LoRAs; a ControlNet trained on the base model adds its
residuals to that UNet unchanged, so every recipe runs with a control image through
``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline`` built
from the very same modules (no copy of any weight).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hypersd_core.paths import DIGITS_DIR

DIGITS_CONTROLNET = DIGITS_DIR / "controlnet"
CONFIG_NAME = "config.json"


class ControlNetNotFoundError(FileNotFoundError):
    """A ControlNet that is neither on disk nor obtainable from the hub."""


def _resolve(source: str | Path) -> str:
    """'digits', a folder with config.json, or a hub id -> what from_pretrained takes."""
    if str(source) == "digits":
        if not (DIGITS_CONTROLNET / CONFIG_NAME).is_file():
            raise ControlNetNotFoundError(
                f"the digits ControlNet is missing from {DIGITS_CONTROLNET}; rebuild it with "
                "`python -m hypersd_core build-controlnet`")
        return str(DIGITS_CONTROLNET)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / CONFIG_NAME).is_file():
            raise ControlNetNotFoundError(
                f"{source} is not a diffusers ControlNet folder (no {CONFIG_NAME})")
        return str(path)
    if "/" not in str(source):
        raise ControlNetNotFoundError(
            f"ControlNet {source!r} is neither a folder nor a hub id (owner/name)")
    return str(source)


def load_controlnet(source: str | Path = "digits", device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32):
    """A ``ControlNetModel`` from 'digits', a local folder or a hub id (offline: cache only)."""
    from diffusers import ControlNetModel

    resolved = _resolve(source)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        model = ControlNetModel.from_pretrained(resolved, dtype=dtype,
                                                local_files_only=offline)
    except (OSError, ValueError) as err:
        if Path(resolved).exists():
            raise
        raise ControlNetNotFoundError(
            f"ControlNet {source!r} could not be loaded from the Hugging Face hub "
            f"({type(err).__name__}); download it on a connected machine and pass the folder"
        ) from None
    return model.to(device).eval().requires_grad_(False)


def check_compatible(controlnet, unet) -> None:
    """Raise ValueError when the ControlNet's residuals cannot be added to ``unet``."""
    cn, un = controlnet.config, unet.config
    problems = []
    if tuple(cn.block_out_channels) != tuple(un.block_out_channels):
        problems.append(f"block_out_channels {tuple(cn.block_out_channels)} vs "
                        f"{tuple(un.block_out_channels)}")
    if cn.cross_attention_dim != un.cross_attention_dim:
        problems.append(f"cross_attention_dim {cn.cross_attention_dim} vs {un.cross_attention_dim}")
    if problems:
        raise ValueError("this ControlNet was made for another base model: "
                         + "; ".join(problems))


def control_pipeline(pipe, controlnet):
    """The stock ControlNet pipeline over ``pipe``'s own modules (shared, not copied)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    check_compatible(controlnet, pipe.unet)
    xl = "XL" in type(pipe).__name__
    cls = StableDiffusionXLControlNetPipeline if xl else StableDiffusionControlNetPipeline
    expected, optional = cls._get_signature_keys(cls)
    parts = {k: v for k, v in pipe.components.items() if k in {*expected, *optional}}
    if not xl:
        parts.update(safety_checker=None, requires_safety_checker=False)
    out = cls(**parts, controlnet=controlnet)
    out.set_progress_bar_config(disable=True)
    return out


def mask_image(mask, size: int | None = None) -> Image.Image:
    """A control image: white ink on black, RGB, from a bool/float mask [H,W] (tensor or
    array) or an image (its brightest channel is the ink); resized to ``size`` if given."""
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("RGB"), dtype=np.float32).max(-1) / 255.0
    else:
        arr = mask.detach().cpu().float().numpy() if isinstance(mask, torch.Tensor) \
            else np.asarray(mask, dtype=np.float32)
        if arr.ndim == 3:  # [C,H,W] or [H,W,C]: brightest channel
            arr = arr.max(0) if arr.shape[0] in (1, 3, 4) else arr.max(-1)
        if arr.ndim != 2:
            raise ValueError(f"a control mask must be 2-D [H, W], got shape {arr.shape}")
        if arr.max(initial=0) > 1.0:
            arr = arr / 255.0
    image = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), "L")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return image.convert("RGB")


def sketch_to_mask(image, size: int, threshold: float = 0.25) -> Image.Image:
    """A drawing (any colours on a background, RGBA allowed) -> a binary control image.

    The ink is whatever differs from the background (the most common corner colour);
    on a transparent canvas the opacity is the ink. Raises ValueError on an empty drawing.
    """
    if isinstance(image, dict):  # gradio ImageEditor value
        image = image.get("composite")
    if image is None:
        raise ValueError("draw a digit or pick a held-out mask first")
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image).astype(np.uint8))
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    corners = np.stack([rgb[0, 0], rgb[0, -1], rgb[-1, 0], rgb[-1, -1]])
    background = np.median(corners, axis=0)
    ink = np.abs(rgb - background).max(-1) * alpha
    if alpha.min() < 0.99:  # strokes on a transparent canvas: the opacity is the ink
        ink = alpha
    small = np.asarray(Image.fromarray((ink * 255).astype(np.uint8), "L")
                       .resize((size, size), Image.BOX), dtype=np.float32) / 255.0
    mask = small > threshold * small.max(initial=0) if small.max(initial=0) > 0.05 else None
    if mask is None or not mask.any():
        raise ValueError("the drawing is empty: draw a digit (strokes on the canvas)")
    return mask_image(mask.astype(np.float32))
