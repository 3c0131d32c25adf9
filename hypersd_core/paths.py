"""Where the shipped assets live."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
DIGITS_DIR = ASSETS / "digits"
DIGITS_PIPELINE = DIGITS_DIR / "pipeline"
DIGITS_ADAPTERS = DIGITS_DIR / "adapters"
DIGITS_EVAL = DIGITS_DIR / "eval"
PRESETS = ASSETS / "presets"
SCENES_DIR = ASSETS / "scenes"
SCENES_PIPELINE = SCENES_DIR / "pipeline"
SCENES_ADAPTERS = SCENES_DIR / "adapters"
SCENES_EVAL = SCENES_DIR / "eval"
