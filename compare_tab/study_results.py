"""Study results tab (apart from the vote buttons, so voters do not anchor on them):
strengths with intervals per step count (plot and table), primary comparisons with their
correction, head-to-head win rates with both-bad rates, the position term, the both-bad
sensitivity view, anchored strengths, warnings, and the documented CSV export."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from hypersd_core.app.service import AppSettings
from hypersd_core.study.export import columns_markdown
from hypersd_core.study.results import StudyResults, analyse, strength_figure
from hypersd_core.study.stats import Options
from hypersd_core.study.store import StudyConfig, StudyStore
from ui_common.guard import guard

N_BOOT = 1000


def compute(store: StudyStore, config: StudyConfig, cluster: str = "voter",
            both_bad: str | None = None, login_only: bool = False,
            n_boot: int = N_BOOT) -> StudyResults:
    """The analysis of every stored vote of the configured methods."""
    frame = store.votes_frame()
    methods = list(config.methods)
    if config.anchor is not None and config.anchor.method not in methods:
        methods.append(config.anchor.method)
    known = set(frame.method_a) | set(frame.method_b)
    methods += sorted(known - set(methods))  # votes of methods no longer in rotation
    opts = Options(cluster=cluster, both_bad=both_bad or config.both_bad, n_boot=n_boot)
    return analyse(frame, methods, opts, config.primary, login_only)


def summary_markdown(res: StudyResults) -> str:
    lines = [f"**{res.n_votes} votes from {res.n_voters} voters.** {res.note}"]
    lines += [f"- ⚠ {w}" for w in res.warnings]
    return "\n".join(lines)


def _rounded(frame: pd.DataFrame | None, empty: str = "no votes yet") -> pd.DataFrame:
    if frame is None or not len(frame):
        return pd.DataFrame({"": [empty]})
    out = frame.copy()
    for c in out.columns:
        if out[c].dtype.kind == "f":
            out[c] = out[c].round(3)
        elif out[c].dtype == object:
            num = pd.to_numeric(out[c], errors="coerce")
            if num.notna().any() and (num.notna() | out[c].isna()).all():
                out[c] = num.round(3)
    return out.astype(object).where(out.notna(), "–")


def export(store: StudyStore) -> list[str]:
    """votes.csv (every shown pair, skipped ones too) and votes.columns.md."""
    folder = Path(tempfile.mkdtemp(prefix="study-export-"))
    csv = store.export_csv(folder / "votes.csv")
    return [str(csv), str(csv.with_name("votes.columns.md"))]


def build_study_results_tab(settings: AppSettings, store: StudyStore, config: StudyConfig,
                            tab: gr.Tab | None = None) -> None:
    """The results view; recomputed on opening the tab and on Update. Every event here is
    for the study owner (hypersd_core/app/access.py): checked on the server."""
    gr.Markdown("Strengths compare methods **within a step count**; the Study results are "
                "kept apart from the voting tab so that voters do not see them while voting. "
                "They are for the study owner: on the machine the app runs on, or with the "
                "owner token.")
    owner_token = gr.Textbox(label="Owner token (HYPERSD_STUDY_OWNER_TOKEN; not needed on "
                             "the machine the app runs on)", type="password", max_lines=1)
    with gr.Row():
        cluster = gr.Radio(["voter", "prompt"], value="voter", label="Resample whole")
        rule = gr.Radio(["tie", "exclude"], value=config.both_bad,
                        label="'Both bad' votes are (primary rule in study.yaml)")
        login_only = gr.Checkbox(False, label="Logged-in voters only")
        update = gr.Button("Update results", variant="primary")
    summary = gr.Markdown()
    plot = gr.Plot(label="Strengths within each step count")
    strengths = gr.Dataframe(label="Strengths (Davidson Bradley-Terry log-strength) within "
                             "each step count", interactive=False)
    primary = gr.Dataframe(label="Primary comparisons (study.yaml), corrected", interactive=False)
    wins = gr.Dataframe(label="Head-to-head win rates (ties half) and both-bad rates per pair",
                        interactive=False)
    position = gr.Dataframe(label="Position: h > 0 favours the left image", interactive=False)
    sensitivity = gr.Dataframe(label="Sensitivity: strengths under each both-bad rule",
                               interactive=False)
    anchored = gr.Dataframe(label="Across step counts (only from anchor pairs)",
                            interactive=False)
    with gr.Row():
        go_export = gr.Button("Export every shown pair as CSV")
        files = gr.File(label="votes.csv + column documentation", file_count="multiple",
                        interactive=False)
    with gr.Accordion("CSV columns", open=False):
        gr.Markdown(columns_markdown())

    def refresh(token_v: str, cluster_v: str, rule_v: str, login_v: bool):
        res = compute(store, config, cluster_v, rule_v, bool(login_v))
        fig = strength_figure(res.strengths)
        return (summary_markdown(res), fig, _rounded(res.strengths),
                _rounded(res.primary, "no primary comparison named in study.yaml"
                         if config.primary is None else "no votes yet"),
                _rounded(res.win_rates), _rounded(res.position), _rounded(res.sensitivity),
                _rounded(res.anchored, "no anchor pairs (set anchor in study.yaml)"))

    outputs = [summary, plot, strengths, primary, wins, position, sensitivity, anchored]
    def export_files(token_v: str):
        return export(store)

    inputs = [owner_token, cluster, rule, login_only]
    owner = {"api_visibility": "private"}
    update.click(guard(refresh, "owner", settings, token_arg=0), inputs, outputs,
                 api_name="study_results", **owner)
    if tab is not None:
        tab.select(guard(refresh, "owner", settings, token_arg=0), inputs, outputs,
                   api_name="study_results_tab", **owner)
    go_export.click(guard(export_files, "owner", settings, token_arg=0), owner_token, files,
                    api_name="study_export", **owner)
