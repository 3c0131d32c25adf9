"""Several named LoRAs on one base pipeline, fused into the base weights for inference.

Each file is read once through diffusers' own loader (so every key layout diffusers
knows, network alphas, and our kohya fix apply), its per-layer factors (A, B, scaling)
are kept, and the UNet is returned to a plain diffusers UNet with no PEFT layers in it.
``use(name)`` then fuses that adapter into the base weights:

    W = W0 + scale * scaling * (B @ A)        (computed in float32, cast once)

from the original weights W0 kept the first time a layer is touched, and ``use(other)``
or ``use(None)`` copies W0 back before adding the next one. Every switch starts from
the kept originals, so any number of switches leaves no drift, and a call pays nothing
per layer for LoRA: the UNet is the base architecture with different numbers in it.
Stock diffusers' ``fuse_lora`` merges into the weights too but keeps the PEFT wrapper
modules (and their per-call checks) in the UNet; its ``unfuse_lora`` subtracts the delta
again, which drifts in half precision.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from hypersd_core.models.lora import check_lora_file, check_lora_fits, read_lora_state


def _peft_layers(unet) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}


class AdapterSet:
    """Named LoRAs on ``pipe``: ``load`` once, ``use`` to switch (None = the base model).

    Attributes:
        loaded: name -> file of every loaded adapter.
        active: the fused adapter (None: base weights), ``scale`` its scale.
        last_switch_s: seconds the last ``use`` took (0 when nothing changed).
    """

    def __init__(self, pipe, originals_device: str | None = None):
        self.pipe = pipe
        # where the kept base weights W0 live: "cpu" (pinned) on a GPU keeps the GPU from
        # holding the UNet twice; a switch then reads W0 over PCIe (measured in bench)
        self.originals_device = originals_device
        self.loaded: dict[str, Path] = {}
        self.active: str | None = None
        self.scale = 1.0
        self.last_switch_s = 0.0
        self._factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self._originals: dict[str, torch.Tensor] = {}  # layer -> its base weight W0
        self._fused: set[str] = set()  # layers whose weight currently holds a delta
        self._unet = None  # the UNet the originals were taken from
        self._weights: dict[str, torch.nn.Parameter] = {}

    # ------------------------------------------------------------------ loading
    def _plain_unet(self):
        """The UNet with no PEFT layers (empty leftovers are removed); loud if it holds
        someone else's adapters, which fusing would silently mix with ours."""
        unet = self.pipe.unet
        config = getattr(unet, "peft_config", None)
        if config:
            raise ValueError(f"the UNet already carries PEFT adapters {sorted(config)} (a "
                             "training student?); AdapterSet needs a plain base model")
        if config is not None or _peft_layers(unet):
            unet.unload_lora()
        return unet

    def load(self, name: str, path: str | Path) -> None:
        """Load a diffusers-, PEFT- or kohya-format LoRA file under ``name``."""
        if name in self.loaded:
            return
        weights = check_lora_file(path)
        state = read_lora_state(weights)
        pipe, unet = self.pipe, self._plain_unet()
        extra = {"unet_config": unet.config} if hasattr(pipe, "text_encoder_2") else {}
        source = state if state is not None else str(weights)
        if state is None:
            extra["weight_name"] = weights.name
            source = str(weights.parent)
        # diffusers' own reading: key conversion, network alphas and metadata, as
        # pipe.load_lora_weights would do for the UNet
        state, alphas, metadata = pipe.lora_state_dict(source, return_lora_metadata=True, **extra)
        text = sorted({k.split(".")[0] for k in state if k.startswith(("text_encoder", "lora_te"))})
        if text:
            raise ValueError(f"{weights} also holds LoRA layers for {', '.join(text)}; only "
                             "UNet LoRAs are supported (Hyper-SD, LCM and TCD LoRAs are UNet-only)")
        check_lora_fits(unet, weights, state)  # one line naming the first layer that does not fit
        tmp = "hypersd-reading"
        unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, metadata=metadata,
                               adapter_name=tmp, _pipeline=pipe)
        try:
            factors = self._read_factors(tmp, weights)
        finally:
            unet.unload_lora()  # back to a plain UNet: no wrappers, no peft_config
        self._factors[name] = factors
        self.loaded[name] = weights

    def _read_factors(self, tmp: str, weights: Path) -> dict:
        factors = {}
        for module_name, layer in _peft_layers(self.pipe.unet).items():
            if tmp not in getattr(layer, "lora_A", {}):
                continue
            if layer.use_dora.get(tmp) or getattr(layer, "fan_in_fan_out", False):
                raise ValueError(f"{weights}: DoRA / fan-in-fan-out LoRA layers are not supported")
            base = layer.get_base_layer()
            if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
                raise ValueError(f"{weights}: LoRA on a {type(base).__name__} layer "
                                 f"({module_name}) is not supported")
            # float32 [r, in*kh*kw] and [out, r] on the weight's device: W0 + s * B @ A
            # is then one addmm per layer (PEFT's conv LoRA: a k x k conv to rank r, then 1 x 1)
            a = layer.lora_A[tmp].weight.detach().flatten(1).to(base.weight.device, torch.float32)
            b = layer.lora_B[tmp].weight.detach().flatten(1).to(base.weight.device, torch.float32)
            factors[module_name] = (a.clone(), b.clone(), float(layer.scaling[tmp]))
        if not factors:
            raise ValueError(f"{weights}: none of its LoRA layers matches this model's UNet")
        return factors

    def unload(self, name: str) -> None:
        """Forget an adapter (the base weights come back first if it is fused)."""
        if self.active == name:
            self.use(None)
        self.loaded.pop(name, None)
        self._factors.pop(name, None)

    # ------------------------------------------------------------------ switching
    def _layer_weights(self, layers) -> dict[str, torch.nn.Parameter]:
        """name -> weight of the layers adapters touch, for the pipeline's UNet (cached
        per UNet; the originals belong to one UNet); ``layers`` must be among them."""
        unet = self.pipe.unet
        if unet is not self._unet:
            if self._fused:
                raise RuntimeError("the pipeline's UNet was replaced while an adapter was fused "
                                   "into the old one; put it back before switching")
            self._originals.clear()  # they belong to the old UNet
            self._unet, self._weights = unet, {}
        missing = [n for n in layers if n not in self._weights]
        if missing:
            modules = dict(unet.named_modules())
            for n in missing:
                module = modules[n]
                self._weights[n] = getattr(module, "base_layer", module).weight
        return self._weights

    @torch.no_grad()
    def use(self, name: str | None, scale: float = 1.0) -> float:
        """Fuse ``name`` at ``scale`` into the base weights (None = the base model);
        return the switch time in seconds (0.0 when it is already active)."""
        t0 = time.perf_counter()
        if name is not None and name not in self._factors:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {list(self.loaded)})")
        if name == self.active and (name is None or scale == self.scale):
            self.last_switch_s = 0.0
            return 0.0
        new = self._factors.get(name, {}) if name is not None else {}
        weights = self._layer_weights(new)
        for layer in self._fused - set(new):
            weights[layer].copy_(self._originals[layer], non_blocking=True)
        for layer, (a, b, scaling) in new.items():
            weight = weights[layer]
            original = self._originals.get(layer)
            if original is None:  # first touch: the layer holds its base weight now
                original = self._originals[layer] = self._keep(weight)
            original = original.to(weight.device, non_blocking=True)
            alpha = scale * scaling
            if weight.dtype == torch.float32 and weight.is_contiguous():
                # W = W0 + alpha * B @ A in one kernel, written straight into the weight
                torch.addmm(original.view(weight.shape[0], -1), b, a, alpha=alpha,
                            out=weight.view(weight.shape[0], -1))
            else:  # half precision: float32 sum, rounded once
                weight.copy_(torch.addmm(original.float().view(weight.shape[0], -1), b, a,
                                         alpha=alpha).view(weight.shape))
        self._fused = set(new)
        self.active, self.scale = name, scale
        self.last_switch_s = time.perf_counter() - t0
        return self.last_switch_s

    def _keep(self, weight: torch.Tensor) -> torch.Tensor:
        """A copy of a base weight where the originals live (pinned host memory off-GPU)."""
        if self.originals_device is None or torch.device(self.originals_device) == weight.device:
            return weight.detach().clone()
        kept = weight.detach().to(self.originals_device, copy=True)
        return kept.pin_memory() if weight.is_cuda and kept.device.type == "cpu" else kept

    @property
    def fused(self) -> bool:
        """True while an adapter's delta is in the base weights."""
        return bool(self._fused)

    def originals_mb(self) -> float:
        """Memory held by the kept original weights (MB)."""
        return sum(t.numel() * t.element_size() for t in self._originals.values()) / 2**20

    def release(self) -> None:
        """Base weights back and the kept originals dropped (frees their memory)."""
        self.use(None)
        self._originals.clear()
        self._unet, self._weights = None, {}
