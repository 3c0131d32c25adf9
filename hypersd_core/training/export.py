"""A run's files as others use them: its adapter in diffusers and kohya form (and the EMA
adapter when the run kept one), ``metrics.jsonl``, ``config.yaml`` and the sample grids.
The adapters carry safetensors metadata saying what they are for (``hypersd.recipe``,
stage, base model, steps), so the app detects their recipe when they come back as files.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hypersd_core.models.lora import WEIGHT_NAME, export_kohya
from hypersd_core.training.runs import Run

RECIPE_META = "hypersd.recipe"
# the recipe each stage samples with (its sample grids, and the recipe its adapter runs with)
STAGE_RECIPES = {"tscd": "hypersd", "lcm": "lcm", "tcd": "tcd", "feedback": "hypersd",
                 "dmd": "hypersd-unified"}
EMA_DIR = "final_ema"  # beside final/: the EMA of the student's LoRA (training/ema.py)


def stage_recipe(stage: str) -> str:
    """The sampling recipe of a stage's adapter."""
    return STAGE_RECIPES.get(stage, "hypersd-unified")


def run_metadata(run: Run) -> dict[str, str]:
    """safetensors metadata recording what a run's adapter is for."""
    cfg = run.config()
    meta = {RECIPE_META: stage_recipe(cfg.stage), "hypersd.stage": cfg.stage,
            "hypersd.base_model": cfg.model, "hypersd.steps": str(cfg.default_sample_steps),
            "hypersd.run": run.dir.name}
    if cfg.stage == "tscd":
        meta["hypersd.k"] = str(cfg.k)
    return meta


def with_metadata(src: Path, dst: Path, metadata: dict[str, str]) -> Path:
    """Copy a safetensors file, adding ``metadata`` to what it already holds."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    meta.update(metadata)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def adapter_files(run: Run) -> dict[str, Path]:
    """The run's adapters that exist: {"final": file, "ema": file}."""
    out = {}
    for key, folder in (("final", run.final_dir), ("ema", run.dir / EMA_DIR)):
        if (folder / WEIGHT_NAME).is_file():
            out[key] = folder / WEIGHT_NAME
    return out


def export_run(run: Run, out_dir: str | Path, samples: bool = True) -> list[Path]:
    """Write the run's files into ``out_dir`` (created) and return them.

    ``<run>-lora.safetensors`` (diffusers keys), ``<run>-lora-kohya.safetensors``, the
    same two with ``-ema`` when the run kept an EMA, ``metrics.jsonl``, ``config.yaml``,
    and ``<run>-samples.zip`` (every sample grid, named by step).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = run.dir.name
    files: list[Path] = []
    meta = run_metadata(run) if run.config_path.is_file() else {}
    for key, weights in adapter_files(run).items():
        suffix = "" if key == "final" else "-ema"
        diffusers = with_metadata(weights, out / f"{name}-lora{suffix}.safetensors",
                                  {**meta, "hypersd.weights": key})
        kohya = export_kohya(diffusers, out / f"{name}-lora{suffix}-kohya.safetensors")
        with_metadata(kohya, kohya, {**meta, "hypersd.weights": key, "hypersd.format": "kohya"})
        files += [diffusers, kohya]
    for src in (run.metrics_path, run.config_path):
        if src.is_file():
            files.append(Path(shutil.copy2(src, out / src.name)))
    grids = sorted(run.samples_dir.glob("step-*.png")) if run.samples_dir.is_dir() else []
    if samples and grids:
        archive = out / f"{name}-samples.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:  # PNGs are compressed
            for g in grids:
                z.write(g, g.name)
        files.append(archive)
    return files


def export_adapter(run: Run, name: str, out_root: Path) -> Path:
    """Copy a finished run's adapter (fp16 weights) with its config, metrics and samples."""
    out = out_root / name
    tmp = out_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = load_file(str(run.final_dir / WEIGHT_NAME))
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()},
              str(tmp / WEIGHT_NAME))
    shutil.copy(run.config_path, tmp / "config.yaml")
    shutil.copy(run.metrics_path, tmp / "metrics.jsonl")
    grids = sorted(run.samples_dir.glob("*.png"))
    if grids:
        shutil.copy(grids[-1], tmp / "samples.png")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
