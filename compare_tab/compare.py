"""The Compare tab (Generate is in generate.py): the methods x steps grid
(teacher / LCM / TCD / Hyper-SD N-step / Hyper-SD unified, plus official LoRA files
the user has) with time and reward scores per cell and a slider for any two cells.

A public API endpoint: ``/compare``.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import pandas as pd
from PIL import Image, ImageDraw

from hypersd_core.app import limits
from hypersd_core.app.arms import LORA_RECIPES, ArmError, arm_choices, resolve_arm
from hypersd_core.app.choices import (
    default_rewards,
    reward_choices,
    unavailable_text,
)
from hypersd_core.app.service import (
    COMPARE_METHODS,
    COMPARE_STEPS,
    AppSettings,
    Cell,
    ModelService,
    compare_grid,
    default_adapter_name,
)
from hypersd_core.app.zerogpu import gpu, image_steps, request_seconds
from hypersd_core.rewards.meaning import SECONDS, meaning_markdown
from ui_common.display import enlarge, image_classes, img_tag
from ui_common.guard import guard

from .exports import compare_files

MAX_PROMPTS = 4
ROW_LABELS = {"teacher": "teacher", "lcm": "LCM", "tcd": "TCD", "hypersd": "Hyper-SD N-step",
              "hypersd-unified": "Hyper-SD unified", "hypersd-unet": "Hyper-SD one-step UNet"}
GPU = {"concurrency_id": "gpu", "concurrency_limit": 1}
GRID_KEY = "__grid__"  # the cells of the last grid, in the images state (not a slider choice)
CONTROL_PX = 128  # the control image above a controlled grid (a 32 px mask, 4x, pixelated)


def steps_text(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def row_adapters(method: str, label: str) -> str:
    """What a row runs with: its adapters over the grid's step counts, or the base model."""
    if method == "teacher":
        return "base model, CFG"
    if "[shipped" in label:
        return f"shipped adapter, {method} recipe"
    if " steps, " in label:  # a finished run: "<run> [<stage>, <n> steps, <recipe>]"
        return f"your run's final adapter, {method} recipe"
    if "[" in label:  # a LoRA file or UNet row
        return f"file from the LoRA folder, {method} recipe"
    names = dict.fromkeys(default_adapter_name(method, n) for n in COMPARE_STEPS)
    names.pop(None, None)
    return "adapter " + " / ".join(names) if names else "no adapter"


def grid_html(cells: list[Cell], prompts: list[str], control: dict | None = None) -> str:
    """The grid as a table: a header row of step counts, a header column of methods (with
    their adapters), the teacher reference first at the size of a cell. Times and scores
    are in the table below; a cell that could not be made says why. A grid made under
    ControlNet control says so above it, with its control image and scale."""
    if not cells:
        return ""
    head_note = control_html(control) if control else ""
    reference = [c for c in cells if c.label == "teacher (reference)"]
    grid = [c for c in cells if c not in reference]
    head = "<tr><th></th>" + "".join(f"<th>{steps_text(n)}</th>" for n in COMPARE_STEPS) + "</tr>"
    out = [head_note, '<table class="hsd-grid" id="compare-grid"><tbody>']

    def cell_td(c: Cell) -> str:
        if c.image is None:
            return (f'<td><div class="note" style="width:256px;height:64px">'
                    f"{html.escape(c.error)}</div></td>")
        return f"<td>{img_tag(c.image, f'{c.label or c.method}, {steps_text(c.steps)}')}</td>"

    for prompt in prompts:
        suffix = f"<br><small>{html.escape(prompt)}</small>" if len(prompts) > 1 else ""
        for ref in (r for r in reference if r.prompt == prompt):  # above the step columns
            out.append(f'<tr><th class="row">teacher, {ref.steps} steps<br><small>reference'
                       f"</small>{suffix}</th>{cell_td(ref)}</tr>")
        out.append(head)
        rows: dict[str, list[Cell]] = {}
        for c in grid:
            if c.prompt == prompt:
                rows.setdefault(c.label or c.method, []).append(c)
        for label, row in rows.items():
            out.append(f'<tr><th class="row">{html.escape(label)}<br><small>'
                       f"{html.escape(row_adapters(row[0].method, label))}</small>{suffix}</th>")
            out.extend(cell_td(c) for c in row)
            out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def control_html(control: dict) -> str:
    """The line above a controlled grid: what controls it, at a size a person can read."""
    image, scale = control["image"], control["scale"]
    return ('<div class="hsd-control" id="compare-control-note" style="display:flex;'
            'gap:12px;align-items:center;margin-bottom:8px">'
            f"{img_tag(image, 'control image', width=CONTROL_PX)}"
            f"<p><b>Under ControlNet control:</b> every cell below is generated with this "
            f"control image (white: where the digit's ink goes) at conditioning scale "
            f"<b>{scale:g}</b>.</p></div>")


def placeholder(size: int, text: str) -> Image.Image:
    """A grey tile standing for a cell that could not be generated."""
    tile = Image.new("RGB", (size, size), (200, 200, 200))
    ImageDraw.Draw(tile).text((2, size // 2 - 5), "n/a", fill=(80, 80, 80))
    return tile


def cells_table(cells: list[Cell]) -> pd.DataFrame:
    """One row per cell: method, steps, prompt, seconds, reward scores, note."""
    rows = []
    for c in cells:
        row = {"method": c.label or c.method, "steps": c.steps, "prompt": c.prompt,
               "seconds": round(c.seconds, 3) if c.image is not None else None}
        row.update({k: round(v, 4) for k, v in c.scores.items()})
        row["note"] = c.error
        rows.append(row)
    return pd.DataFrame(rows)


def method_rows(loras: list[str] | None, settings: AppSettings,
                service: ModelService | None = None,
                recipe: str | None = None) -> list[tuple[str, str | None, str]]:
    """(recipe, adapter file, label) rows: the five methods, the one-step UNet when the
    model has one, then each chosen arm (hypersd_core/app/arms.py: a finished run, a
    shipped adapter, a LoRA file or UNet; ``recipe`` for files whose recipe is unknown)."""
    rows = [(m, None, ROW_LABELS[m]) for m in COMPARE_METHODS]
    if service is not None and service.has_onestep_unet():
        rows.append(("hypersd-unet", None, ROW_LABELS["hypersd-unet"]))
    for key in loras or []:
        try:
            arm = resolve_arm(key, settings, recipe or None)
        except ArmError as err:
            raise gr.Error(str(err)) from None
        rows.append((arm.recipe, arm.adapter, arm.label))
    return rows


def run_compare(service: ModelService, settings: AppSettings, prompts_text: str, seed: float,
                loras: list[str] | None, rewards: list[str] | None, control_image=None,
                control_scale: float = 1.0, recipe: str | None = None):
    """Grid cells for up to MAX_PROMPTS prompts; returns (reference, gallery, table, summary, images)."""
    try:  # bounded before anything is generated (hypersd_core/app/limits.py)
        prompts = limits.prompt_lines(prompts_text, MAX_PROMPTS)
        seeds = [limits.check_seed(seed)] * len(prompts)
    except ValueError as err:
        raise gr.Error(str(err)) from None
    if not prompts:
        raise gr.Error("enter a prompt")
    try:
        cells, reward_errors, seconds = compare_grid(
            service, prompts, seeds, method_rows(loras, settings, service, recipe), COMPARE_STEPS,
            rewards or [], control_image=control_image, control_scale=control_scale)
    except FileNotFoundError as err:  # the base model itself is missing
        raise gr.Error(str(err)) from None
    if all(c.image is None for c in cells):  # a failure, not a grid of placeholders
        raise gr.Error(f"none of the {len(cells)} cells could be generated: {cells[0].error}")
    size = next((c.image.width for c in cells if c.image is not None), 64)
    reference = [c for c in cells if c.label == "teacher (reference)"]
    grid = [c for c in cells if c not in reference]
    order = sorted(grid, key=lambda c: (c.prompt != prompts[0], prompts.index(c.prompt)))
    gallery = [(c.image or placeholder(size, c.error), f"{c.caption}" +
                (f" · {c.prompt}" if len(prompts) > 1 else "")) for c in order]
    images = {f"{c.label or c.method} · {steps_text(c.steps)} · {c.prompt}": c.image
              for c in cells if c.image is not None}
    control = ({"image": control_image, "scale": control_scale} if control_image is not None
               else None)
    images[GRID_KEY] = {"cells": cells, "prompts": prompts, "control": control}
    summary = (f"{len(cells)} cells ({len(grid)} grid + {len(reference)} reference) in "
               f"{seconds:.1f} s on {service.device}.")
    if control is not None:
        summary = (f"**Under ControlNet control** (conditioning scale {control_scale:g}; the "
                   f"control image is shown above the grid). {summary}")
    summary += "".join(f"\n- reward **{k}** unavailable: {v}" for k, v in reward_errors.items())
    summary += f"\n\nReference: {reference[0].caption}"
    return reference[0].image, gallery, cells_table(cells), summary, images


@dataclass
class CompareTab:
    """What the rest of the app wires to: the rows picker, and ``then_compare`` which runs
    the grid after another event (Train & Monitor's "Compare this run")."""

    rows: gr.CheckboxGroup
    then_compare: Callable


def row_choices(settings: AppSettings) -> list[tuple[str, str]]:
    """Rows the grid can add: finished runs, shipped adapters, LoRA files and UNets."""
    return arm_choices(settings)


def scores_explained(rewards: list[str] | None) -> str:
    """What the grid's numbers mean (time, and each chosen reward), under its table."""
    return ("**What the numbers mean** (captions drop the digits- prefix)\n\n"
            + meaning_markdown(rewards or [], extra=(SECONDS,)))


def build_compare_tab(settings: AppSettings, service: ModelService) -> CompareTab:
    """The methods x steps grid: the ``/compare`` endpoint, plus a slider for two cells."""
    with gr.Row():
        prompts = gr.Textbox("a red handwritten digit 7", lines=2, scale=3,
                             label=f"Prompt (or up to {MAX_PROMPTS}, one per line)")
        seed = gr.Number(0, precision=0, label="Seed")
    with gr.Row():
        with gr.Column(scale=3):
            loras = gr.CheckboxGroup(row_choices(settings), elem_id="compare-rows", label=(
                "Rows to add beside teacher / LCM / TCD / Hyper-SD: your finished runs, the "
                f"shipped adapters, LoRA files and one-step UNets (from {settings.lora_dir.name}/)"))
            with gr.Row():
                recipe = gr.Dropdown(list(LORA_RECIPES), value="hypersd-unified", scale=3,
                                     label="Recipe for LoRA files whose recipe is unknown")
                refresh = gr.Button("Refresh rows", scale=1)
        rewards = gr.CheckboxGroup(reward_choices(), value=default_rewards(), label="Rewards",
                                   scale=2)
    with gr.Accordion("Rewards not offered here (weights not found)", open=False,
                      visible=bool(unavailable_text())):
        gr.Markdown(unavailable_text())
    from .control import build_control_block, control_from_inputs

    sketch, pick, scale, preview = build_control_block(settings)
    with gr.Row(elem_id="compare-buttons"):
        go = gr.Button("Compare", variant="primary", elem_id="compare-button")
        go_control = gr.Button("Compare under control (settings above)",
                               elem_id="compare-control-button")
    summary = gr.Markdown(label="summary")
    grid_view = gr.HTML(elem_id="compare-grid-view")
    table = gr.Dataframe(label="Cells: time and reward scores", interactive=False)
    meaning = gr.Markdown(scores_explained(default_rewards()), elem_id="compare-meaning")
    rewards.change(guard(scores_explained, "public", settings), rewards, meaning,
                   api_name="compare_meaning", api_visibility="private", show_progress="hidden")
    with gr.Accordion("The cells as image files (what the /compare endpoint returns)",
                      open=False):
        with gr.Row():
            reference = gr.Image(label="Teacher, 25 steps (reference)", format="png",
                                 type="pil", interactive=False, height=256, scale=1,
                                 elem_classes=image_classes(service.model))
            gallery = gr.Gallery(label="Rows: teacher / LCM / TCD / Hyper-SD N-step / Hyper-SD "
                                 "unified; columns: 1 / 2 / 4 / 8 steps",
                                 columns=len(COMPARE_STEPS), format="png", object_fit="contain",
                                 height="auto", scale=3,
                                 elem_classes=image_classes(service.model, fill=False))
    images = gr.State({})
    with gr.Row():
        left = gr.Dropdown([], label="Slider: left cell")
        right = gr.Dropdown([], label="Slider: right cell")
    slider = gr.ImageSlider(label="Compare two cells", type="pil", format="png",
                            elem_classes=image_classes(service.model, fill=False))
    with gr.Row():
        csv_file = gr.DownloadButton("Download the table (CSV)", visible=False,
                                     elem_id="compare-download-csv")
        png_file = gr.DownloadButton("Download the grid (PNG)", visible=False,
                                     elem_id="compare-download-png")

    def grid_work(prompts_text, seed, loras_v, *rest) -> int:
        """Image-steps of the request: every row at 1/2/4/8 steps plus the 25-step reference."""
        n = len(limits.prompt_lines(prompts_text, MAX_PROMPTS)) or 1
        # the teacher row counts twice (CFG)
        return image_steps(n, len(COMPARE_METHODS) + 1 + len(loras_v or []), COMPARE_STEPS, 25)

    grid_seconds = request_seconds(lambda: service.kind, grid_work)

    @gpu(duration=grid_seconds)
    def compare(prompts_text: str, seed: float, loras_v: list[str], rewards_v: list[str],
                recipe_v: str = ""):
        """Methods x steps grid for a prompt and seed -> (reference, cells, table, summary).
        ``loras_v``: extra rows (arm keys, or LoRA file names); ``recipe_v``: the recipe
        of LoRA files whose recipe is unknown."""
        ref, cells, frame, text, imgs = run_compare(service, settings, prompts_text, seed,
                                                    loras_v, rewards_v, recipe=recipe_v)
        return ref, cells, frame, text, imgs

    def fill_pickers(imgs: dict):
        keys = [k for k in imgs if k != GRID_KEY]
        grid = imgs.get(GRID_KEY) or {}
        files = (gr.DownloadButton(visible=False),) * 2
        if grid.get("cells"):
            csv, png = compare_files(grid["cells"], grid["prompts"], cells_table(grid["cells"]))
            files = (gr.DownloadButton(value=str(csv), visible=True),
                     gr.DownloadButton(value=str(png), visible=True))
        return (gr.Dropdown(choices=keys, value=keys[0] if keys else None),
                gr.Dropdown(choices=keys, value=keys[-1] if keys else None),
                grid_html(grid.get("cells", []), grid.get("prompts", []), grid.get("control")),
                *files)

    def slide(imgs: dict, a: str, b: str):
        if a in imgs and b in imgs and GRID_KEY not in (a, b):
            return (enlarge(imgs[a]), enlarge(imgs[b]))  # a display copy, pixelated
        return None

    after = [left, right, grid_view, csv_file, png_file]
    def refresh_rows(rows_v):
        return gr.CheckboxGroup(choices=row_choices(settings), value=rows_v)

    go.click(guard(compare, "public", settings), [prompts, seed, loras, rewards, recipe],
             [reference, gallery, table, summary, images], api_name="compare", scroll_to_output=True,
             **GPU
             ).then(guard(fill_pickers, "public", settings), images, after,
                    api_name="compare_pickers", api_visibility="private")
    refresh.click(guard(refresh_rows, "public", settings), loras, loras,
                  api_name="compare_rows", api_visibility="private")

    def then_compare(event):
        """Run the grid (with the rows picker's value) after ``event`` succeeds."""
        return event.success(guard(compare, "public", settings),
                             [prompts, seed, loras, rewards, recipe],
                             [reference, gallery, table, summary, images],
                             api_name="compare_after", api_visibility="private", **GPU
                             ).then(guard(fill_pickers, "public", settings), images, after,
                                    api_name="compare_after_pickers", api_visibility="private")

    @gpu(duration=grid_seconds)
    def compare_control(prompts_text: str, seed: float, loras_v: list[str], rewards_v: list[str],
                        sketch_v, pick_v: str, scale_v: float, recipe_v: str = ""):
        """The grid under the digits ControlNet: a drawing or a held-out mask, a scale."""
        control = control_from_inputs(sketch_v, pick_v)
        ref, cells, frame, text, imgs = run_compare(service, settings, prompts_text, seed, loras_v,
                                                    rewards_v, control, float(scale_v),
                                                    recipe=recipe_v)
        return ref, cells, frame, text, imgs, control

    go_control.click(guard(compare_control, "public", settings),
                     [prompts, seed, loras, rewards, sketch, pick, scale, recipe],
                     [reference, gallery, table, summary, images, preview],
                     api_name="compare_control", scroll_to_output=True, **GPU
                     ).then(guard(fill_pickers, "public", settings), images, after,
                            api_name="compare_control_pickers", api_visibility="private")
    for side, picker in (("left", left), ("right", right)):
        picker.change(guard(slide, "public", settings), [images, left, right], slider,
                      api_name=f"compare_slide_{side}", api_visibility="private")
    return CompareTab(loras, then_compare)
