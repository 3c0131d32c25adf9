"""Single-file SD1.5 / SDXL checkpoints (the A1111 / ComfyUI ``.safetensors`` layout).

Most fine-tuned models are shared as one file holding the UNet
(``model.diffusion_model.*``), the VAE (``first_stage_model.*``) and the text encoder(s)
(``cond_stage_model.transformer.*`` for SD1.5; ``conditioner.embedders.0.transformer.*``
and the OpenCLIP ``conditioner.embedders.1.model.*`` for SDXL). They load through
diffusers' own ``from_single_file`` with the architecture configs shipped in
``assets/configs`` (``config=`` a local folder), so nothing is downloaded. The CLIP
tokenizer is rebuilt from the BPE merges that ``open_clip`` ships (the same table the
published ``vocab.json`` / ``merges.txt`` are made from) unless the config folder holds a
``tokenizer/`` of its own.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import torch

from hypersd_core.paths import ASSETS

SUFFIXES = (".safetensors",)
# architecture configs per kind (diffusers layout, no weights); tests point these at tiny ones
CONFIGS = {"sd15": ASSETS / "configs" / "sd15", "sdxl": ASSETS / "configs" / "sdxl"}

_UNET = "model.diffusion_model."
_VAE = ("first_stage_model.", "vae.")
_SD15_TEXT = "cond_stage_model.transformer."
_SDXL_TEXT = "conditioner.embedders.0.transformer."
_SDXL_TEXT_2 = "conditioner.embedders.1.model."


class NotACheckpointError(ValueError):
    """A file that is not an SD1.5 or SDXL single-file checkpoint."""


def is_single_file(model: str | Path) -> bool:
    """True for an existing file with a single-file checkpoint suffix."""
    path = Path(str(model)).expanduser()
    return path.suffix.lower() in SUFFIXES and path.is_file()


def checkpoint_keys(path: str | Path) -> dict[str, list[int]]:
    """Tensor names and shapes of a safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for a bad header
        raise NotACheckpointError(
            f"{path} is not a readable .safetensors file ({type(err).__name__}: {err})") from None


def detect_kind_from_keys(keys: dict[str, list[int]], name: str = "checkpoint") -> str:
    """'sd15' or 'sdxl' from the key layout; one clear line for anything else."""
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(_UNET):
        hint = ""
        if any("lora_" in k or ".lora." in k for k in keys):
            hint = " (it looks like a LoRA: pass it with --lora)"
        elif any(k.startswith(("down_blocks.", "up_blocks.")) for k in keys):
            hint = " (it looks like a diffusers UNet alone: pass the whole pipeline folder)"
        raise NotACheckpointError(
            f"{name} is neither an SD1.5 nor an SDXL single-file checkpoint: no UNet keys "
            f"({_UNET}*){hint}")
    in_channels = keys.get(_UNET + "input_blocks.0.0.weight", [0, 4])[1]
    if in_channels != 4:
        raise NotACheckpointError(
            f"{name}: UNet takes {in_channels} input channels (inpainting or another variant); "
            "only text-to-image SD1.5 / SDXL checkpoints (4 channels) are supported")
    if not any(has(p) for p in _VAE):
        raise NotACheckpointError(f"{name} holds no VAE weights (first_stage_model.*); "
                                  "merge a VAE into it or use a diffusers folder")
    if has(_SDXL_TEXT_2) and has(_SDXL_TEXT):
        return "sdxl"
    if has(_SD15_TEXT):
        return "sd15"
    if has("conditioner.embedders.0.model."):
        raise NotACheckpointError(f"{name} is an SDXL refiner checkpoint; only SDXL base "
                                  "and its fine-tunes are supported")
    if has("cond_stage_model.model."):
        raise NotACheckpointError(f"{name} is an SD2.x checkpoint (OpenCLIP text encoder); "
                                  "only SD1.5 and SDXL are supported")
    raise NotACheckpointError(
        f"{name} has a UNet but no SD1.5 ({_SD15_TEXT}*) or SDXL ({_SDXL_TEXT}*, "
        f"{_SDXL_TEXT_2}*) text encoder; it is neither an SD1.5 nor an SDXL checkpoint")


def detect_single_file_kind(path: str | Path) -> str:
    return detect_kind_from_keys(checkpoint_keys(path), name=str(path))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def _clip_vocab() -> tuple[dict[str, int], tuple[str, ...]]:
    """CLIP's 49408-token vocabulary and merges, built as CLIP builds them from its BPE file."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.is_file():
        raise FileNotFoundError(f"open_clip's BPE table is missing ({bpe}); reinstall open_clip_torch")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = tuple(lines[1:49152 - 256 - 2 + 1])
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The CLIP ViT-L/14 tokenizer (SD1.5, SDXL's first); SDXL's second pads with '!'."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges],
                         pad_token=pad_token,
                         model_max_length=77)


def load_single_file(path: str | Path, kind: str | None = None, config: str | Path | None = None,
                     dtype: torch.dtype = torch.float32):
    """(kind, pipeline) of a single-file checkpoint, through diffusers' ``from_single_file``.

    Args:
        path: the ``.safetensors`` file.
        kind: "sd15" / "sdxl" to skip detection (it must agree with the keys).
        config: diffusers config folder of the architecture (default: assets/configs/KIND).
        dtype: weight dtype.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path).expanduser()
    detected = detect_single_file_kind(path)
    if kind is not None and kind != detected:
        raise NotACheckpointError(f"{path} is an {detected} checkpoint, not {kind}")
    config = Path(config) if config is not None else CONFIGS[detected]
    if not (config / "model_index.json").is_file():
        raise FileNotFoundError(f"architecture config folder {config} has no model_index.json")
    extra: dict = {}
    if not (config / "tokenizer").is_dir():
        extra["tokenizer"] = clip_tokenizer()
    if detected == "sdxl":
        cls = StableDiffusionXLPipeline
        if not (config / "tokenizer_2").is_dir():
            extra["tokenizer_2"] = clip_tokenizer(pad_token="!")
    else:
        cls = StableDiffusionPipeline
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True,
                                dtype=dtype, **extra)
    return detected, pipe
