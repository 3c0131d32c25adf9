"""Train & Monitor logic without widgets: presets, validation, start/stop/resume, chains
and incremental polling of a run folder. Every action goes through ``hypersd_core``
(runs, chain, config); the Gradio layer in ``ui.py`` only wires these to components.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hypersd_core import safe_yaml
from hypersd_core.app.choices import data_choices, model_choices
from hypersd_core.app.service import AppSettings
from hypersd_core.models.lora import WEIGHT_NAME
from hypersd_core.training import chain
from hypersd_core.training.config import (
    ConfigError,
    StageConfig,
    list_presets,
    make_config,
    preset_path,
)
from hypersd_core.training.runs import Run, list_runs, pid_alive
from train_tab.monitor import (  # noqa: F401 (the reading side, re-exported as ctl.*)
    LIVE_STATES,
    LOG_LINES,
    LOG_TAIL_BYTES,
    ControlError,
    Poll,
    default_run,
    env_info,
    find_run,
    latest_sample,
    log_tail,
    loss_panels,
    memory_text,
    metric_series,
    plots_html,
    poll,
    resolved_config,
    run_choices,
    run_label,
    shown_state,
    status_text,
)

OWNED_KEYS = ("model", "init_adapter", "data")  # chosen from server-built lists, never typed
STAGE_LABELS = {"tscd": "TSCD", "lcm": "LCM (baseline)", "tcd": "TCD (baseline)",
                "feedback": "feedback (ReFL + perceptual)", "dmd": "DMD one-step"}
_START_LOCK = threading.Lock()  # Start and Chain in this process check-and-create in turn


# ------------------------------------------------------------------ presets
def preset_stage(name: str) -> str:
    """'TSCD k=4', 'LCM (baseline)', ...: the stage a preset trains."""
    raw = yaml.safe_load(preset_path(name).read_text()) or {}
    stage = raw.get("stage", "tscd")
    label = STAGE_LABELS.get(stage, stage)
    return f"{label} k={raw.get('k', 8)}" if stage == "tscd" else label


def stage_choices() -> list[str]:
    """Stages that have at least one preset, in chain order."""
    seen: list[str] = []
    for name in list_presets():
        label = preset_stage(name)
        if label not in seen:
            seen.append(label)
    order = [f"TSCD k={k}" for k in (8, 4, 2, 1)] + list(STAGE_LABELS.values())
    return sorted(seen, key=lambda s: order.index(s) if s in order else len(order))


def presets_for(stage_label: str) -> list[str]:
    return [p for p in list_presets() if preset_stage(p) == stage_label]


def preset_text(name: str) -> str:
    """The preset's settings as editable YAML (without the keys the dropdowns own)."""
    raw = yaml.safe_load(preset_path(name).read_text()) or {}
    return yaml.safe_dump({k: v for k, v in raw.items() if k not in OWNED_KEYS}, sort_keys=False)


def init_choices(settings: AppSettings) -> list[tuple[str, str]]:
    """('(base model)', '') plus every finished run's final adapter: (label, run id)."""
    out = [("(base model: no initial adapter)", "")]
    for run in list_runs(settings.runs_dir):
        if (run.final_dir / WEIGHT_NAME).is_file():
            out.append((f"{run.dir.name} (final adapter)", run.dir.name))
    return out


# --------------------------------------------------------------- validation
@dataclass
class Checked:
    """The result of checking the settings editor: every error, and notes that do not
    block a start (a pasted preset's model line that the dropdown overrides)."""

    config: StageConfig | None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        """Markdown: every error (or "valid"), then the notes."""
        if not self.errors:
            text = "Settings are valid."
        else:
            n = len(self.errors)
            text = (f"**Fix {'this problem' if n == 1 else f'these {n} problems'} before "
                    "starting:**\n" + "\n".join(f"- {_md(e)}" for e in self.errors))
        if self.notes:
            text += "\n\n" + "\n".join(f"- Note: {_md(n)}" for n in self.notes)
        return text

    @property
    def resolved(self) -> str:
        return yaml.safe_dump(self.config.to_dict(), sort_keys=False) if self.config else ""


def _md(text: str) -> str:
    """A message as one Markdown line: typed text cannot make emphasis, code, links or tags
    (intraword underscores, as in lora_rank, are plain text to Markdown already)."""
    return "".join("\\" + c if c in "\\`*[]<|" else c for c in " ".join(text.split()))


OWNED_LABELS = {"model": "Model", "data": "Training data", "init_adapter": "Start from adapter"}


def check_settings(text: str, model: str, init_run: str, data: str,
                   settings: AppSettings) -> Checked:
    """Parse and validate the editor's YAML with the dropdowns' model/adapter/data.

    A pasted preset is accepted whole: its ``model``/``data``/``init_adapter`` lines are
    never used (the dropdowns choose those from server-built lists); when one differs
    from its dropdown, a note says which value the run takes. Every error is listed.
    """
    try:  # bounded: an alias bomb or a huge paste is refused before it is walked
        values = safe_yaml.load(text or "", "the settings") or {}
    except safe_yaml.YAMLBoundsError as err:
        return Checked(None, [str(err)])
    except yaml.YAMLError as err:
        return Checked(None, [f"the settings are not valid YAML: {err}"])
    if not isinstance(values, dict):
        return Checked(None, ["the settings must be a mapping of key: value lines"])
    errors: list[str] = []
    if model not in model_choices(settings):
        errors.append(f"model {model!r} is not one of the models offered")
    if data not in data_choices(settings):
        errors.append(f"data {data!r} is not one of the data sources offered")
    chosen = {"model": model, "data": data, "init_adapter": _init_path(init_run, settings, errors)}
    notes = [_owned_note(key, values[key], chosen[key], init_run) for key in OWNED_KEYS
             if key in values and str(values[key] or "") != chosen[key]]
    values.update(chosen)
    try:
        cfg = make_config(values)
    except ConfigError as err:
        errors += err.errors
        cfg = None
    except ValueError as err:
        errors.append(str(err))
        cfg = None
    return Checked(cfg if not errors else None, errors, notes)


def _owned_note(key: str, typed, chosen: str, init_run: str) -> str:
    shown = chosen if key != "init_adapter" else (init_run or "the base model")
    return (f"the line {key}: {str(typed)[:80]} is not used: the {OWNED_LABELS[key]} "
            f"dropdown above chooses it (now {shown})")


def _init_path(run_id: str, settings: AppSettings, errors: list[str]) -> str:
    if not run_id:
        return ""
    valid = {rid for _, rid in init_choices(settings) if rid}
    if run_id not in valid:
        errors.append(f"initial adapter {run_id!r} is not a finished run")
        return ""
    return str(settings.runs_dir / run_id / "final" / WEIGHT_NAME)


def _require_training(settings: AppSettings) -> None:
    if settings.training_disabled_reason:
        raise ControlError(settings.training_disabled_reason)


# ------------------------------------------------------------------ actions


def start_runs(configs: list[StageConfig], settings: AppSettings) -> tuple[list[Run], str]:
    """Create the runs (a chain when several) and hand them to a driver process.

    Idempotent: when a live run (queued, starting, training) already has the first stage's
    settings, it is returned and nothing new is created (a double click starts one run).
    The message says "Queued" when another run is ahead of the new one, "Started" only
    when nothing is. Returns the runs and the message.
    """
    _require_training(settings)
    with _START_LOCK, chain.device_lock(settings.runs_dir):  # one check-and-create at a time
        same = live_duplicate(configs[0], settings)
        if same is not None:
            state = shown_state(same)
            return [same], (f"Run {same.dir.name} with these settings is already {state}: "
                            "not started again.")
        ahead = chain.run_ahead(settings.runs_dir)
        runs = chain.create_chain(configs, settings.runs_dir)
        if ahead is not None:  # shown as queued at once, not "starting" until the driver runs
            runs[0].write_status(waiting_for=ahead.dir.name)
        chain.spawn_driver(runs, settings.runs_dir)
    first = runs[0].dir.name
    what = f"chain of {len(runs)} stages starting with {first}" if len(runs) > 1 else f"run {first}"
    if ahead is not None:
        return runs, f"Queued {what}: it {chain.waiting_note(runs[0])}."
    return runs, f"Started {what}."


def live_duplicate(cfg: StageConfig, settings: AppSettings) -> Run | None:
    """A live run (queued with its driver, starting, training) with exactly ``cfg``."""
    wanted = cfg.to_dict()
    for run in list_runs(settings.runs_dir):
        if not chain.is_live(run.status()):
            continue
        try:
            if run.config().to_dict() == wanted:
                return run
        except (OSError, ValueError):
            continue
    return None


def chain_busy(settings: AppSettings) -> str:
    """Name of the run training now ('' when the device is free)."""
    from hypersd_core.training.runs import active_run

    run = active_run(settings.runs_dir)
    return run.dir.name if run else ""


def start(text: str, model: str, init_run: str, data: str,
          settings: AppSettings) -> tuple[Run, str]:
    """Validate the editor and start (or queue) one run."""
    _require_training(settings)
    checked = check_settings(text, model, init_run, data, settings)
    if checked.config is None:
        raise ControlError(checked.message)
    runs, msg = start_runs([checked.config], settings)
    return runs[0], msg


def chain_configs(model: str, data: str, steps: int = 0,
                  presets: tuple[str, ...] = chain.CHAIN_PRESETS) -> tuple[list[StageConfig], str]:
    """The chain's stage configs from the presets that exist, and a note on missing ones."""
    have = set(list_presets())
    used = [p for p in presets if p in have]
    missing = [p for p in presets if p not in have]
    if not used:
        raise ControlError(f"none of the chain's presets exist ({', '.join(presets)})")
    configs = []
    for name in used:
        values = yaml.safe_load(preset_path(name).read_text()) or {}
        values.update(model=model, data=data, init_adapter="")
        if steps:
            values.update(steps=int(steps), sample_every=min(int(steps), values.get("sample_every", 100)),
                          checkpoint_every=min(int(steps), values.get("checkpoint_every", 100)))
        configs.append(make_config(values))
    note = f" (skipped stages without a preset: {', '.join(missing)})" if missing else ""
    return configs, note


def start_chain(model: str, data: str, steps: int, settings: AppSettings) -> tuple[Run, str]:
    """Queue the chain 8 -> 4 -> 2 -> 1 -> DMD (the stages that have presets)."""
    _require_training(settings)
    configs, note = chain_configs(model, data, steps)
    runs, msg = start_runs(configs, settings)
    return runs[0], msg + note


def stop(run_id: str, settings: AppSettings) -> str:
    """Ask a run to stop (flag + SIGINT); a run still waiting is stopped at once."""
    _require_training(settings)
    run = find_run(run_id, settings)
    status = run.status()
    if status.get("state") not in LIVE_STATES:
        raise ControlError(f"run {run_id} is not running (state: {status.get('state')})")
    run.request_stop()
    if status.get("state") == "queued" and not pid_alive(status.get("pid")):
        run.write_status(state="stopped", waiting_for=None, error="stopped before it started")
        return f"Run {run_id} was waiting; it will not start."
    return f"Stop requested for run {run_id}: it saves a checkpoint and stops."


def resume(run_id: str, settings: AppSettings) -> str:
    """Continue a stopped or failed run from its newest valid checkpoint."""
    _require_training(settings)
    run = find_run(run_id, settings)
    state = run.status().get("state")
    if state in LIVE_STATES and (pid_alive(run.status().get("pid"))
                                 or pid_alive(run.status().get("waiter_pid"))):
        raise ControlError(f"run {run_id} is already {state}")
    if state == "done":
        raise ControlError(f"run {run_id} is done; start a new run to train more")
    busy = chain_busy(settings)
    run.stop_path.unlink(missing_ok=True)  # the previous stop's flag must not stop the resume
    ckpt = run.latest_checkpoint()
    # the step it resumes from, and no ETA until the new process has measured its speed
    run.write_status(state="queued", error=None, waiting_for=None, pid=None,
                     step=checkpoint_step(ckpt), it_s=None, eta_s=None)
    chain.spawn_driver([run], settings.runs_dir)
    where = f"from {ckpt.name}" if ckpt else "from the start (no checkpoint yet)"
    if busy and busy != run_id:
        return f"Resume of {run_id} queued {where}: it waits because run {busy} is training."
    return f"Resuming {run_id} {where}."


def checkpoint_step(ckpt: Path | None) -> int:
    """The step a checkpoint folder (``step-0000120``) holds; 0 for none."""
    try:
        return int(ckpt.name.split("-")[1]) if ckpt is not None else 0
    except (IndexError, ValueError):
        return 0
