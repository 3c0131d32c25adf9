"""The researcher's loop in headless Chromium, as a person does it: train a short digits
run with Start, find it in Generate's adapter picker, prepare its downloads, press
"Compare this run" and see the run's row in the grid with its images drawn, then start a
study whose arms are that run and the teacher, and vote once.

With ``HYPERSD_SCREENSHOTS=DIR`` the screenshots of docs/researcher-loop.md are kept there
(run-picker.png, compare-run.png, run-downloads.png). Skipped when Debian's ``chromium`` is
not installed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cdp import Chromium, find_chromium
from test_app import _settings_text, make_lora_file
from test_browser import _app, _launch
from test_browser_train import TOASTS_JS, _type_settings

pytestmark = [pytest.mark.slow,  # about 2 minutes: a 2-step run, a 6-row grid, a study pair
              pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed")]

ADAPTERS = ("hypersd-k1", "hypersd-k2", "hypersd-k4", "hypersd-k8", "hypersd-unified", "lcm",
            "tcd")


def _text_of(selector: str, needle: str) -> str:
    """JS: the element's text once it contains ``needle``, else null."""
    return (f"(() => {{ const e = document.querySelector({selector!r}); const t = e ? "
            f"e.innerText : ''; return t.includes({needle!r}) ? t : null; }})()")


def _open(browser: Chromium, title: str, inside: str) -> None:
    """Open the accordion whose header says ``title`` until ``inside`` (an element in it)
    is shown; a header click toggles, so it is clicked only while that element is hidden."""
    shown = f"(() => {{ const e = document.querySelector({inside!r}); " \
            "return !!(e && e.offsetParent); })()"
    for _ in range(3):
        if browser.js(shown):
            return
        browser.js(f"""(() => {{ const b = [...document.querySelectorAll('button')]
            .find(e => e.textContent.includes({title!r})); if (b) b.click(); }})()""")
        try:
            browser.wait(shown, timeout=5)
            return
        except TimeoutError:
            pass
    raise AssertionError(f"the accordion {title!r} does not open")


def _shot(browser: Chromium, name: str, tmp_path: Path, element: str | None = None) -> Path:
    """A screenshot of the viewport, or of the region of ``element`` (a JS expression);
    kept in $HYPERSD_SCREENSHOTS when set (small palette PNGs, as the docs use)."""
    keep = os.environ.get("HYPERSD_SCREENSHOTS")
    path = Path(keep or tmp_path) / f"{name}.png"
    time.sleep(0.8)  # transitions (an opening list, a new row) settle
    if element:
        browser.screenshot_of(path, element)
    else:
        browser.screenshot(path, full_page=False)
    if keep:
        from take_screenshots import shrink

        shrink(path)
    return path


def test_a_run_trained_in_the_app_is_a_compare_row_and_a_study_arm(tmp_path, monkeypatch):
    app, settings = _app(tmp_path, monkeypatch, ())
    adapters = tmp_path / "adapters"
    for name in ADAPTERS:  # the grid's standard rows: teacher, LCM, TCD, Hyper-SD
        make_lora_file(tmp_path / "tiny", adapters / name / "pytorch_lora_weights.safetensors")
    demo, url = _launch(app, settings)
    store = demo.hypersd["store"]
    try:
        with Chromium(width=1280, height=900) as browser:
            browser.open(url)
            browser.wait("document.querySelector('#generate-button') !== null", timeout=60)

            # 1. train: the settings typed into the editor, then Start
            browser.click_text("button[role=tab]", "Train & Monitor")
            browser.wait("document.querySelector('#train-settings .cm-content') !== null", 30)
            _type_settings(browser, _settings_text(2))
            # checked as typed: the resolved config beside the editor shows the 2 steps too
            browser.wait("[...document.querySelectorAll('.cm-content')].filter(e => "
                         "/^steps: 2$/m.test(e.innerText)).length >= 2", timeout=30)
            assert "valid" in browser.js("document.querySelector('#train-check').innerText")
            browser.click("#train-start")
            status = browser.wait(_text_of("#train-status", "done"), timeout=600)
            runs = [p.parent for p in settings.runs_dir.glob("*/final")]
            assert len(runs) == 1, status  # one run, not one per click
            run_id = runs[0].name
            assert run_id in status and "2/2" in status, status

            # 2. its files: the adapter in both forms, metrics, config, sample grids
            _open(browser, "Download this run", "#run-downloads-button")
            browser.click("#run-downloads-button")
            try:
                files = browser.wait(  # names are shown as "stem" and ".ext" on two lines
                    "(() => { const t = document.querySelector('#run-downloads').innerText"
                    ".replace(/\\n/g, ''); return t.includes('metrics.jsonl') ? t : null; })()",
                    timeout=120)
            except TimeoutError:
                shot = browser.screenshot(tmp_path / "downloads.png")
                shown = browser.js("document.querySelector('#run-downloads').innerText")
                pytest.fail(f"no run files: {browser.js(TOASTS_JS)} {shown!r}; {shot}")
            for name in ("kohya", "config.yaml", "samples.zip"):
                assert name in files, files
            _shot(browser, "run-downloads", tmp_path,
                  "document.querySelector('#run-downloads').closest('.block, .gr-group')"
                  ".parentElement")

            # 3. Generate's adapter picker offers it
            browser.click_text("button[role=tab]", "Generate")
            browser.click("#generate-refresh")  # the list as it is now, the new run in it
            time.sleep(2.0)
            browser.mouse_click("#generate-adapter input")
            try:
                picker = browser.wait(
                    f"(() => {{ const o = [...document.querySelectorAll('[role=option], "
                    f"ul.options li')].map(e => e.innerText); return o.some(t => "
                    f"t.includes({run_id!r})) ? o : null; }})()", timeout=30)
            except TimeoutError:
                shot = browser.screenshot(tmp_path / "picker.png")
                shown = browser.js("[...document.querySelectorAll('[role=option], ul.options "
                                   "li')].map(e => e.innerText)")
                pytest.fail(f"the run is not in the adapter picker: {shown}; {shot}")
            assert any("TSCD k=8" in t and "2 steps" in t for t in picker), picker
            _shot(browser, "run-picker", tmp_path)
            browser.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape",
                                                    "code": "Escape",
                                                    "windowsVirtualKeyCode": 27})

            # 4. Compare this run: the grid opens with the run as a row, its 4 cells drawn
            browser.click_text("button[role=tab]", "Train & Monitor")
            browser.click("#compare-this-run")
            row = browser.wait(f"""(() => {{
                const th = [...document.querySelectorAll('#compare-grid-view th.row')]
                    .find(h => h.innerText.includes({run_id!r}));
                if (!th) return null;
                const imgs = [...th.parentElement.querySelectorAll('img')];
                const drawn = imgs.filter(i => i.complete && i.naturalWidth > 0);
                return drawn.length === 4 ? {{label: th.innerText, drawn: drawn.length}} : null;
            }})()""", timeout=600)
            assert "hypersd" in row["label"], row
            labels = browser.js("[...document.querySelectorAll('#compare-grid-view th.row')]"
                                ".map(h => h.innerText.split('\\n')[0])")
            for method in ("teacher", "LCM", "TCD", "Hyper-SD"):
                assert any(method in label for label in labels), labels
            _shot(browser, "compare-run", tmp_path, "[...document.querySelectorAll("
                  f"'#compare-grid-view th.row')].find(h => h.innerText.includes({run_id!r}))"
                  ".closest('table')")

            # 5. a study of the run against the teacher: one pair, one vote
            browser.click_text("button[role=tab]", "User study")
            _open(browser, "Arms of this study", "#study-use-arms")
            browser.click("#study-refresh-arms")  # the runs finished since the page loaded
            browser.wait(f"document.querySelector('#study-arms').innerText"
                         f".includes({run_id!r})", timeout=30)
            time.sleep(1.0)  # the refreshed list is in place before boxes are ticked
            checked = f"""(() => {{
                const boxes = [...document.querySelectorAll('#study-arms label')].map(l =>
                    [l.innerText.trim(), l.querySelector('input[type=checkbox]')]);
                const want = k => k.includes({run_id!r}) || k === 'teacher';
                for (const [k, box] of boxes) if (box.checked !== want(k)) box.click();
                return boxes.filter(([k, box]) => box.checked).map(([k]) => k); }})()"""
            ticked = browser.wait(f"(() => {{ const t = {checked}; return t.length === 2 ? t : "
                                  "null; })()", timeout=30)
            assert any(run_id in k for k in ticked), ticked
            time.sleep(0.5)
            browser.click("#study-use-arms")
            try:
                browser.wait("document.body.innerText.includes('pairs 2 arms')", timeout=30)
            except TimeoutError:
                shot = browser.screenshot(tmp_path / "arms.png")
                pytest.fail(f"the study did not take the arms {ticked}: "
                            f"{browser.js(TOASTS_JS)}; {shot}")
            browser.click("#study-show")
            browser.wait("['#study-left img', '#study-right img'].every(s => { "
                         "const i = document.querySelector(s); "
                         "return i && i.complete && i.naturalWidth > 0; })", timeout=300)
            browser.click_text("button", "A is better")
            reveal = browser.wait(_text_of("body", "Thanks!"), timeout=60)
            assert run_id in reveal
            assert browser.js(TOASTS_JS) == []
    finally:
        demo.close()
    votes = store.votes_frame()
    assert len(votes) == 1 and votes.iloc[0]["choice"] == "A"
    pair = store.pairs_frame().iloc[0]
    assert {pair["method_left"], pair["method_right"]} == {f"run:{run_id}", "teacher"}
    side = "left" if pair["method_left"].startswith("run:") else "right"
    assert len(str(pair[f"hash_{side}"])) >= 16  # the run's weights, by hash
