"""Full UNets that replace the base model's: Hyper-SD's one-step UNet.

The official release ships ``Hyper-SDXL-1step-Unet.safetensors`` (a UNet state dict
loaded into the base model's UNet config) beside the LoRAs; ours is saved in diffusers'
own UNet format (a folder with config.json). Both load here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hypersd_core.paths import DIGITS_DIR

DIGITS_ONESTEP_UNET = DIGITS_DIR / "hypersd-unet"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def is_unet_source(path: str | Path) -> bool:
    """True for a diffusers UNet folder or a UNet ``.safetensors`` state dict (not a LoRA)."""
    path = Path(path)
    if path.is_dir():
        return (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHT_NAMES)
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        return bool(keys) and not any("lora" in k for k in keys) and any(
            k.startswith(("conv_in.", "down_blocks.")) for k in keys)
    return False


def load_unet(source: str | Path, base_unet, device=None, dtype: torch.dtype | None = None):
    """A full UNet from a diffusers UNet folder, or a state-dict file in ``base_unet``'s
    config (the official one-step UNet file). Same device and dtype as the base unless given."""
    from diffusers import UNet2DConditionModel

    path = Path(source)
    device = device or base_unet.device
    dtype = dtype or base_unet.dtype
    if path.is_dir():
        if not is_unet_source(path):
            raise FileNotFoundError(f"{path} is not a diffusers UNet folder (config.json + "
                                    f"{WEIGHT_NAMES[0]})")
        unet = UNet2DConditionModel.from_pretrained(path, dtype=dtype)
    elif path.is_file():
        from safetensors.torch import load_file

        unet = UNet2DConditionModel.from_config(base_unet.config)
        state = load_file(str(path))
        missing, unexpected = unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not fit this model's UNet: {len(missing)} missing, "
                             f"{len(unexpected)} unexpected keys (e.g. "
                             f"{(missing or unexpected)[0]!r})")
    else:
        raise FileNotFoundError(f"no UNet at {path}")
    for key in ("block_out_channels", "cross_attention_dim", "in_channels"):
        got, want = getattr(unet.config, key), getattr(base_unet.config, key)
        if (tuple(got) if isinstance(got, (list, tuple)) else got) != \
                (tuple(want) if isinstance(want, (list, tuple)) else want):
            raise ValueError(f"{path}: UNet {key} {got} does not match the base model's {want}")
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_unet(unet, out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save in diffusers' UNet format (``UNet2DConditionModel.from_pretrained`` loads it)."""
    out = Path(out)
    orig = unet.dtype
    unet.to(dtype).save_pretrained(out, safe_serialization=True)
    unet.to(orig)
    return out
