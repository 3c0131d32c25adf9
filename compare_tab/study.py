"""User-study tab: blind pairwise votes (A / B / tie / both bad) with a server-issued
single-use token per shown pair, identities revealed only after the vote, and the
results (win rates with 95% bootstrap CIs, Bradley-Terry scores, per step count)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from hypersd_core.app.service import AppSettings, ModelService, gpu
from hypersd_core.study.store import (
    CHOICES,
    InvalidToken,
    StudyConfig,
    StudyStore,
    results_table,
)

CHOICE_LABELS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both bad"}


def voter_id(request: gr.Request | None) -> str:
    """Who votes: the logged-in user, else the browser session (stored only as a salted hash)."""
    if request is None:
        return "anonymous"
    return getattr(request, "username", None) or getattr(request, "session_hash", None) or "anonymous"


def playable_config(config: StudyConfig, service: ModelService) -> StudyConfig:
    """The study restricted to methods this model can run at every configured step count."""
    missing = [m for m in config.methods
               if not all(service.method_available(m, n) for n in config.steps)]
    methods = [m for m in config.methods if m not in missing]
    if len(methods) < 2:
        raise gr.Error("the study needs two methods this model can run; missing adapters for "
                       f"{', '.join(missing)} (train them in the Train tab)")
    return StudyConfig(prompts=config.prompts, methods=methods, steps=config.steps,
                       seeds=config.seeds)


def cast_vote(store: StudyStore, token: str | None, choice: str, voter: str) -> tuple[bool, str]:
    """Record one vote; (stored, message). A replayed, forged or missing token is refused."""
    if choice not in CHOICES:
        return False, f"unknown choice {choice!r}"
    if not token:
        return False, "No pair on screen: press **Show a pair** first."
    try:
        vote = store.record_vote(token, choice, voter)
    except InvalidToken as err:
        return False, f"Vote rejected: {err}."
    return True, (f"Thanks! **A** was **{vote.method_a}**, **B** was **{vote.method_b}** "
                  f"({vote.steps} steps, seed {vote.seed}); you chose "
                  f"*{CHOICE_LABELS[choice]}*.")


def results(store: StudyStore) -> pd.DataFrame:
    """The results view: one row per method and step count ('all' pooled)."""
    table = results_table(store.votes_frame())
    return table.round(3) if len(table) else table


class StudyHandlers:
    """The tab's event functions (also called directly by tests)."""

    def __init__(self, service: ModelService, store: StudyStore, config: StudyConfig):
        self.service, self.store, self.config = service, store, config

    def next_pair(self) -> tuple:
        """Issue a pair and render it: (image A, image B, caption, reveal, token, buttons...)."""
        pair = self.store.next_pair(playable_config(self.config, self.service))
        images = []
        for method in (pair.left, pair.right):
            cell = self.service.generate(method, pair.steps, [pair.prompt], [pair.seed])[0]
            if cell.error:
                raise gr.Error(f"could not render the pair: {cell.error}")
            images.append(cell.image)
        text = f"**Prompt:** {pair.prompt} · {pair.steps} steps"
        on = [gr.Button(interactive=True)] * len(CHOICES)
        return (images[0], images[1], text, "", pair.token, *on)

    def vote(self, choice: str, token: str | None, request: gr.Request | None = None) -> tuple:
        """Cast a vote: (reveal message, cleared token, disabled buttons...)."""
        stored, message = cast_vote(self.store, token, choice, voter_id(request))
        if not stored:
            gr.Warning(message.replace("**", ""))
        return (message, None, *[gr.Button(interactive=False)] * len(CHOICES))


def build_study_tab(settings: AppSettings, service: ModelService, store: StudyStore,
                    config: StudyConfig) -> None:
    """Blind A/B voting, reveal after the vote, results and CSV export."""
    gr.Markdown("Two images from the same prompt, seed and step count, made by two methods "
                "in random order. Pick the better one; the methods are shown after you vote.")
    show = gr.Button("Show a pair", variant="primary")
    pair_md = gr.Markdown()
    with gr.Row():
        left = gr.Image(label="A", type="pil", format="png", interactive=False, height=256,
                        show_label=True)
        right = gr.Image(label="B", type="pil", format="png", interactive=False, height=256,
                         show_label=True)
    with gr.Row():
        buttons = {c: gr.Button(CHOICE_LABELS[c], interactive=False) for c in CHOICES}
    reveal = gr.Markdown()
    token = gr.State(None)  # server-side only: never sent to the browser
    with gr.Accordion("Results", open=True):
        refresh = gr.Button("Refresh results")
        table = gr.Dataframe(lambda: results(store), label="Win rate (ties count half) with 95% bootstrap CI; "
                             "Bradley-Terry log-strength per step count", interactive=False)
        export = gr.Button("Export votes as CSV")
        csv_file = gr.File(label="votes.csv", interactive=False)

    handlers = StudyHandlers(service, store, config)

    def export_csv():
        folder = Path(tempfile.mkdtemp(prefix="study-export-"))
        return str(store.export_csv(folder / "votes.csv"))

    show.click(gpu(handlers.next_pair), None,
               [left, right, pair_md, reveal, token, *buttons.values()],
               concurrency_id="gpu", concurrency_limit=1, api_visibility="private")

    def make_vote(choice: str):
        def handler(token_v: str | None, request: gr.Request):
            return handlers.vote(choice, token_v, request)
        return handler

    for choice, btn in buttons.items():
        btn.click(make_vote(choice), token, [reveal, token, *buttons.values()],
                  api_visibility="private", concurrency_limit=None)
    refresh.click(lambda: results(store), None, table, api_visibility="private")
    export.click(export_csv, None, csv_file, api_visibility="private")
