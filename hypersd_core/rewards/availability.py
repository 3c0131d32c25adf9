"""Which rewards can score here, found without the network.

A reward is available when its weights are on disk: the digits rewards ship in assets/;
the others are looked for in one folder per reward under ``HYPERSD_REWARDS_DIR`` (default
``./models/rewards``), then in the local Hugging Face cache (``try_to_load_from_cache``:
a file lookup, never a download). An unavailable reward says which files it needs and
where to put them; it is never loaded, so nothing waits on download retries offline.

    models/rewards/imagereward/  ImageReward.pt, med_config.json, tokenizer/ (bert-base-uncased)
    models/rewards/aesthetic/    sac+logos+ava1-l14-linearMSE.pth, clip/open_clip_model.safetensors
    models/rewards/clip-score/   open_clip_model.safetensors (OpenAI ViT-B/32, open_clip format)
    models/rewards/pickscore/    the yuvalkirstain/PickScore_v1 folder (config.json, weights,
                                 tokenizer files)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypersd_core.paths import ROOT

REWARDS_DIR_ENV = "HYPERSD_REWARDS_DIR"


def rewards_dir() -> Path:
    """The folder holding one sub-folder of weights per reward."""
    return Path(os.environ.get(REWARDS_DIR_ENV, ROOT / "models" / "rewards")).expanduser()


@dataclass(frozen=True)
class Availability:
    """Whether a reward can be loaded here, why not, and the arguments that load it."""

    name: str
    ok: bool
    note: str = ""  # what is missing and where it goes ('' when ok)
    kwargs: dict[str, Any] = field(default_factory=dict)  # for load_reward(name, **kwargs)


@dataclass(frozen=True)
class _Needs:
    files: tuple[str, ...]  # inside rewards_dir()/<name>/
    hub: tuple[tuple[str, str], ...]  # the same files in the local hub cache: (repo, file)
    what: str  # in words, for the note


def _needs() -> dict[str, _Needs]:
    return {
        "imagereward": _Needs(
            ("ImageReward.pt", "med_config.json", "tokenizer/vocab.txt"),
            (("THUDM/ImageReward", "ImageReward.pt"), ("THUDM/ImageReward", "med_config.json"),
             ("bert-base-uncased", "vocab.txt")),
            "ImageReward.pt and med_config.json (huggingface.co/THUDM/ImageReward) and the "
            "bert-base-uncased tokenizer in tokenizer/"),
        "aesthetic": _Needs(
            ("sac+logos+ava1-l14-linearMSE.pth", "clip/open_clip_model.safetensors"),
            (("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth"),
             ("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors")),
            "the LAION aesthetic MLP sac+logos+ava1-l14-linearMSE.pth and OpenAI CLIP ViT-L/14 "
            "as clip/open_clip_model.safetensors (huggingface.co/timm/"
            "vit_large_patch14_clip_224.openai)"),
        "clip-score": _Needs(
            ("open_clip_model.safetensors",),
            (("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"),),
            "OpenAI CLIP ViT-B/32 as open_clip_model.safetensors "
            "(huggingface.co/timm/vit_base_patch32_clip_224.openai)"),
        "pickscore": _Needs(
            ("config.json", "tokenizer.json"),
            (("yuvalkirstain/PickScore_v1", "config.json"),
             ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "tokenizer.json")),
            "the yuvalkirstain/PickScore_v1 model folder (config.json, weights) with the "
            "tokenizer files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    }


def _cached(repo: str, filename: str) -> Path | None:
    """A file from the local hub cache, or None (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo, filename)
    except Exception:  # a malformed cache entry is as good as none
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _kwargs(name: str, files: list[Path]) -> dict[str, Any]:
    """load_reward arguments pointing at the found files (so loading never asks the hub)."""
    if name == "imagereward":
        ckpt, med, vocab = files
        return {"path": ckpt, "med_config": med, "tokenizer_dir": vocab.parent}
    if name == "aesthetic":
        return {"path": files[0], "clip_path": files[1]}
    if name == "clip-score":
        return {"path": files[0]}
    if name == "pickscore":
        return {"path": files[0].parent, "processor": files[1].parent}
    return {}


def availability(name: str) -> Availability:
    """Whether ``name`` can be loaded here (file checks only)."""
    if name.startswith("digits-"):
        from hypersd_core.rewards.digits import FILES, REWARDS_DIR

        path = REWARDS_DIR / FILES.get(name, "")
        if name in FILES and path.is_file():
            return Availability(name, True, kwargs={"path": path})
        return Availability(name, False, f"needs {path} (shipped with the digits world)")
    if name.startswith("scenes-"):
        from hypersd_core.rewards.scenes import FILES as SCENE_FILES
        from hypersd_core.rewards.scenes import REWARDS_DIR as SCENE_DIR

        path = SCENE_DIR / SCENE_FILES.get(name, "")
        if name in SCENE_FILES and path.is_file():
            return Availability(name, True, kwargs={"path": path})
        return Availability(name, False, "needs assets/scenes/rewards (python -m "
                                         "hypersd_core.rewards.scenes_train)")
    needs = _needs().get(name)
    if needs is None:  # no weights of its own to look for (e.g. perception's own loader)
        return Availability(name, True)
    folder = rewards_dir() / name
    local = [folder / f for f in needs.files]
    if all(p.is_file() for p in local):
        return Availability(name, True, kwargs=_kwargs(name, local))
    cached = [_cached(repo, f) for repo, f in needs.hub]
    if all(cached):
        return Availability(name, True, kwargs=_kwargs(name, cached))
    missing = ", ".join(f for f in needs.files if not (folder / f).is_file())
    return Availability(
        name, False,
        f"needs {needs.what}: put them in {folder} (missing: {missing}; {REWARDS_DIR_ENV} "
        "sets the parent folder), or fill the Hugging Face cache once online")
