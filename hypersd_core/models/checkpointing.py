"""Gradient checkpointing that recomputes under the LoRA state of the forward pass.

Non-reentrant checkpointing recomputes a block during backward with the module as it is
*then*. A forward run with adapters disabled (the teacher inside the discriminator,
with gradients flowing to the student's sample) would be recomputed with the student's
LoRA on: different tensors, and torch raises "Recomputed values ... have different
metadata". This checkpoint function records each LoRA layer's on/off state and active
adapters at forward time and restores them around the recomputation.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils.checkpoint import checkpoint

_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lora_layers(module: torch.nn.Module) -> list:
    layers = _LAYERS.get(module)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
        _LAYERS[module] = layers
    return layers


@contextlib.contextmanager
def _lora_state(layers: list, state: list):
    now = [(m._disable_adapters, m._active_adapter) for m in layers]
    for m, (off, active) in zip(layers, state):
        m._disable_adapters, m._active_adapter = off, active
    try:
        yield
    finally:
        for m, (off, active) in zip(layers, now):
            m._disable_adapters, m._active_adapter = off, active


def adapter_aware_checkpoint(module, *args, **kwargs):
    """``torch.utils.checkpoint`` (non-reentrant) for diffusers' ``enable_gradient_checkpointing``."""
    layers = _lora_layers(module) if isinstance(module, torch.nn.Module) else []
    if not layers:
        return checkpoint(module, *args, use_reentrant=False, **kwargs)
    state = [(m._disable_adapters, m._active_adapter) for m in layers]
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _lora_state(layers, state)),
                      **kwargs)
