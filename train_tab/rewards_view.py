"""Rewards tab: a run's reward scores per reward against step (live), and a panel that
scores images (generated with a method, or uploaded) with the chosen rewards."""

from __future__ import annotations

import gradio as gr
import pandas as pd
from PIL import Image

from hypersd_core.app import limits
from hypersd_core.app.choices import default_rewards, reward_choices, unavailable_text
from hypersd_core.app.service import AppSettings, ModelService
from hypersd_core.app.zerogpu import gpu, image_steps, request_seconds
from hypersd_core.models.sampling import RECIPES
from hypersd_core.rewards.meaning import meaning_markdown
from ui_common.display import enlarge, image_classes
from ui_common.guard import guard

from . import controller as ctl

MAX_UPLOADS = limits.MAX_UPLOADS


def score_table(service: ModelService, images: list[Image.Image], prompts: list[str],
                rewards: list[str]) -> tuple[pd.DataFrame, str]:
    """A table with one row per image and one column per reward, and a note on failures."""
    if not rewards:
        raise gr.Error("choose at least one reward")
    scores, errors = service.score(images, prompts, rewards)
    frame = pd.DataFrame({"image": list(range(1, len(images) + 1)), "prompt": prompts})
    for name, values in scores.items():
        frame[name] = [round(v, 4) for v in values]
    note = "\n".join(f"- **{k}** could not score: {v}" for k, v in errors.items())
    return frame, note


def scores_explained(rewards: list[str] | None) -> str:
    """What the chosen rewards' scores mean, as shown under the scores table."""
    return ("**What these scores mean**\n\n" + meaning_markdown(rewards)) if rewards else ""


def build_rewards_tab(settings: AppSettings, service: ModelService,
                      train_run: gr.Dropdown) -> gr.Timer:
    """The rewards view; ``train_run`` is the Train tab's run picker (kept in sync).
    Returns the timer that polls the run (off until the tab is shown: app.py switches it)."""
    gr.Markdown("Reward-model scores of the selected run's fixed sample prompts, logged while "
                "it trains (set `reward_every` or a feedback stage's rewards).")
    run = gr.Dropdown(ctl.run_choices(settings), value=ctl.default_run(settings) or None,
                      label="Run")
    empty = ctl.plots_html([])[1]
    plot = gr.HTML(empty, elem_id="rewards-plot")
    with gr.Accordion("What each reward score means (range, which way is better, known "
                      "failures)", open=False):
        gr.Markdown(meaning_markdown(), elem_id="rewards-meaning-all")
    offset, records = gr.State(0), gr.State([])
    timer = gr.Timer(3.0, active=False)

    def on_tick(run_id, offset_v, records_v, force=False):
        if not run_id:
            return empty, 0, []
        try:
            p = ctl.poll(run_id, offset_v, settings)
        except ctl.ControlError:
            return empty, 0, []
        records_v = ([] if p.reset else records_v) + p.records
        if not p.records and not force:
            return gr.skip(), p.offset, records_v
        return ctl.plots_html(records_v)[1], p.offset, records_v

    def on_select(run_id):
        return on_tick(run_id, 0, [], True)

    def follow(run_id):
        return gr.Dropdown(choices=ctl.run_choices(settings), value=run_id)

    timer.tick(guard(on_tick, "public", settings), [run, offset, records], [plot, offset, records],
               api_name="rewards_poll", api_visibility="private", show_progress="hidden")
    run.change(guard(on_select, "public", settings), run, [plot, offset, records],
               api_name="rewards_select_run", api_visibility="private", show_progress="hidden")
    train_run.change(guard(follow, "public", settings), train_run, run,
                     api_name="rewards_follow_run", api_visibility="private",
                     show_progress="hidden")

    gr.Markdown("### Score these images")
    offered = reward_choices()
    with gr.Row():
        source = gr.Radio(["generate", "upload"], value="generate", label="Images from")
        rewards = gr.CheckboxGroup(offered, value=default_rewards(), label="Rewards")
    with gr.Accordion("Rewards not offered here (weights not found)", open=False,
                      visible=bool(unavailable_text())):
        gr.Markdown(unavailable_text(), elem_id="rewards-unavailable")
    with gr.Row():
        method = gr.Dropdown(list(RECIPES), value="hypersd", label="Method")
        steps = gr.Dropdown([1, 2, 4, 8, 25], value=1, label="Steps")
        seed = gr.Number(0, precision=0, label="First seed")
    prompts = gr.Textbox("a red handwritten digit 7\na blue handwritten digit 3",
                         lines=3, label="Prompts (one per line; one prompt for all uploads)")
    uploads = gr.File(file_count="multiple", file_types=["image"], label="Images to score")
    score_btn = gr.Button("Score", variant="primary")
    gallery = gr.Gallery(label="Scored images (numbered as in the table)", columns=4,
                         format="png", height="auto", object_fit="contain",
                         elem_id="rewards-gallery",
                         elem_classes=image_classes(settings.model, fill=False))
    table = gr.Dataframe(label="Scores", interactive=False)
    note = gr.Markdown()
    meaning = gr.Markdown(scores_explained(default_rewards()), elem_id="rewards-meaning")
    rewards.change(guard(scores_explained, "public", settings), rewards, meaning,
                   api_name="rewards_meaning", api_visibility="private", show_progress="hidden")

    def score_work(source_v, rewards_v, method_v, steps_v, seed_v, prompts_v, files) -> int:
        n = max(1, len(files or []) if source_v == "upload" else len(limits.prompt_lines(prompts_v)))
        steps = 0 if source_v == "upload" else int(steps_v) * (2 if method_v == "teacher" else 1)
        return image_steps(n, 1, (max(1, steps),))

    @gpu(duration=request_seconds(lambda: service.kind, score_work))
    def on_score(source_v, rewards_v, method_v, steps_v, seed_v, prompts_v, files):
        try:  # bounded before anything is decoded or generated (hypersd_core/app/limits.py)
            lines = limits.prompt_lines(prompts_v)
            seed0 = limits.check_seed(seed_v, max(1, len(lines)))
            if source_v == "upload":
                limits.check_uploads(len(files or []))
                images = [limits.open_upload(f) for f in files]
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if not lines:
            raise gr.Error("enter at least one prompt")
        if source_v == "upload":
            prompts_l = (lines * len(images))[:len(images)] if len(lines) < len(images) else lines[:len(images)]
        else:
            seeds = [seed0 + i for i in range(len(lines))]
            cells = service.generate(method_v, int(steps_v), lines, seeds)
            if cells[0].error:
                raise gr.Error(cells[0].error)
            images, prompts_l = [c.image for c in cells], lines
        frame, msg = score_table(service, images, prompts_l, rewards_v or [])
        shown = [(enlarge(im), f"{i} · {p}") for i, (im, p) in enumerate(zip(images, prompts_l), 1)]
        return shown, frame, msg

    score_btn.click(guard(on_score, "public", settings),
                    [source, rewards, method, steps, seed, prompts, uploads],
                    [gallery, table, note], api_name="score", concurrency_id="gpu",
                    concurrency_limit=1, api_visibility="private")
    return timer
