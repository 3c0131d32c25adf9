"""Train & Monitor, the reading side: a run's state as a person reads it, its label in the
run list, the status line, the loss / reward / learning-rate plots, the latest sample grid,
the log tail and incremental polling of its metrics. Nothing here starts or stops a run
(``controller.py`` does)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hypersd_core.app.service import AppSettings
from hypersd_core.training import chain
from hypersd_core.training.runs import Run, list_runs, pid_alive

LIVE_STATES = ("queued", "running", "stopping")
LOG_TAIL_BYTES = 6000
LOG_LINES = 14  # as many as the log box shows: the newest line is always in view


class ControlError(Exception):
    """A user action that cannot be done; its message is shown as is."""


def find_run(run_id: str, settings: AppSettings) -> Run:
    """A run by folder name, only among the runs under runs_dir (no paths from users)."""
    for run in list_runs(settings.runs_dir):
        if run.dir.name == run_id:
            return run
    raise ControlError(f"no run named {run_id!r} under {settings.runs_dir.name}/")


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
