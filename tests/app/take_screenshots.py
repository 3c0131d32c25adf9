"""Screenshots of every tab, driven in headless Chromium (for the README).

    python tests/app/take_screenshots.py [--out assets/screenshots] [--model digits]
                                         [--train-steps 40]

Starts the app in-process (a throwaway runs folder and vote DB), trains a short run of
the digits-tscd-k8 preset (``--train-steps``; the same function the Start button calls)
so the Train & Monitor and Rewards plots have lines, then clicks through each tab doing
its main action and saves small palette PNGs. Prints the time from start to first page,
the compare-grid time, and the training run's it/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cdp import Chromium  # noqa: E402

HAS_IMAGE = "(() => {{ const i = document.querySelector('{sel}'); " \
            "return !!(i && i.complete && i.naturalWidth > 0); }})()"


def shrink(path: Path, colors: int = 96) -> None:
    """Re-save as an optimised palette PNG (screenshots are UI, a palette loses nothing)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    im.save(path, optimize=True)


def train_short_run(settings, steps: int) -> None:
    """A short digits-tscd-k8 run (logged every 2 steps, samples scored 4 times), to the end."""
    import yaml

    from train_tab import controller as ctl

    values = yaml.safe_load(ctl.preset_text("digits-tscd-k8"))
    every = max(1, steps // 4)
    values.update(steps=steps, log_every=2, sample_every=every, checkpoint_every=steps)
    run, _ = ctl.start(yaml.safe_dump(values), settings.model, "", "digits", settings)
    while run.status().get("state") not in ("done", "failed", "stopped"):
        time.sleep(2)
    print(f"training run {run.dir.name}: {run.status().get('state')}, "
          f"{run.status().get('it_s') or 0:.2f} it/s over {steps} steps")


def visible_images(browser: Chromium) -> int:
    return browser.js("[...document.querySelectorAll('img')].filter(i => i.offsetParent && "
                      "i.complete && i.naturalWidth > 0).length")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/screenshots"))
    parser.add_argument("--model", default=os.environ.get("HYPERSD_MODEL", "digits"))
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--train-steps", type=int, default=40,
                        help="steps of the short run shown in Train & Monitor and Rewards")
    parser.add_argument("--runs-dir", type=Path, help="show runs from here instead of training one")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="screens-"))
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp / "gradio"))
    t0 = time.perf_counter()
    import app
    from hypersd_core.app.service import AppSettings

    settings = AppSettings.from_env(model=args.model, study_db=tmp / "study" / "votes.db",
                                    runs_dir=args.runs_dir or tmp / "runs", port=args.port)
    if args.runs_dir is None:
        train_short_run(settings, args.train_steps)
    demo = app.build_demo(settings)
    _, url, _ = demo.launch(**{**app.launch_kwargs(settings), "prevent_thread_lock": True,
                               "quiet": True})
    with Chromium(width=1280, height=900) as browser:
        browser.open(url)
        browser.wait("document.querySelector('#generate-button') !== null", timeout=120)
        print(f"start-up to first page (imports, build, launch, page rendered): "
              f"{time.perf_counter() - t0:.1f} s")
        shots = {}

        browser.click("#generate-button")
        browser.wait(HAS_IMAGE.format(sel="#generate-image img"), timeout=180)
        shots["generate"] = browser.screenshot(args.out / "generate.png")

        browser.click_text("button[role=tab]", "Compare")
        before = visible_images(browser)
        t1 = time.perf_counter()
        browser.click("#compare-button")
        browser.wait(f"[...document.querySelectorAll('img')].filter(i => i.offsetParent && "
                     f"i.complete && i.naturalWidth > 0).length >= {before + 21}", timeout=600)
        print(f"compare grid (5x4 + teacher 25 steps, scored) seen in the browser: "
              f"{time.perf_counter() - t1:.1f} s")
        time.sleep(1.0)
        shots["compare"] = browser.screenshot(args.out / "compare.png")

        browser.click_text("button[role=tab]", "Train & Monitor")
        browser.wait("document.querySelectorAll('#train-loss path.hsd-line').length > 0 && "
                     "document.querySelector('#train-sample img') !== null", timeout=60)
        time.sleep(1.0)
        shots["train"] = browser.screenshot(args.out / "train.png")

        browser.click_text("button[role=tab]", "Rewards")
        browser.click_text("button", "Score")
        browser.wait("document.querySelectorAll('#rewards-gallery img').length >= 2 && "
                     "document.querySelectorAll('#rewards-plot path.hsd-line').length > 0",
                     timeout=180)
        time.sleep(1.0)
        shots["rewards"] = browser.screenshot(args.out / "rewards.png")

        browser.click_text("button[role=tab]", "User study")
        browser.click_text("button", "Show a pair")
        browser.wait("document.body.innerText.includes('Prompt:')", timeout=180)
        browser.click_text("button", "A is better")
        browser.wait("document.body.innerText.includes('Thanks!')", timeout=60)
        shots["study"] = browser.screenshot(args.out / "study.png")
    demo.close()
    for name, path in shots.items():
        shrink(path)
        print(f"{name}: {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
