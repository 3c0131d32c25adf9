"""Push a run's adapter to the Hugging Face Hub with a model card.

``python -m hypersd_core push RUN --repo ID`` uploads the adapter in diffusers and kohya
form (and the EMA adapter when the run kept one), the config, metrics and a README.md
model card: base model, stage, the recommended scheduler with its steps, eta and CFG, the
training data and budget, and the run's evaluation table. Offline (HF_HUB_OFFLINE=1,
``--dry-run``, or a Hub that cannot be reached) it says in one line what it would upload.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypersd_core.training.export import export_run, stage_recipe
from hypersd_core.training.runs import Run

EVALUATION_FILE = "evaluation.md"  # a run's own evaluation table, when one was written


def _recipe_lines(stage: str, steps: int) -> list[str]:
    from hypersd_core.models.sampling import get_recipe, recipe_eta, scheduler_kwargs

    recipe = get_recipe(stage_recipe(stage))
    kwargs = scheduler_kwargs(recipe, steps)
    eta = recipe_eta(recipe, steps)
    return [f"- recipe: `{recipe.name}` ({recipe.description})",
            f"- scheduler: `{recipe.scheduler}`"
            + (f" with {', '.join(f'`{k}={v!r}`' for k, v in kwargs.items())}" if kwargs else ""),
            f"- steps: {steps}", f"- eta: {eta if eta is not None else 'n/a (deterministic)'}",
            "- CFG: none (guidance_scale=0)" if not recipe.cfg else "- CFG: the model's own"]


def evaluation_table(run: Run) -> str:
    """The run's evaluation: its ``evaluation.md`` when it has one, else the last logged
    reward scores of the fixed sample prompts and the final training loss."""
    own = run.dir / EVALUATION_FILE
    if own.is_file():
        return own.read_text().strip()
    records, _ = run.read_metrics()
    rows: dict[str, tuple[int, float]] = {}
    for r in records:
        for k, v in r.items():
            if (k.startswith("reward/") or k == "loss") and isinstance(v, (int, float)):
                rows[k] = (int(r.get("step", 0)), float(v))
    if not rows:
        return "No evaluation was logged for this run."
    lines = ["| metric | step | value |", "|---|---|---|"]
    lines += [f"| {k} | {s} | {v:.4g} |" for k, (s, v) in sorted(rows.items())]
    return "\n".join(lines)


def model_card(run: Run, repo_id: str) -> str:
    """README.md for the Hub: front matter and the sections named in the module docstring."""
    cfg = run.config()
    status = run.status()
    steps = cfg.default_sample_steps
    stage = f"TSCD k={cfg.k}" if cfg.stage == "tscd" else cfg.stage
    base = cfg.model if "/" in cfg.model and not Path(cfg.model).exists() else None
    front = ["---", "library_name: diffusers", "pipeline_tag: text-to-image",
             "tags: [hyper-sd, lora, text-to-image, " + cfg.stage + "]"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    seen = cfg.steps * cfg.batch_size * cfg.grad_accum * int(status.get("processes") or 1)
    seconds = status.get("seconds")
    budget = [f"- data: `{cfg.data}`",
              f"- {cfg.steps} steps x batch {cfg.batch_size} x grad_accum {cfg.grad_accum}"
              f" x {int(status.get('processes') or 1)} process(es) = {seen} samples",
              f"- LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha}, lr {cfg.lr}, seed {cfg.seed}",
              f"- device: {status.get('device', 'unknown')}"
              + (f", {seconds / 60:.1f} min" if isinstance(seconds, (int, float)) else "")]
    if cfg.lora_ema_decay:
        budget.append(f"- an EMA of the LoRA (decay {cfg.lora_ema_decay}) is in `*-ema*` files")
    name = run.dir.name
    usage = ["```python", "from diffusers import DiffusionPipeline",
             f"pipe = DiffusionPipeline.from_pretrained({cfg.model!r})",
             f"pipe.load_lora_weights({repo_id!r}, weight_name={name + '-lora.safetensors'!r})",
             "```"]
    return "\n".join(front + [
        f"# {name}", "",
        f"A Hyper-SD {stage} adapter trained with Hyper-SD Studio.", "",
        f"- base model: `{cfg.model}`", f"- stage: {stage}", "",
        "## Recommended sampling", "", *_recipe_lines(cfg.stage, steps), "",
        "## Training data and budget", "", *budget, "",
        "## Evaluation", "", evaluation_table(run), "",
        "## Files", "",
        f"- `{name}-lora.safetensors`: diffusers format; `{name}-lora-kohya.safetensors`: "
        "kohya keys (ComfyUI, A1111)", "- `config.yaml`, `metrics.jsonl`: the run's own record",
        "", "## Use", "", *usage, ""])


def stage_files(run: Run, repo_id: str, folder: Path) -> list[Path]:
    """Everything the push uploads, written into ``folder``."""
    files = export_run(run, folder, samples=False)
    if not any(f.name.endswith("-lora.safetensors") for f in files):
        raise ValueError(f"{run.dir} has no final adapter yet (final/); push a finished run")
    card = folder / "README.md"
    card.write_text(model_card(run, repo_id))
    return [card, *files]


def offline() -> bool:
    from huggingface_hub.constants import HF_HUB_OFFLINE

    return bool(HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "yes")


def push(run_dir: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
         token: str | None = None) -> str:
    """Upload the run's adapter and model card to ``repo_id``; returns one line saying what
    was (or, offline or with ``dry_run``, would be) uploaded."""
    run = Run(run_dir)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run.dir} is not a run folder (no config.yaml)")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo must be OWNER/NAME, got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="hypersd-push-") as tmp:
        files = stage_files(run, repo_id, Path(tmp))
        size = sum(f.stat().st_size for f in files) / 2**20
        what = f"{len(files)} files ({', '.join(f.name for f in files)}; {size:.1f} MB) to {repo_id}"
        if dry_run or offline():
            why = "dry run" if dry_run else "offline (HF_HUB_OFFLINE=1)"
            return f"{why}: would upload {what}"
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp,
                                     commit_message=f"Upload {run.dir.name} (Hyper-SD Studio)")
        except Exception as err:  # no network, no token, no rights: one line, nothing lost
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            return f"not uploaded ({type(err).__name__}: {first}); would upload {what}"
        return f"uploaded {what}: {getattr(info, 'commit_url', json.dumps(str(info)))}"
