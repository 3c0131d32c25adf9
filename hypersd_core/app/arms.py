"""Arms: anything that can be a row of the Compare grid, a choice in Generate, or a side
of the user study. An arm is a sampling recipe plus the weights it runs with:

* a recipe name (``teacher``, ``lcm``, ...): the recipe with its default adapter;
* ``run:<run id>``: a finished training run's ``final/`` adapter, with the recipe its
  stage samples with (read from the run's config.yaml);
* ``adapter:<name>``: an adapter shipped with the model (e.g. ``hypersd-k4``);
* ``<file>`` (a path relative to the LoRA folder; ``lora:<file>`` also works), optionally
  ``@<recipe>``: a LoRA file or a one-step UNet; the recipe is read from the file's
  metadata or name, and must be given when neither says it.

Keys are resolved only against server-built lists (runs under runs_dir, files under
lora_dir): nothing a client sends is used as a path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from hypersd_core.app.choices import lora_files
from hypersd_core.app.service import AppSettings
from hypersd_core.models.lora import WEIGHT_NAME
from hypersd_core.models.sampling import RECIPES
from hypersd_core.training.export import RECIPE_META, stage_recipe

LORA_RECIPES = tuple(r for r in RECIPES if r != "teacher")  # what a LoRA file may run with


class ArmError(ValueError):
    """An arm key that names nothing the server offers (one line, shown as is)."""


@dataclass(frozen=True)
class Arm:
    """One resolved arm.

    Attributes:
        key: what pickers and study.yaml hold (see the module docstring).
        label: a readable name for tables and grids.
        recipe: the RECIPES entry it samples with.
        adapter: the weights file or UNet folder (None: the recipe's default adapter).
        kind: "recipe", "run", "shipped", "lora" or "unet".
        steps: the step count it was trained for (None: any).
    """

    key: str
    label: str
    recipe: str
    adapter: str | None = None
    kind: str = "recipe"
    steps: int | None = None

    def weights_hash(self) -> str:
        """SHA-256 prefix of the weights ('' for a recipe arm with no file)."""
        if self.adapter is None:
            return ""
        from hypersd_core.study.provenance import weights_hash

        return weights_hash(self.adapter)


# ------------------------------------------------------------------ recipes of files
def detect_recipe(path: str | Path) -> str | None:
    """The recipe a LoRA file or UNet was made for: its ``hypersd.recipe`` metadata (run
    exports carry it), a one-step UNet, or the official file names (Hyper-SD N-step /
    1-step, LCM, TCD). None when nothing says it."""
    from hypersd_core.models.unet import is_unet_source

    path = Path(path)
    if is_unet_source(path):
        return "hypersd-unet"
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            recipe = (f.metadata() or {}).get(RECIPE_META)
        if recipe in LORA_RECIPES:
            return recipe
    except Exception:  # noqa: BLE001 - an unreadable file is refused when it is loaded
        pass
    name = path.name.lower()
    if "lcm" in name:
        return "lcm"
    if "tcd" in name:
        return "tcd"
    if "hyper" in name:
        match = re.search(r"(\d+)\s*-?steps?", name)
        return "hypersd" if match and int(match.group(1)) > 1 else "hypersd-unified"
    return None


def shipped_recipe(name: str) -> tuple[str, int | None]:
    """(recipe, steps) of a shipped adapter by its name (hypersd-k4 -> hypersd, 4)."""
    match = re.match(r"hypersd-k(\d+)", name)
    if match:
        return "hypersd", int(match.group(1))
    if name in ("lcm", "tcd", "hypersd-unified", "hypersd-unet"):
        return name, None
    return "hypersd-unified", None


# ------------------------------------------------------------------ listing
def _same_model(run_model: str, model: str) -> bool:
    from hypersd_core.paths import DIGITS_PIPELINE

    def norm(m: str) -> str:
        if m == "digits":
            return str(DIGITS_PIPELINE.resolve())
        p = Path(m)
        return str(p.resolve()) if p.exists() else m

    return norm(run_model) == norm(model)


def run_arm(run, model: str | None = None) -> Arm | None:
    """The arm of a finished run (None when it has no final adapter or another base)."""
    weights = run.final_dir / WEIGHT_NAME
    if not weights.is_file():
        return None
    try:
        cfg = run.config()
    except (OSError, ValueError):
        return None
    if model is not None and not _same_model(cfg.model, model):
        return None
    recipe = stage_recipe(cfg.stage)
    stage = f"TSCD k={cfg.k}" if cfg.stage == "tscd" else cfg.stage
    steps = int(run.status().get("step") or cfg.steps)
    label = f"{run.dir.name} [{stage}, {steps} steps, {recipe}]"
    return Arm(f"run:{run.dir.name}", label, recipe, str(weights), "run",
               cfg.default_sample_steps)


def run_arms(settings: AppSettings) -> list[Arm]:
    """Finished runs under runs_dir trained on the app's model, newest first."""
    from hypersd_core.training.runs import list_runs

    found = (run_arm(r, settings.model) for r in list_runs(settings.runs_dir))
    return [a for a in found if a is not None]


def _digits_model(model: str) -> bool:
    """True for the digits world (by name, or a pipeline folder marked as its kind)."""
    if model == "digits":
        return True
    try:
        index = json.loads((Path(model) / "model_index.json").read_text())
        return index.get("_hypersd", {}).get("kind") == "digits"
    except (OSError, ValueError, AttributeError):
        return False


def shipped_arms(settings: AppSettings) -> list[Arm]:
    """The adapters shipped with the model (the digits world's ``assets/digits/adapters``)."""
    from hypersd_core.models import backbone

    if not _digits_model(settings.model) or not backbone.DIGITS_ADAPTERS.is_dir():
        return []
    out = []
    for p in sorted(backbone.DIGITS_ADAPTERS.iterdir()):
        if (p / WEIGHT_NAME).is_file():
            recipe, steps = shipped_recipe(p.name)
            out.append(Arm(f"adapter:{p.name}", f"{p.name} [shipped, {recipe}]", recipe,
                           str(p / WEIGHT_NAME), "shipped", steps))
    return out


def file_arms(settings: AppSettings) -> list[Arm]:
    """LoRA files and one-step UNets under lora_dir (key: the path relative to it; recipe
    '' when unknown)."""
    from hypersd_core.models.unet import WEIGHT_NAMES, is_unet_source

    out, seen_unets = [], set()
    root = settings.lora_dir
    for p in lora_files(root):
        source = p
        if p.name in WEIGHT_NAMES and is_unet_source(p.parent):  # a UNet folder
            if p.parent in seen_unets:
                continue
            seen_unets.add(p.parent)
            source = p.parent
        rel = str(source.relative_to(root))
        recipe = detect_recipe(source)
        kind = "unet" if recipe == "hypersd-unet" else "lora"
        label = f"{rel} [{recipe}]" if recipe else f"{rel} [recipe unknown: choose one]"
        out.append(Arm(rel, label, recipe or "", str(source), kind,
                       1 if kind == "unet" else None))
    return out


def arm_choices(settings: AppSettings, recipes: bool = False) -> list[tuple[str, str]]:
    """(label, key) of every arm: the recipes (when asked), finished runs, shipped adapters,
    then LoRA files and UNets."""
    out = [(r, r) for r in RECIPES] if recipes else []
    for arm in run_arms(settings) + shipped_arms(settings) + file_arms(settings):
        out.append((arm.label, arm.key))
    return out


# ------------------------------------------------------------------ resolving
def resolve_arm(key: str, settings: AppSettings | None, recipe: str | None = None) -> Arm:
    """The arm a key names. ``recipe`` is used for a LoRA file whose recipe is unknown
    (``lora:<file>@<recipe>`` gives it in the key). A bare file name is a LoRA file."""
    key = (key or "").strip()
    if key in RECIPES:
        return Arm(key, key, key)
    if settings is None:
        raise ArmError(f"arm {key!r} is not a recipe ({', '.join(RECIPES)})")
    kind, _, name = key.partition(":")
    if kind == "run":
        for arm in run_arms(settings):
            if arm.key == key:
                return arm
        raise ArmError(f"arm {key!r}: no finished run {name!r} under {settings.runs_dir} "
                       "trained on this model")
    if kind == "adapter":
        for arm in shipped_arms(settings):
            if arm.key == key:
                return arm
        raise ArmError(f"arm {key!r}: the model ships no adapter {name!r}")
    if kind != "lora":
        name = key  # a bare file name (the /compare endpoint's LoRA list)
    name, _, chosen = name.partition("@")
    chosen = chosen or recipe or ""
    if chosen and chosen not in LORA_RECIPES:
        raise ArmError(f"recipe {chosen!r} for {name!r} is not one of {', '.join(LORA_RECIPES)}")
    for arm in file_arms(settings):
        if arm.key == name:
            use = arm.recipe or chosen
            if not use:
                raise ArmError(f"the recipe of {name!r} is unknown (its name and metadata do "
                               f"not say): choose one of {', '.join(LORA_RECIPES)}")
            if arm.kind == "unet":
                use = "hypersd-unet"
            label = arm.label if arm.recipe else f"{name} [{use}]"
            return Arm(name if arm.recipe else f"{name}@{use}", label, use, arm.adapter,
                       arm.kind, arm.steps)
    raise ArmError(f"{name!r} is not one of the LoRA files in the configured folder")

