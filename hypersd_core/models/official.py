"""The official Hyper-SD, LCM and TCD LoRA files for SD1.5 and SDXL, by their published
names, fetched from the Hugging Face hub when a method needs one and the model has no
adapter of its own under that name.

| adapter | SD1.5 | SDXL |
|---|---|---|
| ``hypersd-k{2,4,8}`` | ByteDance/Hyper-SD ``Hyper-SD15-{N}steps-lora`` | ``Hyper-SDXL-{N}steps-lora`` |
| ``hypersd-k1``, ``hypersd-unified`` | ``Hyper-SD15-1step-lora`` (unified, 1-8 steps) | ``Hyper-SDXL-1step-lora`` |
| ``lcm`` | latent-consistency/lcm-lora-sdv1-5 | latent-consistency/lcm-lora-sdxl |
| ``tcd`` | h1t/TCD-SD15-LoRA | h1t/TCD-SDXL-LoRA |

A ``*.fp16.safetensors`` variant of a file is taken when the repository has one (half the
download). Offline (``HF_HUB_OFFLINE=1``) only the local hub cache is read, and a file
that is not there gives one line naming the repository, the file and what to do.
``hypersd-k1`` maps to the unified 1-step LoRA: at one step the DDIM-trailing and TCD
samplers both return the x0 prediction at t=999.
"""

from __future__ import annotations

import os
from pathlib import Path

HYPER = "ByteDance/Hyper-SD"
_FILES: dict[str, dict[str, tuple[str, str]]] = {
    "sd15": {
        "hypersd-k8": (HYPER, "Hyper-SD15-8steps-lora.safetensors"),
        "hypersd-k4": (HYPER, "Hyper-SD15-4steps-lora.safetensors"),
        "hypersd-k2": (HYPER, "Hyper-SD15-2steps-lora.safetensors"),
        "hypersd-k1": (HYPER, "Hyper-SD15-1step-lora.safetensors"),
        "hypersd-unified": (HYPER, "Hyper-SD15-1step-lora.safetensors"),
        "lcm": ("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors"),
        "tcd": ("h1t/TCD-SD15-LoRA", "TCD-SD15-LoRA.safetensors"),
    },
    "sdxl": {
        "hypersd-k8": (HYPER, "Hyper-SDXL-8steps-lora.safetensors"),
        "hypersd-k4": (HYPER, "Hyper-SDXL-4steps-lora.safetensors"),
        "hypersd-k2": (HYPER, "Hyper-SDXL-2steps-lora.safetensors"),
        "hypersd-k1": (HYPER, "Hyper-SDXL-1step-lora.safetensors"),
        "hypersd-unified": (HYPER, "Hyper-SDXL-1step-lora.safetensors"),
        "lcm": ("latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors"),
        "tcd": ("h1t/TCD-SDXL-LoRA", "TCD-SDXL-LoRA.safetensors"),
    },
}


class OfficialLoraMissing(FileNotFoundError):
    """An official LoRA that is neither in the hub cache nor downloadable now."""


def official_file(kind: str, adapter: str) -> tuple[str, str] | None:
    """(repository, file name) of the official LoRA for ``adapter`` on a ``kind`` model."""
    return _FILES.get(kind, {}).get(adapter)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def fp16_name(filename: str) -> str:
    return filename.removesuffix(".safetensors") + ".fp16.safetensors"


def _download(repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename, local_files_only=hub_offline()))


def cached(kind: str, adapter: str) -> Path | None:
    """The official file in the local hub cache (fp16 variant first), or None."""
    found = official_file(kind, adapter)
    if found is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo, filename = found
    for name in (fp16_name(filename), filename):
        path = try_to_load_from_cache(repo, name)
        if isinstance(path, str) and Path(path).is_file():
            return Path(path)
    return None


def available(kind: str, adapter: str) -> bool:
    """True when the adapter has an official file that is cached or can be fetched now."""
    return official_file(kind, adapter) is not None and (not hub_offline() or cached(kind, adapter) is not None)


def fetch(kind: str, adapter: str) -> Path:
    """The official LoRA file for ``adapter``: from the cache, else downloaded (fp16 variant
    first); OfficialLoraMissing (one line) when neither works."""
    found = official_file(kind, adapter)
    if found is None:
        raise OfficialLoraMissing(f"no official LoRA is published as {adapter!r} for {kind}")
    path = cached(kind, adapter)
    if path is not None:
        return path
    repo, filename = found
    errors = []
    for name in (fp16_name(filename), filename):
        try:
            return _download(repo, name)
        except Exception as err:  # hub errors are many and long: keep the type only
            errors.append(type(err).__name__)
    how = ("the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline()
           else f"the download failed ({errors[-1]})")
    raise OfficialLoraMissing(
        f"adapter {adapter!r} for {kind}: the official {repo}/{filename} is not in the local "
        f"hub cache and {how}; run once with network access, or put the file in models/loras/ "
        "and pick it as a LoRA row")
