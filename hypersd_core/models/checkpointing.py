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


class _LoraState:
    """Puts LoRA layers in a recorded on/off + active-adapter state, and back on exit.

    A class, not a generator context manager: torch keeps the recompute context that
    ``context_fn`` returned and enters it again at every backward through the block (several
    per step when ``autograd.grad`` is called with ``retain_graph``, as the adversarial
    term's dynamic weighting does), and a generator-based manager can be entered only once.
    """

    def __init__(self, layers: list, state: list):
        self.layers, self.state, self.saved = layers, state, []

    def __enter__(self):
        self.saved.append([(m._disable_adapters, m._active_adapter) for m in self.layers])
        for m, (off, active) in zip(self.layers, self.state):
            m._disable_adapters, m._active_adapter = off, active
        return self

    def __exit__(self, *exc):
        for m, (off, active) in zip(self.layers, self.saved.pop()):
            m._disable_adapters, m._active_adapter = off, active
        return False


def adapter_aware_checkpoint(module, *args, **kwargs):
    """``torch.utils.checkpoint`` (non-reentrant) for diffusers' ``enable_gradient_checkpointing``."""
    layers = _lora_layers(module) if isinstance(module, torch.nn.Module) else []
    if not layers:
        return checkpoint(module, *args, use_reentrant=False, **kwargs)
    state = [(m._disable_adapters, m._active_adapter) for m in layers]
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _LoraState(layers, state)),
                      **kwargs)
