"""Hyper-SD Studio: train & monitor distillation stages, compare methods, run a blind study.

    python app.py                      # the digits world on 127.0.0.1:7860, no GPU needed
    python app.py --model models/sd15  # a local SD1.5 / SDXL pipeline folder
    python app.py --public             # reachable by others: training controls off

Settings also come from env vars: HYPERSD_MODEL, HYPERSD_RUNS_DIR, HYPERSD_STUDY_DB,
HYPERSD_STUDY_CONFIG, HYPERSD_LORA_DIR, HYPERSD_MODELS_DIR, HYPERSD_DATA_DIR, GRADIO_SERVER_NAME/PORT.
On a Hugging Face Space (SPACE_ID set) it listens on 0.0.0.0 with training off.
"""

from __future__ import annotations

try:  # ZeroGPU: `spaces` patches CUDA and must be imported before torch touches it
    import spaces  # type: ignore[import-not-found]  # noqa: F401
except ImportError:
    spaces = None

import argparse
import threading
from pathlib import Path

import gradio as gr

from compare_tab import build_compare_tab, build_generate_tab, build_study_tab
from compare_tab.compare import row_choices
from compare_tab.study import study_middleware
from compare_tab.study_results import build_study_results_tab
from hypersd_core.app.choices import default_rewards
from hypersd_core.app.limits import guard_decoder
from hypersd_core.app.service import AppSettings, ModelService
from hypersd_core.app.zerogpu import on_space
from hypersd_core.paths import ROOT
from hypersd_core.study.store import StudyConfig, StudyStore
from train_tab import build_rewards_tab, build_train_tab
from train_tab import controller as train_ctl
from ui_common.display import APP_CSS
from ui_common.guard import guard, limit_queue_per_client

TITLE = "Hyper-SD Studio"


def build_demo(settings: AppSettings, service: ModelService | None = None,
               store: StudyStore | None = None) -> gr.Blocks:
    """The whole app as a Blocks (not launched). ``service``/``store`` default to new ones."""
    guard_decoder()  # PIL refuses decompression bombs at the app's pixel cap
    service = service or ModelService(settings.model)
    store = store or StudyStore(settings.study_db)
    config = StudyConfig.from_yaml(settings.study_config)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nTrajectory-segmented consistency distillation, human feedback "
                    f"and one-step score distillation, runnable. Model: `{settings.model}`.")
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                build_generate_tab(settings, service)
            with gr.Tab("Compare", id="compare"):
                compare = build_compare_tab(settings, service)
            with gr.Tab("Train & Monitor", id="train"):
                train = build_train_tab(settings)
            with gr.Tab("Rewards", id="rewards"):
                rewards_timer = build_rewards_tab(settings, service, train.run)
            with gr.Tab("User study", id="study"):
                build_study_tab(settings, service, store, config)
            with gr.Tab("Study results", id="study-results") as results_tab:
                build_study_results_tab(settings, store, config, results_tab)

        def poll_only_shown(evt: gr.SelectData):
            """Only the shown tab's timer polls its run: a hidden tab costs no CPU."""
            return (gr.Timer(active=evt.value == "Train & Monitor"),
                    gr.Timer(active=evt.value == "Rewards"))

        tabs.select(guard(poll_only_shown, "public", settings), None,
                    [train.timer, rewards_timer], api_name="tab_select",
                    api_visibility="private", show_progress="hidden", concurrency_limit=None)

        def reattach():
            """After a reload or restart: list runs from disk and select the live one."""
            return gr.Dropdown(choices=train_ctl.run_choices(settings),
                               value=train_ctl.default_run(settings) or None)

        demo.load(guard(reattach, "public", settings), None, train.run, api_name="reattach",
                  api_visibility="private")

        def compare_this_run(run_id: str | None):
            """Open the Compare grid with the run as a row beside the methods."""
            if not run_id:
                raise gr.Error("choose a run first")
            key, choices = f"run:{run_id}", row_choices(settings)
            if key not in [k for _, k in choices]:
                raise gr.Error(f"run {run_id} has no final adapter for this model yet: it can "
                               "be compared once it has finished")
            return (gr.Tabs(selected="compare"), gr.CheckboxGroup(choices=choices, value=[key]),
                    gr.Timer(active=False))

        compare.then_compare(train.compare_run.click(
            guard(compare_this_run, "public", settings), train.run,
            [tabs, compare.rows, train.timer], api_name="compare_this_run",
            api_visibility="private"))
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    limit_queue_per_client(demo, settings)  # one client cannot fill the queue
    demo.hypersd = {"settings": settings, "service": service, "store": store}  # for tests
    return demo


def blocked_paths(settings: AppSettings) -> list[str]:
    """Never served: run folders (checkpoints, adapters, logs), the vote DB and its salt,
    model and LoRA weights, and secrets."""
    db = settings.study_db
    paths = [settings.runs_dir, db, db.with_name(db.name + "-wal"),
             db.with_name(db.name + "-shm"), db.parent / "study_salt", settings.lora_dir,
             settings.models_dir, ROOT / ".env", Path.cwd() / ".env", ROOT / ".git"]
    return [str(p) for p in dict.fromkeys(paths)]


def launch_kwargs(settings: AppSettings) -> dict:
    """Safe launch settings: local by default, no share link, no monitoring endpoint,
    bounded uploads; images are served from Gradio's cache only (no extra allowed paths)."""
    return {"server_name": settings.host, "server_port": settings.port, "share": False,
            "enable_monitoring": False, "max_file_size": settings.max_file_size,
            "allowed_paths": [], "blocked_paths": blocked_paths(settings), "ssr_mode": False,
            "show_error": False, "footer_links": ["api"], "css": APP_CSS,
            # study voters are identified by a server-signed cookie (compare_tab/study.py)
            "app_kwargs": {"middleware": [study_middleware(settings)]}}


def parse_args(argv: list[str] | None = None) -> AppSettings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="digits (default), or a diffusers pipeline folder / hub id")
    parser.add_argument("--runs-dir", type=Path, help="where run folders live (default ./runs)")
    parser.add_argument("--study-db", type=Path, help="vote database (default ./study/votes.db)")
    parser.add_argument("--lora-dir", type=Path, help="folder of official LoRA files to offer")
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 7860)")
    parser.add_argument("--public", action="store_true", default=None,
                        help="others can reach the app: training controls are disabled")
    args = parser.parse_args(argv)
    return AppSettings.from_env(model=args.model, runs_dir=args.runs_dir,
                                study_db=args.study_db, lora_dir=args.lora_dir, host=args.host,
                                port=args.port, public=args.public)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    service = ModelService(settings.model)
    demo = build_demo(settings, service)
    if on_space():
        # ZeroGPU forks a GPU worker per call: the model (half precision), its adapters
        # and the rewards load here, before launch, with no thread holding the model
        # lock when a call arrives
        failed = service.preload(default_rewards(_model_kind(service)))
        for name, why in failed.items():
            print(f"{name} not loaded: {why}", flush=True)
    else:
        # load the model while the page opens, so the first generation does not wait for it
        threading.Thread(target=lambda: _warm(service), daemon=True).start()
    # quiet: Gradio's own banner suggests share=True, which this app never uses
    _, url, _ = demo.launch(**launch_kwargs(settings), quiet=True, prevent_thread_lock=True)
    print(f"{TITLE} on {url} (no share link: --public and the settings in README decide "
          "who can reach it)", flush=True)
    demo.block_thread()


def _model_kind(service: ModelService) -> str:
    try:
        return service.sampler.backbone.kind
    except Exception:  # shown again, with its message, on the first generation
        return "digits"


def _warm(service: ModelService) -> None:
    try:
        _ = service.sampler
    except Exception as err:  # shown again, with its message, on the first generation
        print(f"model not loaded yet: {err}")


if __name__ == "__main__":
    main()
