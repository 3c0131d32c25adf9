"""Several named LoRAs on one base pipeline, switched in about a millisecond.

Each file is loaded once through diffusers (so every key layout diffusers knows, and
our kohya fix, applies), its UNet tensors are kept, and the PEFT adapter is shared:
LoRAs with the same layout (layers and ranks) use one resident "slot" whose weights are
overwritten on a switch. Only slots stay in the UNet, so adapters that are loaded but
not in use cost nothing per call, and a switch touches no base weight.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from hypersd_core.models.lora import check_lora_file, check_lora_fits, read_lora_state


def _lora_layers(unet) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}


class AdapterSet:
    """Named LoRAs on ``pipe``: ``load`` once, ``use`` to switch (None = the base model)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.loaded: dict[str, Path] = {}
        self.active: str | None = None
        self.last_switch_s = 0.0
        self.fused = False
        self._weights: dict[str, tuple[str, list]] = {}  # name -> (slot, [(layer, A, B, scaling)])
        self._slots: dict[tuple, str] = {}  # layout -> slot adapter name
        self._layers: dict[str, torch.nn.Module] = {}
        self._slot_in_use: str | None = None

    def load(self, name: str, path: str | Path) -> None:
        """Load a diffusers-, PEFT- or kohya-format LoRA file under ``name``."""
        if name in self.loaded:
            return
        weights = check_lora_file(path)
        state = read_lora_state(weights)
        check_lora_fits(self.pipe.unet, weights, state)  # one line naming the first layer that does not fit
        tmp = f"slot{len(self._slots)}"
        if state is None:
            self.pipe.load_lora_weights(str(weights.parent), weight_name=weights.name,
                                        adapter_name=tmp)
        else:
            self.pipe.load_lora_weights(state, adapter_name=tmp)
        self._layers = _lora_layers(self.pipe.unet)
        entries, layout = [], []
        for module_name, layer in self._layers.items():
            if tmp in layer.lora_A:
                a, b = layer.lora_A[tmp].weight, layer.lora_B[tmp].weight
                entries.append((module_name, a.detach().clone(), b.detach().clone(),
                                layer.scaling[tmp]))
                layout.append((module_name, tuple(a.shape), tuple(b.shape)))
        if not entries:
            self.pipe.delete_adapters(tmp)
            raise ValueError(f"{weights}: none of its LoRA layers matches this model's UNet")
        key = tuple(layout)
        if key in self._slots:
            self.pipe.delete_adapters(tmp)
            slot = self._slots[key]
        else:
            slot = self._slots[key] = tmp
        self._weights[name] = (slot, entries)
        self.loaded[name] = weights
        self.active, self._slot_in_use = "?", "?"  # loading changed the active adapter

    def unload(self, name: str) -> None:
        """Forget an adapter (its slot stays resident for others of the same layout)."""
        self.loaded.pop(name, None)
        self._weights.pop(name, None)
        if self.active == name:
            self.active = "?"

    @torch.no_grad()
    def use(self, name: str | None, scale: float = 1.0) -> float:
        """Activate one adapter (None = the base model); return the switch time in seconds."""
        t0 = time.perf_counter()
        if self.fused:
            raise RuntimeError("an adapter is fused into the base weights; call unfuse() first")
        if name != self.active:
            if name is None:
                for layer in self._layers.values():
                    layer._disable_adapters = True
                self._slot_in_use = None
            else:
                if name not in self._weights:
                    raise KeyError(f"adapter {name!r} is not loaded (loaded: {list(self.loaded)})")
                slot, entries = self._weights[name]
                for module_name, a, b, scaling in entries:
                    layer = self._layers[module_name]
                    layer.lora_A[slot].weight.copy_(a)
                    layer.lora_B[slot].weight.copy_(b)
                    layer.scaling[slot] = scaling * scale
                if self._slot_in_use != slot:
                    for layer in self._layers.values():
                        if slot in layer.lora_A:
                            layer.set_adapter(slot)
                            layer._disable_adapters = False
                        else:
                            layer._disable_adapters = True
                    self._slot_in_use = slot
            self.active = name
        self.last_switch_s = time.perf_counter() - t0
        return self.last_switch_s

    def fuse(self, scale: float = 1.0) -> None:
        """Fuse the active adapter into the base weights (faster calls, no switching)."""
        if self.active in (None, "?"):
            raise RuntimeError("no adapter is active: use(name) before fuse()")
        slot, _ = self._weights[self.active]
        self.pipe.fuse_lora(adapter_names=[slot], lora_scale=scale)
        self.fused = True

    def unfuse(self) -> None:
        self.pipe.unfuse_lora()
        self.fused = False
