"""PickScore (Kirstain et al. 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic preferences.

Score = ``logit_scale.exp() * cos(image_embed, text_embed)`` (about 100 * cos; Hyper-SD's
table reports it divided by 100, e.g. 0.217 for SD1.5). Model
``yuvalkirstain/PickScore_v1``, processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
The image path uses the processor's resize/crop/normalise settings in torch ops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hypersd_core.rewards.base import Reward, RewardWeightsMissing, clip_preprocess, hub_offline

MODEL_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(Reward):
    """logit_scale * cos between transformers-CLIP image and text embeddings; differentiable."""

    name = "pickscore"
    range = None
    higher_is_better = True
    differentiable = True

    def __init__(self, model: torch.nn.Module, processor: Any):
        super().__init__()
        self.model = model
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        crop = ip.crop_size
        self.image_size = int(crop if isinstance(crop, int) else crop["height"])
        self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = clip_preprocess(images, self.image_size, self.mean, self.std)
        text = self.tokenizer(prompts, padding=True, truncation=True,
                              max_length=self.model.config.text_config.max_position_embeddings,
                              return_tensors="pt").to(images.device)
        img = F.normalize(_features(self.model.get_image_features(pixel_values=x)), dim=-1)
        txt = F.normalize(_features(self.model.get_text_features(**text)), dim=-1)
        return self.model.logit_scale.exp() * (img * txt).sum(-1)


def _features(out: Any) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def load_pickscore(model_path: str | Path = MODEL_REPO, processor_path: str | Path = PROCESSOR_REPO,
                   device: str | torch.device = "cpu") -> PickScore:
    """PickScore from local folders or hub ids (cache only when ``HF_HUB_OFFLINE=1``).

    Args:
        model_path: a CLIPModel folder (``save_pretrained`` layout) or hub id.
        processor_path: a CLIPProcessor folder or hub id (tokenizer + image processor).
    """
    from transformers import CLIPModel, CLIPProcessor

    def local_only(p: str | Path) -> bool:
        return hub_offline() or Path(p).is_dir()

    try:
        model = CLIPModel.from_pretrained(str(model_path), local_files_only=local_only(model_path))
        processor = CLIPProcessor.from_pretrained(str(processor_path),
                                                  local_files_only=local_only(processor_path))
    except (OSError, ValueError) as e:
        raise RewardWeightsMissing(
            f"PickScore weights not found ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
            f"Download https://huggingface.co/{MODEL_REPO} (model) and "
            f"https://huggingface.co/{PROCESSOR_REPO} (processor files only: tokenizer and "
            "preprocessor_config.json) and pass path=<model folder>, processor=<processor folder>"
        ) from None
    return PickScore(model.eval(), processor).to(device)


def make_pickscore(path: str | Path | None = None, device: str | torch.device = "cpu",
                   processor: str | Path | None = None, **kw: Any) -> PickScore:
    """Registry factory: ``path`` is the model folder (default hub id), ``processor`` the
    processor folder (default: ``path`` when it holds a tokenizer, else the laion hub id)."""
    model_path = path or MODEL_REPO
    if processor is None:
        has_tok = Path(model_path).is_dir() and any(
            (Path(model_path) / f).is_file() for f in ("tokenizer.json", "vocab.json"))
        processor = model_path if has_tok else PROCESSOR_REPO
    return load_pickscore(model_path, processor, device=device)
