"""Start and the settings editor, without training anything (the chain driver is replaced
by one that only records itself, so runs stay queued):

- a refused Start gives one message and leaves the run list as it was, so the next poll
  of the list still works;
- Start is idempotent (a double click makes one run) and truthful ("Queued", naming the
  run ahead, whenever one is; runs start in the order they were created);
- the editor lists every error at once, accepts a pasted shipped preset, and says what
  it does with the preset's model line;
- the Rewards and Compare tabs explain the scores they show.
"""

from __future__ import annotations

import os
import warnings

import gradio as gr
import pytest
import yaml
from test_app import free_port

BAD = "lr: fast\nsteps: -5\n"


@pytest.fixture()
def settings(tmp_path):
    from hypersd_core.app.service import AppSettings

    return AppSettings.from_env(model="digits", runs_dir=tmp_path / "runs",
                                study_db=tmp_path / "study" / "votes.db",
                                lora_dir=tmp_path / "loras", models_dir=tmp_path / "models",
                                data_dir=tmp_path / "data", port=free_port())


@pytest.fixture()
def no_driver(monkeypatch):
    """spawn_driver without a process: the runs are marked as held by this (live) process,
    as a driver that is still starting up would hold them."""
    from hypersd_core.training import chain

    spawned = []

    def fake(runs, runs_root):
        for run in runs:
            run.write_status(waiter_pid=os.getpid())
        spawned.append([r.dir.name for r in runs])

    monkeypatch.setattr(chain, "spawn_driver", fake)
    return spawned


def _text(**changes) -> str:
    from train_tab import controller as ctl

    values = yaml.safe_load(ctl.preset_text("digits-tscd-k8"))
    values.update(changes)
    return yaml.safe_dump(values)


# ------------------------------------------------------------------ item 1
def test_refused_start_gives_one_message_and_leaves_the_run_list_working(settings, tmp_path,
                                                                         monkeypatch):
    import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-tmp"))
    demo = app.build_demo(settings)
    try:
        block = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_start")
        run_list = block.outputs[1]
        assert isinstance(run_list, gr.Dropdown)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            msg, update = block.fn(_text(lr="fast", steps=-5), "digits", "", "digits")
        toasts = [w for w in caught if "settings" in str(w.message).lower()
                  or "lr" in str(w.message)]
        assert not toasts, [str(w.message) for w in toasts]  # no toast beside the message
        assert "lr" in msg and "steps" in msg  # the one message names both problems
        # what the page holds next, and sends with the next poll of the list: unchanged
        shown = run_list.value
        if isinstance(update, gr.Dropdown):
            shown = update.value
        elif isinstance(update, dict) and "value" in update:
            shown = update["value"]
        run_list.preprocess(shown)  # raised "not in the list of choices" on every poll
    finally:
        demo.hypersd["store"].close()


# ------------------------------------------------------------------ item 7
def test_double_start_makes_one_run(settings, no_driver):
    from hypersd_core.training.runs import list_runs
    from train_tab import controller as ctl

    first, msg1 = ctl.start(_text(steps=50), "digits", "", "digits", settings)
    again, msg2 = ctl.start(_text(steps=50), "digits", "", "digits", settings)
    assert again.dir == first.dir
    assert "already" in msg2 and "not started again" in msg2
    assert len(list_runs(settings.runs_dir)) == 1 and len(no_driver) == 1
    # the chain button twice: one chain
    ctl.start_chain("digits", "digits", 3, settings)
    n = len(list_runs(settings.runs_dir))
    ctl.start_chain("digits", "digits", 3, settings)
    assert len(list_runs(settings.runs_dir)) == n


def test_start_says_queued_when_a_run_is_ahead(settings, no_driver):
    from hypersd_core.training import chain
    from train_tab import controller as ctl

    first, msg1 = ctl.start(_text(steps=50), "digits", "", "digits", settings)
    assert msg1.startswith("Started run")
    second, msg2 = ctl.start(_text(steps=60), "digits", "", "digits", settings)
    assert msg2.startswith("Queued run"), msg2
    assert first.dir.name in msg2
    assert second.status()["waiting_for"] == first.dir.name
    assert ctl.shown_state(second) == "queued"  # not "starting" while it waits
    # runs start in the order they were created: the first is ahead of the second, not back
    assert chain.run_ahead(settings.runs_dir, second).dir == first.dir
    assert chain.run_ahead(settings.runs_dir, first) is None


# ------------------------------------------------------------------ item 8
def test_every_settings_error_is_listed():
    from hypersd_core.training.config import ConfigError, make_config

    with pytest.raises(ConfigError) as err:
        make_config({"steps": -5, "lr": "fast", "lora_rank": 0, "no_such_key": 1})
    text = " | ".join(err.value.errors)
    for key in ("steps", "lr", "lora_rank", "no_such_key"):
        assert key in text, text
    assert len(err.value.errors) == 4  # lr's default is not reported as a second lr problem


def test_pasted_shipped_preset_is_accepted(settings):
    from hypersd_core.training.config import preset_path
    from train_tab import controller as ctl

    pasted = preset_path("digits-tscd-k8").read_text()  # with its `model: digits` line
    checked = ctl.check_settings(pasted, "digits", "", "digits", settings)
    assert checked.errors == [] and checked.config is not None
    assert checked.notes == []  # the same model as the dropdown: nothing to say
    # another model in the dropdown: still accepted, and the message says which one trains
    other = str(settings.models_dir / "sd15")
    (settings.models_dir / "sd15").mkdir(parents=True)
    (settings.models_dir / "sd15" / "model_index.json").write_text("{}")
    checked = ctl.check_settings(pasted, other, "", "digits", settings)
    assert checked.config is not None and checked.config.model == other
    assert "model: digits is not used" in checked.notes[0] and other in checked.notes[0]
    # a typed path never reaches the config
    typed = ctl.check_settings("init_adapter: /etc/passwd\n", "digits", "", "digits", settings)
    assert typed.config is not None and typed.config.init_adapter == ""
    assert any("init_adapter" in n for n in typed.notes)


def test_settings_messages_are_markdown(settings):
    from train_tab import controller as ctl

    checked = ctl.check_settings(BAD + "lora_rank: 0\n'**x**': 1\n", "digits", "", "digits",
                                 settings)
    lines = checked.message.splitlines()
    assert lines[0].startswith("**Fix these 4 problems")
    assert [ln[:2] for ln in lines[1:]] == ["- "] * 4  # one bullet per problem
    assert any("lora_rank must be" in ln for ln in lines)
    assert any(r"\*\*x\*\*" in ln for ln in lines)  # a typed key cannot turn into bold text


# ------------------------------------------------------------------ item 5
def test_the_app_explains_the_scores_it_shows(settings, tmp_path, monkeypatch):
    import app
    from compare_tab.compare import scores_explained as compare_explained
    from train_tab.rewards_view import scores_explained as rewards_explained

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-tmp"))
    demo = app.build_demo(settings)
    try:
        shown = {c.elem_id: c.value for c in demo.blocks.values()
                 if isinstance(c, gr.Markdown) and c.elem_id}
    finally:
        demo.hypersd["store"].close()
    for where in ("rewards-meaning", "compare-meaning", "rewards-meaning-all"):
        text = str(shown.get(where, ""))
        assert "**digits-quality** (higher is better; 0 to 1)" in text, where
        assert "gamed" in text and "digits-alignment" in text, where
    assert "**seconds**" in str(shown["compare-meaning"])
    # the explanation follows the rewards chosen
    assert "clip-score" in compare_explained(["clip-score"])
    assert "digits-quality" not in rewards_explained(["clip-score"])
