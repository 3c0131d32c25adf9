"""The student's optimizer: AdamW, or bitsandbytes' 8-bit AdamW (``optimizer: adamw8bit``),
which keeps both moment buffers in 8 bits (a quarter of fp32 AdamW's state memory)."""

from __future__ import annotations

import importlib.util

import torch

OPTIMIZERS = ("adamw", "adamw8bit")


def have_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def make_optimizer(cfg, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params`` with the config's lr and weight decay."""
    if cfg.optimizer == "adamw8bit":
        if not have_bitsandbytes():
            raise ValueError("optimizer=adamw8bit needs bitsandbytes "
                             "(pip install bitsandbytes==0.50.2); or use optimizer=adamw")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
