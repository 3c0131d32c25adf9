"""What the Train & Monitor tab says about one run, started alone, through start, stop and
resume: never "queued" behind a chain, the run list's label follows the state, resume
shows the step it resumes from with no stale ETA, the log tail ends with the newest line,
and no STOP flag is left in the run folder."""

from __future__ import annotations

import gradio as gr
import pytest
from test_app import _settings_text, _wait, free_port, make_tiny_digits


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    from hypersd_core.app.service import AppSettings

    root = tmp_path_factory.mktemp("status")
    model = make_tiny_digits(root / "tiny")
    mp = pytest.MonkeyPatch()
    mp.setattr("hypersd_core.models.backbone.DIGITS_ADAPTERS", root / "no-adapters")
    yield AppSettings.from_env(model=str(model), runs_dir=root / "runs",
                               study_db=root / "study" / "votes.db", lora_dir=root / "loras",
                               models_dir=root / "models", data_dir=root / "data",
                               port=free_port())
    mp.undo()


def _label(settings, run) -> str:
    from train_tab import controller as ctl

    return dict((rid, label) for label, rid in ctl.run_choices(settings))[run.dir.name]


def test_single_run_status_through_start_stop_resume(settings):
    from train_tab import controller as ctl
    from train_tab.ui import _relabel

    run, msg = ctl.start(_settings_text(100000), settings.model, "", "digits", settings)
    assert msg.startswith("Started run")
    seen = []

    def look():
        text = ctl.status_text(run)
        seen.append((text, _label(settings, run)))
        return run.status().get("state") == "running" and run.status().get("step", 0) >= 2

    _wait(look, 600, "the run to train two steps")
    # alone on the device: never queued, never waiting for a previous stage
    assert not any("queued" in t or "waits" in t or "queued" in lb for t, lb in seen), seen
    assert any("state **starting**" in t for t, _ in seen) or "state **running**" in seen[0][0]
    assert _label(settings, run).endswith(" · running")

    # the tab's run list is sent again when a label changed, not at every tick
    update, labels = _relabel(settings, run.dir.name, ())
    assert isinstance(update, gr.Dropdown) and any(run.dir.name in lb for lb in labels)
    assert not isinstance(_relabel(settings, run.dir.name, labels)[0], gr.Dropdown)

    ctl.stop(run.dir.name, settings)
    _wait(lambda: run.status()["state"] == "stopped", 600, "the run to stop")
    stopped_at = run.status()["step"]
    assert " · stopped " in _label(settings, run)
    _wait(lambda: not run.stop_path.exists(), 30, "the spent STOP flag to be removed")
    ckpt = run.latest_checkpoint()
    assert ckpt is not None and ctl.checkpoint_step(ckpt) == stopped_at

    # the log tail ends with the newest line of the log, as a terminal shows it
    tail = ctl.log_tail(run).splitlines()
    raw = run.log_path.read_text().replace("\r", "\n").rstrip().splitlines()
    assert tail and tail[-1].strip() == raw[-1].strip()
    assert len(tail) <= ctl.LOG_LINES

    old_eta = run.status().get("eta_s")
    assert old_eta is not None
    msg = ctl.resume(run.dir.name, settings)
    assert msg.startswith("Resuming") and ckpt.name in msg
    # at once: the resumed step, and no ETA from the previous process
    text = ctl.status_text(run)
    assert f"step {stopped_at}/" in text and "queued" not in text, text
    assert "ETA" not in text or "measuring" in text, text
    states = []

    def resumed():
        text = ctl.status_text(run)
        states.append(text)
        assert "step 0/" not in text, states  # never back to step 0 while it loads
        return run.status().get("state") == "running" and run.status().get("step", 0) > stopped_at

    _wait(resumed, 600, "the resumed run to train on")
    assert not any("queued" in t for t in states), states
    assert not run.stop_path.exists()  # the previous stop's flag is gone
    assert _label(settings, run).endswith(" · running")

    ctl.stop(run.dir.name, settings)
    _wait(lambda: run.status()["state"] == "stopped", 600, "the resumed run to stop")
    _wait(lambda: not run.stop_path.exists(), 30, "no STOP file after the second stop")
