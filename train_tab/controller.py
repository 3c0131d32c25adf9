"""Train & Monitor logic without widgets: presets, validation, start/stop/resume, chains
and incremental polling of a run folder. Every action goes through ``hypersd_core``
(runs, chain, config); the Gradio layer in ``ui.py`` only wires these to components.
"""

from __future__ import annotations

import os
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

OWNED_KEYS = ("model", "init_adapter", "data")  # chosen from server-built lists, never typed
LIVE_STATES = ("queued", "running", "stopping")
STAGE_LABELS = {"tscd": "TSCD", "lcm": "LCM (baseline)", "tcd": "TCD (baseline)",
                "feedback": "feedback (ReFL + perceptual)", "dmd": "DMD one-step"}
LOG_TAIL_BYTES = 6000
LOG_LINES = 14  # as many as the log box shows: the newest line is always in view
_START_LOCK = threading.Lock()  # Start and Chain in this process check-and-create in turn


class ControlError(Exception):
    """A user action that cannot be done; its message is shown as is."""


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
def find_run(run_id: str, settings: AppSettings) -> Run:
    """A run by folder name, only among the runs under runs_dir (no paths from users)."""
    for run in list_runs(settings.runs_dir):
        if run.dir.name == run_id:
            return run
    raise ControlError(f"no run named {run_id!r} under {settings.runs_dir.name}/")


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


# ------------------------------------------------------------------ polling
def shown_state(run: Run, status: dict | None = None) -> str:
    """The state as a person should read it: a queued run that waits for nothing (its
    process is being started, or is loading the model) is "starting"."""
    st = status if status is not None else run.status()
    state = st.get("state")
    if state == "queued" and not chain.waiting_note(run) and (
            pid_alive(st.get("pid")) or pid_alive(st.get("waiter_pid"))):
        return "starting"
    return state


def run_label(run: Run, status: dict | None = None) -> str:
    """'<run> · running' while it is live (the status line has its step), else with the step
    it ended at: the label changes when the state does, not at every step."""
    st = status if status is not None else run.status()
    state = shown_state(run, st)
    if state in (*LIVE_STATES, "starting"):
        return f"{run.dir.name} · {state}"
    return f"{run.dir.name} · {state} {st.get('step', 0)}/{st.get('total', 0)}"


def run_choices(settings: AppSettings) -> list[tuple[str, str]]:
    """(label, run id) for every run on disk, newest first; the label follows its state."""
    return [(run_label(run), run.dir.name) for run in list_runs(settings.runs_dir)]


def default_run(settings: AppSettings) -> str:
    """The run to show after a reload: the one training, else one waiting, else the newest."""
    runs = list_runs(settings.runs_dir)
    for wanted in (("running", "stopping"), ("queued",)):
        for run in runs:
            if run.status().get("state") in wanted:
                return run.dir.name
    return runs[0].dir.name if runs else ""


def status_text(run: Run) -> str:
    """One Markdown paragraph: state, step/total, it/s, ETA, memory, error or wait reason."""
    st = run.status()
    parts = [f"**{run.dir.name}**", f"state **{shown_state(run, st)}**",
             f"step {st.get('step', 0)}/{st.get('total', 0)}"]
    if st.get("it_s"):
        parts.append(f"{st['it_s']:.2f} it/s")
    if st.get("state") in ("running", "stopping"):
        eta = st.get("eta_s")
        parts.append(f"ETA {_duration(eta)}" if eta is not None else "ETA: measuring speed")
    mem = memory_text(st)
    if mem:
        parts.append(mem)
    text = " · ".join(parts)
    note = chain.waiting_note(run)
    if note:
        text += f"\n\n{note}"
    if st.get("error"):
        text += f"\n\n**error:** {st['error']}"
    return text


def memory_text(status: dict) -> str:
    """Device memory: CUDA peak from the trainer, else the process's resident memory."""
    if status.get("mem_gb"):
        return f"GPU memory {status['mem_gb']:.2f} GB"
    pid = status.get("pid")
    if status.get("state") in ("running", "stopping") and pid_alive(pid):
        try:
            for line in Path(f"/proc/{int(pid)}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return f"memory {int(line.split()[1]) / 2**20:.2f} GB (CPU, resident)"
        except OSError:
            return ""
    return ""


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def metric_series(records: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per step: "loss" (the total and each term), "reward" (score per reward) and "lr"."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {"loss": {}, "reward": {}, "lr": {}}
    for r in records:
        step = r.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in r.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key.startswith("reward/"):
                group, name = "reward", key.removeprefix("reward/")
            elif key == "loss" or key.startswith("loss_"):
                group, name = "loss", key
            elif key == "lr":
                group, name = "lr", "learning rate"
            else:
                continue
            out[group].setdefault(name, []).append((float(step), float(value)))
    return out


def loss_panels(loss: dict[str, list[tuple[float, float]]]) -> dict[str, list]:
    """The loss terms worth a panel: the total, and each term unless it equals the total
    (a stage with one term logs it twice)."""
    total = dict(loss.get("loss", []))
    out = {"loss": loss["loss"]} if "loss" in loss else {}
    for name, points in loss.items():
        if name == "loss":
            continue
        if total and all(abs(total.get(x, float("nan")) - y) <= 1e-12 * max(1.0, abs(y))
                         for x, y in points):
            continue
        out[name] = points
    return out


def plots_html(records: list[dict]) -> tuple[str, str, str]:
    """SVG plots (HTML) of a run's metrics: loss per term, reward scores, learning rate."""
    from .plots import svg_plot

    series = metric_series(records)
    panels = loss_panels(series["loss"])
    loss = "".join(svg_plot({name: points}, "total loss" if name == "loss" else name,
                            y_label="loss", plot_id=f"loss:{name}")
                   for name, points in panels.items())
    loss = f'<div class="hsd-plots" id="loss-plots">{loss or svg_plot({}, "Loss", plot_id="loss")}</div>'
    reward = svg_plot(series["reward"], "Reward scores of the fixed sample prompts",
                      y_label="score", plot_id="reward",
                      empty_text="no reward scores logged (set reward_every, or a feedback stage)")
    lr = svg_plot(series["lr"], "Learning rate", y_label="lr", plot_id="lr")
    return loss, reward, lr


def latest_sample(run: Run) -> Path | None:
    """Newest sample grid PNG of the run."""
    files = sorted(run.samples_dir.glob("step-*.png")) if run.samples_dir.is_dir() else []
    return files[-1] if files else None


def log_tail(run: Run, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The newest lines of the run's log, as a terminal shows them (a progress bar's
    redraws collapse into its latest state)."""
    if not run.log_path.is_file():
        return ""
    size = run.log_path.stat().st_size
    with open(run.log_path, "rb") as f:
        f.seek(max(0, size - max_bytes))
        text = f.read().decode("utf-8", "replace")
    lines = []
    for line in text.split("\n"):  # a progress bar redraws itself with "\r": keep what a
        parts = [p for p in line.split("\r") if p.strip()]  # terminal shows, its last state
        if parts:
            lines.append(parts[-1].rstrip())
    return "\n".join(lines[-LOG_LINES:])


@dataclass
class Poll:
    """What one timer tick found: new metric records since ``offset``, and the run's state."""

    status: str
    records: list[dict]
    offset: int
    sample: Path | None
    log: str
    live: bool
    reset: bool = False


def poll(run_id: str, offset: int, settings: AppSettings) -> Poll:
    """Read what changed in a run since byte ``offset`` of its metrics stream."""
    run = find_run(run_id, settings)
    size = run.metrics_path.stat().st_size if run.metrics_path.is_file() else 0
    reset = size < offset  # a resume truncated the stream: read it again from the start
    records, new_offset = run.read_metrics(0 if reset else offset)
    live = run.status().get("state") in LIVE_STATES
    return Poll(status_text(run), records, new_offset, latest_sample(run), log_tail(run), live,
                reset)


def resolved_config(run_id: str, settings: AppSettings) -> str:
    """A run's saved config.yaml text."""
    return find_run(run_id, settings).config_path.read_text()


def env_info() -> str:
    """Where training runs: the device a new run would use."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"device: {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"device: CPU ({os.cpu_count()} cores)"
