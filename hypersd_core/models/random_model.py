"""Random-weight models: the full-size SD1.5 / SDXL architectures (or shrunk copies)
built from the public configs in ``assets/configs/``; nothing is downloaded.

``--model random:sd15`` / ``random:sdxl`` give the real parameter counts, activation
sizes and dtype paths (GPU smoke runs, memory checks); ``random:sd15-tiny`` /
``random:sdxl-tiny`` are the same layer types with a few channels (CPU tests). The
tokenizer is a small character-level CLIP tokenizer padded to 77 tokens: the sequence
length, not the vocabulary, sets the cost. Images from random weights are noise.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from hypersd_core.paths import ASSETS

CONFIGS = ASSETS / "configs"
TEXT_LEN = 77
PREFIX = "random:"
RANDOM_MODELS = ("random:sd15", "random:sdxl", "random:sd15-tiny", "random:sdxl-tiny")


def parse_random(model: str) -> tuple[str, bool] | None:
    """``random:<kind>[-tiny]`` -> (kind, tiny); None for any other model name."""
    if not model.startswith(PREFIX):
        return None
    if model not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {model!r}; known: {', '.join(RANDOM_MODELS)}")
    name = model.removeprefix(PREFIX)
    return name.removesuffix("-tiny"), name.endswith("-tiny")


def load_configs(kind: str) -> dict[str, dict]:
    """The shipped public configs of ``kind`` (sd15 or sdxl)."""
    folder = CONFIGS / kind
    if not folder.is_dir():
        raise FileNotFoundError(f"no architecture configs for {kind!r} in {CONFIGS}")
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    out = {p: json.loads((folder / p / "config.json").read_text()) for p in parts}
    out["scheduler"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return out


def shrink(kind: str, cfgs: dict[str, dict]) -> dict[str, dict]:
    """The same architectures with a few channels and one layer per block, 64x64 images."""
    cfgs = json.loads(json.dumps(cfgs))
    n = len(cfgs["unet"]["block_out_channels"])
    unet = cfgs["unet"]
    # without the old version tag the SD pipeline keeps a sample_size below 64
    unet.pop("_diffusers_version", None)
    unet.update(block_out_channels=[32, 64, 64, 64][:n], layers_per_block=1, norm_num_groups=8,
                sample_size=8)
    te_dims = [32] + ([32] if kind == "sdxl" else [])
    unet["cross_attention_dim"] = sum(te_dims)
    if kind == "sdxl":
        unet.update(attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 1, 1],
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)
    else:
        unet["attention_head_dim"] = 4
    cfgs["vae"].update(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8,
                       sample_size=64)
    for key in ("text_encoder", "text_encoder_2"):
        if key in cfgs:
            cfgs[key].update(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, projection_dim=32)
    return cfgs


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _write_char_tokenizer(folder: Path) -> None:
    """A CLIPTokenizer over single printable characters (no merges): any ASCII prompt
    tokenizes; padded to 77 tokens like CLIP's."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = [*chars, *(c + "</w>" for c in chars), BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": TEXT_LEN}))


def build_modules(kind: str, cfgs: dict[str, dict], device: str | torch.device = "cpu") -> dict:
    """UNet, VAE, text encoder(s) and tokenizer with random weights, made on ``device``
    ("meta" builds them without memory, for counting)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    tok_dir = Path(tempfile.mkdtemp(prefix="hypersd-tok-"))
    _write_char_tokenizer(tok_dir)
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=TEXT_LEN)
    vocab = tok.get_vocab()
    ids = {"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]}
    torch.manual_seed(0)
    with torch.device(device):
        out = {"unet": UNet2DConditionModel.from_config(cfgs["unet"]),
               "vae": AutoencoderKL.from_config(cfgs["vae"]),
               "text_encoder": CLIPTextModel(CLIPTextConfig(**{**cfgs["text_encoder"], **ids})),
               "tokenizer": tok}
        if kind == "sdxl":
            out["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**{**cfgs["text_encoder_2"], **ids}))
    return out


def build_pipeline(kind: str, cfgs: dict[str, dict], device: str | torch.device,
                   dtype: torch.dtype):
    """A stock diffusers pipeline with random weights, initialised directly on ``device``;
    the SDXL VAE stays fp32 under fp16 weights, as the pipeline upcasts it."""
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from hypersd_core.models.vae_precision import keep_vae_fp32

    m = build_modules(kind, cfgs, device)
    sched_cfg = cfgs["scheduler"]
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=m["vae"], text_encoder=m["text_encoder"],
                                         text_encoder_2=m["text_encoder_2"],
                                         tokenizer=m["tokenizer"], tokenizer_2=m["tokenizer"],
                                         unet=m["unet"], scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=m["vae"], text_encoder=m["text_encoder"],
                                       tokenizer=m["tokenizer"], unet=m["unet"],
                                       scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.to(device=device, dtype=dtype)
    keep_vae_fp32(pipe, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
