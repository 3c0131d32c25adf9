"""An exponential moving average of the student's LoRA weights, exported beside final/.

theta_ema <- d * theta_ema + (1 - d) * theta after every optimizer step (float32). It is
saved in every checkpoint (``ema.safetensors``), so a resumed run continues the same
average, and written at the end as ``final_ema/`` in the same diffusers format as
``final/``. (This is an export of the weights, not the TSCD ``target: ema`` teacher.)
"""

from __future__ import annotations

from pathlib import Path

import torch

EMA_FILE = "ema.safetensors"


class LoraEMA:
    """EMA of one adapter's LoRA parameters in ``unet``."""

    def __init__(self, unet, adapter_name: str, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"lora_ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = {n: p for n, p in unet.named_parameters()
                       if "lora_" in n and f".{adapter_name}." in n}
        if not self.params:
            raise ValueError(f"no LoRA parameters of adapter {adapter_name!r} in the UNet")
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(folder) / EMA_FILE
        save_file({k: v.cpu().contiguous() for k, v in self.shadow.items()}, str(path))
        return path

    def load(self, folder: str | Path) -> bool:
        """Take the average from a checkpoint; False when it has none (the run then
        starts the average from its current weights)."""
        from safetensors.torch import load_file

        path = Path(folder) / EMA_FILE
        if not path.is_file():
            return False
        state = load_file(str(path))
        for name, value in state.items():
            if name in self.shadow:
                self.shadow[name].copy_(value)
        return True

    @torch.no_grad()
    def export(self, unet, out_dir: str | Path, adapter_name: str) -> Path:
        """Write the averaged adapter as a diffusers LoRA (the live weights are restored)."""
        from hypersd_core.models.lora import save_lora

        live = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            for name, p in self.params.items():
                p.copy_(self.shadow[name].to(p.dtype))
            return save_lora(unet, out_dir, adapter_name=adapter_name)
        finally:
            for name, p in self.params.items():
                p.copy_(live[name])
