"""Train & Monitor in headless Chromium: a refused Start (``lr: fast``) shows one message,
no toast appears while the tab polls, and 10 s later the run list still works (a run
that appears on disk is listed by Refresh and its status shown).

Skipped when Debian's ``chromium`` is not installed.
"""

from __future__ import annotations

import time

import pytest
import yaml
from cdp import Chromium, find_chromium
from test_browser import _app, _launch

pytestmark = [pytest.mark.slow,  # about 40 s: the app, the browser and 10 s of polling
              pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed")]

TOASTS_JS = """[...document.querySelectorAll('.toast-body, [data-testid="toast-body"]')]
    .map(t => t.textContent.trim())"""


def _type_settings(browser: Chromium, text: str) -> None:
    """Replace the settings editor's text as a person would: focus, select all, type."""
    browser.js("document.querySelector('#train-settings .cm-content').focus()")
    key = {"modifiers": 2, "key": "a", "code": "KeyA", "windowsVirtualKeyCode": 65}
    browser.send("Input.dispatchKeyEvent", {"type": "keyDown", **key, "commands": ["selectAll"]})
    browser.send("Input.dispatchKeyEvent", {"type": "keyUp", **key})
    browser.send("Input.insertText", {"text": text})


def test_refused_start_shows_one_message_and_the_run_list_keeps_working(tmp_path, monkeypatch):
    from hypersd_core.training.config import load_preset
    from hypersd_core.training.runs import Run
    from train_tab import controller as ctl

    app, settings = _app(tmp_path, monkeypatch)
    values = yaml.safe_load(ctl.preset_text("digits-tscd-k8"))
    values.update(lr="fast", steps=-5)
    demo, url = _launch(app, settings)
    try:
        with Chromium() as browser:
            browser.open(url)
            browser.wait("document.querySelector('#generate-button') !== null", timeout=60)
            browser.click_text("button[role=tab]", "Train & Monitor")
            browser.wait("document.querySelector('#train-settings .cm-content') !== null", 30)
            _type_settings(browser, yaml.safe_dump(values, sort_keys=False))
            browser.wait("document.querySelector('#train-check').textContent"
                         ".includes('lr must be')", timeout=30)
            browser.click("#train-start")
            message = browser.wait("(() => { const t = document.querySelector('#train-action')"
                                   ".innerText; return t.includes('lr must be') ? t : null; })()",
                                   timeout=30)
            assert "steps must be" in message  # every problem, in the one message
            assert "**" not in message  # rendered as Markdown, not shown raw
            toasts = []
            t0 = time.time()
            while time.time() - t0 < 10:  # the tab polls every 2 s meanwhile
                toasts += browser.js(TOASTS_JS)
                time.sleep(0.5)
            if toasts:
                shot = browser.screenshot(tmp_path / "toasts.png")
                pytest.fail(f"toasts after a refused Start: {sorted(set(toasts))}; {shot}")
            assert not list(settings.runs_dir.glob("*/config.yaml"))  # nothing was started

            # 10 s later the run list still works: a run written to disk is listed and shown
            cfg = load_preset("digits-tscd-k8", {"model": settings.model, "steps": 3})
            run = Run.create(settings.runs_dir / "made-on-disk", cfg)
            run.write_status(state="done", step=3, total=3)
            browser.click("#train-refresh")
            status = browser.wait("(() => { const t = document.querySelector('#train-status')"
                                  ".innerText; return t.includes('made-on-disk') ? t : null; })()",
                                  timeout=30)
            assert "done" in status and "3/3" in status
            assert browser.js(TOASTS_JS) == []
    finally:
        demo.close()
