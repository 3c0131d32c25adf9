"""Generate and Compare tabs: one image with any recipe, and the methods x steps grid
(teacher / LCM / TCD / Hyper-SD N-step / Hyper-SD unified, plus official LoRA files
the user has) with time and reward scores per cell and a slider for any two cells.

Both are public API endpoints: ``/generate`` and ``/compare``.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image, ImageDraw

from hypersd_core.app import limits
from hypersd_core.app.service import (
    COMPARE_METHODS,
    COMPARE_STEPS,
    AppSettings,
    Cell,
    ModelService,
    compare_grid,
    default_rewards,
    gpu,
    lora_files,
    official_method,
    reward_choices,
)
from hypersd_core.models.sampling import RECIPES

MAX_PROMPTS = 4
ROW_LABELS = {"teacher": "teacher", "lcm": "LCM", "tcd": "TCD", "hypersd": "Hyper-SD N-step",
              "hypersd-unified": "Hyper-SD unified"}
GPU = {"concurrency_id": "gpu", "concurrency_limit": 1}


def lora_choices(settings: AppSettings) -> list[tuple[str, str]]:
    """(file name relative to the LoRA folder, same) for every LoRA file the server has."""
    root = settings.lora_dir
    return [(str(p.relative_to(root)), str(p.relative_to(root))) for p in lora_files(root)]


def resolve_lora(name: str, settings: AppSettings) -> Path:
    """A LoRA file chosen from the server-built list (anything else is refused)."""
    for p in lora_files(settings.lora_dir):
        if str(p.relative_to(settings.lora_dir)) == name:
            return p
    raise gr.Error(f"{name!r} is not one of the LoRA files in the configured folder")


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


def method_rows(loras: list[str] | None, settings: AppSettings) -> list[tuple[str, str | None, str]]:
    """(recipe, adapter file, label) rows: the five methods, then each chosen LoRA file."""
    rows = [(m, None, ROW_LABELS[m]) for m in COMPARE_METHODS]
    for name in loras or []:
        method, _ = official_method(resolve_lora(name, settings))
        rows.append((method, str(resolve_lora(name, settings)), f"{Path(name).stem} [{method}]"))
    return rows


def run_compare(service: ModelService, settings: AppSettings, prompts_text: str, seed: float,
                loras: list[str] | None, rewards: list[str] | None):
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
            service, prompts, seeds, method_rows(loras, settings), COMPARE_STEPS, rewards or [])
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
    images = {f"{c.label or c.method} · {c.steps} steps · {c.prompt}": c.image
              for c in cells if c.image is not None}
    summary = (f"{len(cells)} cells ({len(grid)} grid + {len(reference)} reference) in "
               f"{seconds:.1f} s on {service.device}.")
    summary += "".join(f"\n- reward **{k}** unavailable: {v}" for k, v in reward_errors.items())
    summary += f"\n\nReference: {reference[0].caption}"
    return reference[0].image, gallery, cells_table(cells), summary, images


def build_generate_tab(settings: AppSettings, service: ModelService) -> None:
    """One prompt, one recipe: the ``/generate`` endpoint."""
    with gr.Row():
        prompt = gr.Textbox("a red handwritten digit 7", label="Prompt", scale=3)
        method = gr.Dropdown(list(RECIPES), value="hypersd", label="Method")
        steps = gr.Slider(1, 50, value=1, step=1, label="Steps")
        seed = gr.Number(0, precision=0, label="Seed")
    recipe_md = gr.Markdown(_recipe_text("hypersd"))
    go = gr.Button("Generate", variant="primary", elem_id="generate-button")
    with gr.Row():
        image = gr.Image(label="Image", format="png", type="pil", interactive=False,
                         elem_id="generate-image", height=256)
        info = gr.JSON(label="Details")

    @gpu
    def generate(prompt: str, method: str, steps: float, seed: float):
        """Generate one image: prompt, method (a recipe name), steps, seed -> (PNG, details)."""
        if not prompt or not prompt.strip():
            raise gr.Error("enter a prompt")
        if method not in RECIPES:
            raise gr.Error(f"unknown method {method!r}; choose from {', '.join(RECIPES)}")
        try:  # bounded inputs (hypersd_core/app/limits.py)
            limits.check_prompt(prompt), limits.check_steps(steps), limits.check_seed(seed)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        cell = service.generate(method, int(steps), [prompt.strip()], [int(seed or 0)])[0]
        if cell.error:
            raise gr.Error(cell.error)
        return cell.image, {"method": method, "steps": int(steps), "seed": int(seed or 0),
                            "seconds": round(cell.seconds, 4), "model": service.model}

    method.change(_recipe_text, method, recipe_md, api_visibility="private")
    go.click(generate, [prompt, method, steps, seed], [image, info], api_name="generate", **GPU)


def _recipe_text(method: str) -> str:
    r = RECIPES.get(method)
    return f"*{r.description}* (default {r.default_steps} steps)" if r else ""


def build_compare_tab(settings: AppSettings, service: ModelService) -> None:
    """The methods x steps grid: the ``/compare`` endpoint, plus a slider for two cells."""
    with gr.Row():
        prompts = gr.Textbox("a red handwritten digit 7", lines=2, scale=3,
                             label=f"Prompt (or up to {MAX_PROMPTS}, one per line)")
        seed = gr.Number(0, precision=0, label="Seed")
    with gr.Row():
        loras = gr.CheckboxGroup(lora_choices(settings), label=(
            f"Official LoRA files to add as rows (from {settings.lora_dir.name}/ on the server)"))
        rewards = gr.CheckboxGroup(reward_choices(), value=default_rewards(), label="Rewards")
    go = gr.Button("Compare", variant="primary", elem_id="compare-button")
    summary = gr.Markdown(label="summary")
    with gr.Row():
        reference = gr.Image(label="Teacher, 25 steps (reference)", format="png", type="pil",
                             interactive=False, height=192, scale=1)
        gallery = gr.Gallery(label="Rows: teacher / LCM / TCD / Hyper-SD N-step / Hyper-SD "
                             "unified; columns: 1 / 2 / 4 / 8 steps", columns=len(COMPARE_STEPS),
                             format="png", object_fit="contain", height="auto", scale=3)
    table = gr.Dataframe(label="Cells: time and reward scores", interactive=False)
    images = gr.State({})
    with gr.Row():
        left = gr.Dropdown([], label="Slider: left cell")
        right = gr.Dropdown([], label="Slider: right cell")
    slider = gr.ImageSlider(label="Compare two cells", type="pil", format="png")

    @gpu
    def compare(prompts_text: str, seed: float, loras_v: list[str], rewards_v: list[str]):
        """Methods x steps grid for a prompt and seed -> (reference, cells, table, summary)."""
        ref, cells, frame, text, imgs = run_compare(service, settings, prompts_text, seed,
                                                    loras_v, rewards_v)
        return ref, cells, frame, text, imgs

    def fill_pickers(imgs: dict):
        keys = list(imgs)
        return (gr.Dropdown(choices=keys, value=keys[0] if keys else None),
                gr.Dropdown(choices=keys, value=keys[-1] if keys else None))

    def slide(imgs: dict, a: str, b: str):
        if a in imgs and b in imgs:
            return (imgs[a], imgs[b])
        return None

    go.click(compare, [prompts, seed, loras, rewards],
             [reference, gallery, table, summary, images], api_name="compare", **GPU
             ).then(fill_pickers, images, [left, right], api_visibility="private")
    for picker in (left, right):
        picker.change(slide, [images, left, right], slider, api_visibility="private")
