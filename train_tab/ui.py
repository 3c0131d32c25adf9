"""Train & Monitor tab: pick a model and stage, edit a preset's settings (validated live),
start / stop / resume / chain, and watch a run: status, loss and reward plots fed
incrementally by a timer, the latest sample grid and the log tail."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from hypersd_core.app.access import scrub_paths
from hypersd_core.app.choices import data_choices, model_choices
from hypersd_core.app.service import AppSettings
from hypersd_core.rewards.meaning import meaning_markdown
from ui_common.display import enlarge, image_classes, is_small, retile
from ui_common.guard import guard

from . import controller as ctl
from .run_tools import build_run_tools

POLL_SECONDS = 2.0
SAMPLE_COLS = 2  # the run's sample strip is shown as rows of two (each cell >= 256 px)
NO_RUN = "No runs yet: pick a stage and press Start."


@dataclass
class TrainTab:
    """Components other parts of the app wire to (page load reattaches to a run)."""

    run: gr.Dropdown
    offset: gr.State
    records: gr.State
    sample_name: gr.State
    poll_outputs: list
    timer: gr.Timer  # polls while the tab is shown (app.py switches it with the tabs)
    compare_run: gr.Button  # "Compare this run": app.py opens the Compare grid with it


def _first_preset(stage: str) -> str | None:
    presets = ctl.presets_for(stage)
    return presets[0] if presets else None


def build_train_tab(settings: AppSettings) -> TrainTab:
    """Build the tab's components and events inside the current Blocks."""
    disabled = settings.training_disabled_reason
    stages = ctl.stage_choices()
    stage0 = stages[0] if stages else None
    preset0 = _first_preset(stage0) if stage0 else None
    if disabled:
        gr.Markdown(f"> **{disabled}**")
    gr.Markdown(ctl.env_info())
    with gr.Row():
        model = gr.Dropdown(model_choices(settings), value=settings.model, label="Model",
                            interactive=not disabled)
        data = gr.Dropdown(data_choices(settings), value="digits", label="Training data",
                           interactive=not disabled)
        stage = gr.Dropdown(stages, value=stage0, label="Stage", interactive=not disabled)
        preset = gr.Dropdown(ctl.presets_for(stage0) if stage0 else [], value=preset0,
                             label="Preset", interactive=not disabled)
        init = gr.Dropdown(ctl.init_choices(settings), value="", label="Start from adapter",
                           interactive=not disabled)
    with gr.Row():
        editor = gr.Code(ctl.preset_text(preset0) if preset0 else "", language="yaml",
                         label="Settings (YAML; checked as you type)", interactive=not disabled,
                         lines=14, elem_id="train-settings")
        first = ctl.check_settings(ctl.preset_text(preset0) if preset0 else "", settings.model,
                                   "", "digits", settings)
        with gr.Column():
            check_md = gr.Markdown(first.message, elem_id="train-check")
            resolved = gr.Code(first.resolved, language="yaml", label="Resolved config",
                               interactive=False, lines=14)
    with gr.Row():
        start_btn = gr.Button("Start", variant="primary", interactive=not disabled,
                              elem_id="train-start")
        stop_btn = gr.Button("Stop", variant="stop", interactive=not disabled)
        resume_btn = gr.Button("Resume", interactive=not disabled)
        chain_steps = gr.Number(0, precision=0, minimum=0, label="Chain: steps per stage (0: presets')",
                                interactive=not disabled)
        chain_btn = gr.Button("Chain 8 → 4 → 2 → 1 → DMD", interactive=not disabled)
    action_md = gr.Markdown(elem_id="train-action")
    with gr.Row():
        run = gr.Dropdown(ctl.run_choices(settings), value=ctl.default_run(settings) or None,
                          label="Run (from disk)", scale=4, elem_id="train-run")
        refresh = gr.Button("Refresh list", scale=1, elem_id="train-refresh")
        compare_run = gr.Button("Compare this run", scale=1, elem_id="compare-this-run")
    status_md = gr.Markdown(elem_id="train-status")
    empty = ctl.plots_html([])
    loss_plot = gr.HTML(empty[0], elem_id="train-loss")
    with gr.Row():
        reward_plot = gr.HTML(empty[1], elem_id="train-reward")
        lr_plot = gr.HTML(empty[2], elem_id="train-lr")
    with gr.Accordion("What the reward scores mean (range, which way is better, known "
                      "failures)", open=False):
        gr.Markdown(meaning_markdown())
    with gr.Row():
        sample = gr.Image(label="Latest sample grid (fixed prompts)", format="png", type="pil",
                          interactive=False, elem_id="train-sample",
                          elem_classes=image_classes(settings.model, fill=False))
        log = gr.Textbox(label="Log tail (newest line last)", lines=ctl.LOG_LINES,
                         max_lines=ctl.LOG_LINES, autoscroll=True, elem_id="train-log")
    with gr.Accordion("This run's config.yaml", open=False):
        run_config = gr.Code(language="yaml", interactive=False)
    offset, records, sample_name = gr.State(0), gr.State([]), gr.State("")
    labels = gr.State(())  # the run list's labels last shown (updated when a state changes)
    timer = gr.Timer(POLL_SECONDS, active=False)

    def on_stage(stage_label):
        first = _first_preset(stage_label)
        return gr.Dropdown(choices=ctl.presets_for(stage_label), value=first), \
            ctl.preset_text(first) if first else ""

    def on_check(text, model_v, init_v, data_v):
        checked = ctl.check_settings(text, model_v, init_v or "", data_v, settings)
        return checked.message, checked.resolved

    def on_preset(preset_v):
        return ctl.preset_text(preset_v) if preset_v else ""

    # every control below is refused on the server while training is off (--public, a
    # Space): role "training" in hypersd_core/app/access.py
    check_inputs = [editor, model, init, data]
    stage.change(guard(on_stage, "training", settings), stage, [preset, editor],
                 api_name="train_stage", api_visibility="private")
    preset.input(guard(on_preset, "training", settings), preset, editor,
                 api_name="train_preset", api_visibility="private")
    for key, comp in (("settings", editor), ("model", model), ("init", init), ("data", data)):
        comp.change(guard(on_check, "training", settings), check_inputs, [check_md, resolved],
                    api_name=f"train_check_{key}", api_visibility="private",
                    trigger_mode="always_last", show_progress="hidden")

    def refresh_runs(selected):
        choices = ctl.run_choices(settings)
        ids = [c[1] for c in choices]
        value = selected if selected in ids else (ctl.default_run(settings) or None)
        return gr.Dropdown(choices=choices, value=value), \
            gr.Dropdown(choices=ctl.init_choices(settings))

    def act(fn, *args):
        """Run an action; a refusal becomes its one message (Markdown, below the buttons)."""
        try:
            return fn(*args)
        except ctl.ControlError as err:
            return None, scrub_paths(str(err))  # no server folders in what the page shows

    def on_start(text, model_v, init_v, data_v):
        new_run, msg = act(ctl.start, text, model_v, init_v or "", data_v, settings)
        return _after_action(new_run, msg)

    def on_chain(model_v, data_v, steps_v):
        new_run, msg = act(ctl.start_chain, model_v, data_v, int(steps_v or 0), settings)
        return _after_action(new_run, msg)

    def on_stop(run_id):
        _, msg = act(lambda: (None, ctl.stop(run_id, settings)))
        return msg

    def on_resume(run_id):
        _, msg = act(lambda: (None, ctl.resume(run_id, settings)))
        return msg

    def _after_action(new_run, msg):
        """The message, and the run list showing the new run; a refused action leaves the
        list as it is (no update at all: the list and its polling keep working)."""
        if new_run is None:
            return msg, gr.skip()
        return msg, gr.Dropdown(choices=ctl.run_choices(settings), value=new_run.dir.name)

    start_btn.click(guard(on_start, "training", settings), check_inputs, [action_md, run],
                    api_name="train_start", api_visibility="private")
    chain_btn.click(guard(on_chain, "training", settings), [model, data, chain_steps],
                    [action_md, run], api_name="train_chain", api_visibility="private")
    stop_btn.click(guard(on_stop, "training", settings), run, action_md,
                   api_name="train_stop", api_visibility="private")
    resume_btn.click(guard(on_resume, "training", settings), run, action_md,
                     api_name="train_resume", api_visibility="private")
    refresh.click(guard(refresh_runs, "public", settings), run, [run, init],
                  api_name="train_runs", api_visibility="private")

    poll_outputs = [status_md, loss_plot, reward_plot, lr_plot, sample, log, offset, records,
                    sample_name]

    def on_tick(run_id, offset_v, records_v, sample_v, labels_v):
        out = tick(settings, run_id, offset_v, records_v, sample_v)
        return (*out, *_relabel(settings, run_id, labels_v))

    timer.tick(guard(on_tick, "public", settings), [run, offset, records, sample_name, labels],
               [*poll_outputs, run, labels], api_name="train_poll", api_visibility="private",
               show_progress="hidden")

    def on_select(run_id):
        out = tick(settings, run_id, 0, [], "", force=True)
        cfg = ctl.resolved_config(run_id, settings) if run_id else ""
        return (*out, cfg)

    run.change(guard(on_select, "public", settings), run, [*poll_outputs, run_config],
               api_name="train_select_run", api_visibility="private", show_progress="hidden")
    build_run_tools(settings, run, timer)
    return TrainTab(run, offset, records, sample_name, poll_outputs, timer, compare_run)


def _relabel(settings: AppSettings, run_id: str | None, shown: tuple) -> tuple:
    """The run list again when a label changed (a run's state or step), else no update."""
    choices = ctl.run_choices(settings)
    labels = tuple(label for label, _ in choices)
    if labels == tuple(shown):
        return gr.skip(), gr.skip()
    return gr.Dropdown(choices=choices, value=run_id), labels


def tick(settings: AppSettings, run_id: str | None, offset: int, records: list,
         sample_name: str, force: bool = False) -> tuple:
    """One poll: status, plots (only when new metrics arrived), sample grid, log tail.

    Returns (status, loss plots, reward plot, lr plot, sample grid, log, offset, records,
    sample name); the plots are SVG in HTML.
    """
    empty = ctl.plots_html([])
    if not run_id:
        return (NO_RUN, *empty, None, "", 0, [], "")
    try:
        p = ctl.poll(run_id, offset, settings)
    except ctl.ControlError as err:
        return (str(err), *empty, None, "", 0, [], "")
    if p.reset:
        records = []
    records = records + p.records
    plots = ctl.plots_html(records) if (p.records or force) else (gr.skip(),) * 3
    sample_out = gr.skip()
    new_name = p.sample.name if p.sample else ""
    if new_name != sample_name or force:
        sample_out = sample_display(p.sample) if p.sample else None
    return (p.status, *plots, sample_out, p.log, p.offset, records, new_name)


def sample_display(path) -> Image.Image | None:
    """The run's sample strip for the screen, headed by the step it was drawn at:
    digits-sized cells in rows of two, each enlarged (nearest neighbour) to >= 256 px;
    SD-sized grids unchanged. Served through Gradio's cache: run folders are never exposed."""
    try:
        with Image.open(path) as im:
            strip = im.convert("RGB")
    except OSError:
        return None
    if is_small(strip, cell=strip.height):
        strip = enlarge(retile(strip, SAMPLE_COLS), cell=strip.height)
    return with_step(strip, ctl.checkpoint_step(Path(path).with_suffix("")))


def with_step(image: Image.Image, step: int, band: int = 22) -> Image.Image:
    """``image`` under a white band that says "step N"."""
    from PIL import ImageDraw

    out = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    out.paste(image, (0, band))
    ImageDraw.Draw(out).text((6, 5), f"step {step}", fill=(0, 0, 0))
    return out
