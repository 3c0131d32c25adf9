"""Train & Monitor, below the live view: every sample grid of the run by step, the loss
of several runs on one plot with optional smoothing, and the run's files to download."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from hypersd_core.app.service import AppSettings
from hypersd_core.training.curves import overlay
from hypersd_core.training.export import export_run
from hypersd_core.training.runs import list_runs
from ui_common.display import image_classes
from ui_common.guard import guard

from . import controller as ctl


def sample_grids(run_id: str | None, settings: AppSettings) -> list[Path]:
    """The run's sample grids, oldest first ([] when there is no such run)."""
    if not run_id:
        return []
    try:
        run = ctl.find_run(run_id, settings)
    except ctl.ControlError:
        return []
    return sorted(run.samples_dir.glob("step-*.png")) if run.samples_dir.is_dir() else []


def grid_step(path: Path) -> int:
    """The training step a grid file (``step-0000100.png``) was drawn at."""
    return ctl.checkpoint_step(path.with_suffix(""))


def grid_view(run_id: str | None, index: float | None, settings: AppSettings):
    """The grid at ``index`` (1-based; 0 or None: the newest) with its step."""
    from .ui import sample_display

    grids = sample_grids(run_id, settings)
    if not grids:
        return gr.Image(value=None, label="Sample grid (none written yet)")
    i = len(grids) if not index else min(max(int(index), 1), len(grids))
    path = grids[i - 1]
    return gr.Image(value=sample_display(path),
                    label=f"Sample grid at step {grid_step(path)} ({i} of {len(grids)})")


def overlay_html(run_ids: list[str] | None, weight: float, settings: AppSettings) -> str:
    """One SVG plot of the total loss of the chosen runs, smoothed with ``weight``."""
    from .plots import svg_plot

    runs = [r for r in list_runs(settings.runs_dir) if r.dir.name in (run_ids or [])]
    title = "Total loss" + (f" (smoothed, weight {weight:.2f})" if weight else "")
    return svg_plot(overlay(runs, "loss", float(weight or 0.0)), title, y_label="loss",
                    plot_id="overlay", empty_text="choose runs with logged losses")


def run_files(run_id: str | None, settings: AppSettings) -> list[str]:
    """The run's adapter (diffusers and kohya), metrics, config and sample grids, copied to
    a fresh temporary folder (run folders themselves are never served)."""
    if settings.public:
        raise gr.Error("downloads of runs are off in a public app (--public)")
    if not run_id:
        raise gr.Error("choose a run first")
    try:
        run = ctl.find_run(run_id, settings)
    except ctl.ControlError as err:
        raise gr.Error(str(err)) from None
    folder = Path(tempfile.mkdtemp(prefix="hypersd-run-"))
    try:
        files = export_run(run, folder)
    except ValueError as err:
        raise gr.Error(str(err)) from None
    if not files:
        raise gr.Error(f"run {run_id} has no files to download yet")
    return [str(f) for f in files]


def build_run_tools(settings: AppSettings, run: gr.Dropdown, timer: gr.Timer) -> None:
    """The sample history, the overlaid curves and the downloads, wired to ``run``."""
    with gr.Accordion("Sample grids: every grid of this run, by step", open=True):
        index = gr.Slider(0, 1, value=0, step=1, label="Grid (the image says its step)",
                          elem_id="sample-history-slider")
        grid = gr.Image(label="Sample grid", format="png", type="pil", interactive=False,
                        elem_id="sample-history",
                        elem_classes=image_classes(settings.model, fill=False))
        count = gr.State(0)
    with gr.Accordion("Loss of several runs on one plot", open=False):
        with gr.Row():
            runs = gr.CheckboxGroup([r for _, r in ctl.run_choices(settings)],
                                    label="Runs to overlay", scale=3, elem_id="overlay-runs")
            weight = gr.Slider(0, 0.99, value=0.0, step=0.01, scale=1,
                               label="Loss smoothing (EMA weight; 0: off)")
        plot = gr.HTML(elem_id="train-overlay")
    with gr.Accordion("Download this run", open=False):
        gr.Markdown("The adapter in diffusers and kohya form (and its EMA when the run kept "
                    "one), metrics.jsonl, config.yaml and every sample grid (zip).")
        prepare = gr.Button("Prepare this run's files", elem_id="run-downloads-button")
        files = gr.File(label="Files", file_count="multiple", interactive=False,
                        elem_id="run-downloads")

    def on_run(run_id):
        n = len(sample_grids(run_id, settings))
        ids = [r for _, r in ctl.run_choices(settings)]
        chosen = [run_id] if run_id in ids else []
        return (gr.Slider(minimum=0, maximum=max(n, 1), value=n),
                grid_view(run_id, None, settings), n,
                gr.CheckboxGroup(choices=ids, value=chosen), None)

    def on_tick(run_id, index_v, count_v):
        """New grids while a run trains: the slider grows; it follows the newest grid when
        it was on the newest."""
        n = len(sample_grids(run_id, settings))
        if n == count_v:
            return gr.skip(), gr.skip(), gr.skip()
        follow = not index_v or int(index_v) >= count_v
        value = n if follow else int(index_v)
        return (gr.Slider(maximum=max(n, 1), value=value),
                grid_view(run_id, value, settings) if follow else gr.skip(), n)

    def on_index(run_id, index_v):
        return grid_view(run_id, index_v, settings)

    def on_overlay(run_ids, weight_v):
        return overlay_html(run_ids, weight_v, settings)

    def on_prepare(run_id):
        return run_files(run_id, settings)

    # reading finished runs is public (a Space shows them); guard: ui_common/guard.py
    run.change(guard(on_run, "public", settings), run, [index, grid, count, runs, files],
               api_name="runs_select", api_visibility="private", show_progress="hidden")
    timer.tick(guard(on_tick, "public", settings), [run, index, count], [index, grid, count],
               api_name="runs_poll", api_visibility="private", show_progress="hidden")
    index.release(guard(on_index, "public", settings), [run, index], grid,
                  api_name="runs_grid", api_visibility="private", show_progress="hidden")
    for key, comp in (("runs", runs), ("weight", weight)):
        comp.change(guard(on_overlay, "public", settings), [runs, weight], plot,
                    api_name=f"runs_overlay_{key}", api_visibility="private",
                    show_progress="hidden")
    prepare.click(guard(on_prepare, "public", settings), run, files, api_name="runs_files",
                  api_visibility="private")
