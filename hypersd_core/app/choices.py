"""What the UI may offer, built by the server (nothing is ever a typed path): models,
training data folders, LoRA files and the recipe an official LoRA uses, and the rewards
whose weights are on disk (with what the others need).
"""

from __future__ import annotations

from pathlib import Path

from hypersd_core.app.service import NEEDS_TARGETS, AppSettings

SCORED_REWARDS = ("digits-quality", "digits-alignment")  # default scores on the digits world
WORLD_REWARDS = {"digits": SCORED_REWARDS, "scenes": ("scenes-quality", "scenes-alignment")}


def model_choices(settings: AppSettings) -> list[str]:
    """Models the user has: digits, the configured one, and pipeline folders and SD1.5 /
    SDXL single-file checkpoints (``.safetensors``, kind read from the keys) under models_dir."""
    from hypersd_core.models.single_file import NotACheckpointError, detect_single_file_kind
    from hypersd_core.paths import SCENES_PIPELINE

    found = ["digits"]
    if (SCENES_PIPELINE / "model_index.json").is_file():
        found.append("scenes")  # the second world, once built
    from hypersd_core.digits.style import STYLE_PIPELINE  # the shipped style backbone

    if (STYLE_PIPELINE / "model_index.json").is_file():
        found.append(str(STYLE_PIPELINE))
    if settings.model not in found:
        found.append(settings.model)
    if settings.models_dir.is_dir():
        for p in sorted(settings.models_dir.iterdir()):
            if str(p) in found:
                continue
            if (p / "model_index.json").is_file():
                found.append(str(p))
            elif p.suffix == ".safetensors" and p.is_file():
                try:  # LoRA files and other weights are not base models
                    detect_single_file_kind(p)
                except NotACheckpointError:
                    continue
                found.append(str(p))
    return found + [m for m in settings.extra_models if m not in found]


def lora_files(folder: Path) -> list[Path]:
    """LoRA ``.safetensors`` files under ``folder`` (recursive, sorted); [] if it is absent."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.safetensors") if p.is_file())


def data_choices(settings: AppSettings) -> list[str]:
    """Training data sources: 'digits' plus image folders under data_dir (with a
    metadata.jsonl, or .txt captions beside the images)."""
    from hypersd_core.paths import SCENES_PIPELINE

    found = ["digits"] + (["scenes"] if (SCENES_PIPELINE / "model_index.json").is_file() else [])
    if settings.data_dir.is_dir():
        from hypersd_core.training.buckets import has_caption_files

        found += [str(p) for p in sorted(settings.data_dir.iterdir())
                  if (p / "metadata.jsonl").is_file() or has_caption_files(p)]
    return found


def reward_choices() -> list[str]:
    """Rewards the app offers for scoring generated images: those whose weights are on
    disk ([] if the module is missing)."""
    try:
        from hypersd_core.rewards import available_rewards
        from hypersd_core.rewards.availability import availability
    except ImportError:
        return []
    return [r for r in available_rewards() if r not in NEEDS_TARGETS and availability(r).ok]


def unavailable_rewards() -> dict[str, str]:
    """Rewards not offered because their weights are missing: name -> what they need."""
    try:
        from hypersd_core.rewards import available_rewards
        from hypersd_core.rewards.availability import availability
    except ImportError:
        return {}
    found = [availability(r) for r in available_rewards() if r not in NEEDS_TARGETS]
    return {a.name: a.note for a in found if not a.ok}


def unavailable_text() -> str:
    """Markdown lines naming the rewards that are off and the files each needs."""
    off = unavailable_rewards()
    if not off:
        return ""
    return "Rewards not offered (weights not found; no downloads are attempted):\n" + "".join(
        f"\n- **{name}** {note}" for name, note in off.items())


def default_rewards(model_kind: str = "digits") -> list[str]:
    """The rewards scored by default (a miniature world's own, cheap ones)."""
    offered = reward_choices()
    return [r for r in WORLD_REWARDS.get(model_kind, ()) if r in offered]
