"""Loading open_clip models from a local file or the hub, and encoding in torch ops.

Shared by the CLIP score (ViT-B/32) and the LAION aesthetic predictor (ViT-L/14).
Weights are read by us (safetensors, or torch.load with weights_only=True), never via
a pickled JIT archive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hypersd_core.rewards.base import load_state_dict_file, resolve_file

OPENAI_HUB = {  # open_clip-format copies of OpenAI's CLIP weights on the hub
    "ViT-B-32": "timm/vit_base_patch32_clip_224.openai",
    "ViT-L-14": "timm/vit_large_patch14_clip_224.openai",
}
HUB_FILE = "open_clip_model.safetensors"


def build_open_clip(model: str | dict[str, Any], weights: str | Path | None = None,
                    quick_gelu: bool = True) -> tuple[torch.nn.Module, Any, int]:
    """An open_clip CLIP model, its tokenizer and its input resolution.

    Args:
        model: an open_clip model name (``"ViT-B-32"``) or a model config dict
            (``embed_dim``, ``vision_cfg``, ``text_cfg``) as in open_clip's JSON configs.
        weights: a local state-dict file or folder holding ``open_clip_model.safetensors``;
            None for a named model fetches OpenAI's weights from the hub (cache only when
            ``HF_HUB_OFFLINE=1``); None for a config dict keeps random weights (tests).
        quick_gelu: OpenAI's CLIP weights were trained with QuickGELU.
    Returns:
        (model in eval mode, tokenizer callable list[str] -> LongTensor [B, L], image size).
    """
    import open_clip
    from open_clip.model import CLIP

    if isinstance(model, str):
        cfg = open_clip.get_model_config(model)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {model!r}")
        name = model
    else:
        cfg, name = dict(model), None
    path = None
    if weights is not None or name is not None:  # find the file before building a large model
        path = resolve_file(f"open_clip {name or 'model'}", weights, OPENAI_HUB.get(name or ""),
                            HUB_FILE, hint="Any open_clip-format state dict of the same architecture works.")
    net = CLIP(**cfg, quick_gelu=quick_gelu)
    if path is not None:
        sd = load_state_dict_file(path)
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path} does not match the {name or 'given'} open_clip "
                             f"architecture: {str(e)[:300]}") from None
    text_cfg = cfg.get("text_cfg", {})
    tokenizer = open_clip.get_tokenizer(name or "ViT-B-32",
                                        context_length=text_cfg.get("context_length", 77))
    size = cfg["vision_cfg"]["image_size"]
    return net.eval(), tokenizer, int(size if isinstance(size, int) else size[0])

