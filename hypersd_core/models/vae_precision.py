"""The SDXL VAE in fp32 under fp16 weights, as the stock SDXL pipeline upcasts it.

Its activations overflow fp16 into NaN latents and images (config ``force_upcast``);
the fp16-fix VAE sets force_upcast false and stays fp16. bf16 needs no upcast.
"""

from __future__ import annotations

import contextlib

import torch


def keep_vae_fp32(pipe, dtype: torch.dtype) -> None:
    """Under fp16 weights an SDXL pipeline's force_upcast VAE stays fp32 (its inputs
    are cast to fp32 on the way in, so the stock pipeline's decode works too)."""
    if not (dtype == torch.float16 and "XL" in type(pipe).__name__
            and getattr(pipe.vae.config, "force_upcast", False)):
        return
    vae = pipe.vae.to(torch.float32)
    first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
    first.register_forward_pre_hook(
        lambda module, args: (args[0].to(torch.float32), *args[1:]))


def first_parameter(module: torch.nn.Module) -> torch.Tensor:
    """A module's first parameter, for its device and dtype: diffusers' ``.device`` and
    ``.dtype`` walk every submodule looking for offloading hooks (about 6 ms a call on the
    tiny test UNet, several times per training step)."""
    return next(module.parameters())


def vae_precision(vae):
    """No fp16 autocast around an fp32 force_upcast VAE (autocast would undo the upcast)."""
    weight = first_parameter(vae)
    device = weight.device.type
    if (weight.dtype == torch.float32 and getattr(vae.config, "force_upcast", False)
            and torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device) == torch.float16):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()
