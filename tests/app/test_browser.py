"""End to end in headless Chromium: what a person sees.

- Generate: a 1-step image appears, keeps its own pixels for the API, and is displayed at
  least 256 px wide, pixelated.
- Train & Monitor and Rewards, for a short digits run: every plot (loss, reward scores,
  learning rate) has drawn line elements with a visible, coloured stroke.

Skipped when Debian's ``chromium`` is not installed.
"""

from __future__ import annotations

import pytest
from cdp import Chromium, find_chromium
from test_app import _settings_text, _wait, free_port, make_lora_file, make_tiny_digits

pytestmark = [pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed")]

# Data lines of the plots whose title contains ``title``: <path>/<polyline> elements with a
# coloured (not grey) stroke of some width, drawn (not hidden), longer than a few pixels.
# Grid lines and axes are grey, so they do not count; neither do legend swatches (<line>).
LINES_JS = """((title) => {
  const visible = e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const coloured = c => { const m = c.match(/rgba?\\(([^)]+)\\)/); if (!m) return false;
    const [r, g, b, a] = m[1].split(',').map(Number);
    return (a === undefined || a > 0.2) && Math.max(r, g, b) - Math.min(r, g, b) > 40; };
  const plots = [...document.querySelectorAll('svg')].filter(s => visible(s) &&
    [...s.querySelectorAll('text')].some(t => t.textContent.toLowerCase().includes(title)));
  return plots.map(s => [...s.querySelectorAll('path, polyline')].filter(p => {
    const cs = getComputedStyle(p), r = p.getBoundingClientRect();
    return coloured(cs.stroke) && parseFloat(cs.strokeWidth) >= 1 && cs.visibility !== 'hidden'
      && parseFloat(cs.opacity) > 0.2 && Math.max(r.width, r.height) > 10;
  }).length);
})"""


def _app(tmp_path, monkeypatch, adapters_for: tuple[str, ...] = ("hypersd-k1",)):
    import app
    from hypersd_core.app.service import AppSettings

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-tmp"))
    monkeypatch.setenv("HYPERSD_STUDY_SALT", "browser-salt-0123456789")
    model = make_tiny_digits(tmp_path / "tiny")
    adapters = tmp_path / "adapters"
    for name in adapters_for:
        make_lora_file(model, adapters / name / "pytorch_lora_weights.safetensors")
    monkeypatch.setattr("hypersd_core.models.backbone.DIGITS_ADAPTERS", adapters)
    settings = AppSettings.from_env(
        model=str(model), runs_dir=tmp_path / "runs",
        study_db=tmp_path / "study" / "votes.db", lora_dir=tmp_path / "loras",
        port=free_port())
    return app, settings


def _launch(app, settings):
    demo = app.build_demo(settings)
    kwargs = {**app.launch_kwargs(settings), "prevent_thread_lock": True, "quiet": True}
    _, url, _ = demo.launch(**kwargs)
    return demo, url


@pytest.fixture()
def app_url(tmp_path, monkeypatch):
    # the page's default recipe (Hyper-SD, its default step count) needs its adapter
    app, settings = _app(tmp_path, monkeypatch, ("hypersd-k1", "hypersd-k4"))
    demo, url = _launch(app, settings)
    yield url
    demo.close()


def test_generation_in_the_browser_is_large_and_pixelated(app_url, tmp_path):
    with Chromium() as browser:
        browser.open(app_url)
        browser.wait("document.querySelector('#generate-button') !== null", timeout=60)
        assert browser.js("document.title") == "Hyper-SD Studio"
        browser.click("#generate-button")  # defaults: Hyper-SD
        state = browser.wait("""(() => {
            const img = document.querySelector('#generate-image img');
            if (img && img.complete && img.naturalWidth > 0) return 'image';
            const toast = document.querySelector('.toast-body, [data-testid="toast-body"]');
            if (toast) return 'error: ' + toast.textContent;
            return null; })()""", timeout=120)
        if state != "image":
            browser.screenshot(tmp_path / "failure.png")
            pytest.fail(f"no image after Generate: {state}; screenshot {tmp_path}/failure.png")
        src = browser.js("document.querySelector('#generate-image img').src")
        assert src.startswith("http") and src.endswith(".png")
        shown = browser.js("""(() => { const i = document.querySelector('#generate-image img');
            const r = i.getBoundingClientRect();
            return {natural: i.naturalWidth, width: r.width, height: r.height,
                    rendering: getComputedStyle(i).imageRendering}; })()""")
        assert shown["natural"] == 32  # the tiny model's own pixels, as the API returns them
        assert shown["width"] >= 256 and shown["height"] >= 256, shown
        assert shown["rendering"] in ("pixelated", "crisp-edges"), shown  # never smoothed


def test_plots_of_a_short_run_draw_lines(tmp_path, monkeypatch):
    from train_tab import controller as ctl

    app, settings = _app(tmp_path, monkeypatch)
    # 4 steps, everything logged every step, the fixed samples scored at steps 3 and 4
    run, _ = ctl.start(_settings_text(4), settings.model, "", "digits", settings)
    _wait(lambda: run.status()["state"] in ("done", "failed"), 900, "the 4-step run to finish")
    assert run.status()["state"] == "done", ctl.log_tail(run)
    records, _ = run.read_metrics()
    assert [r["step"] for r in records if any(k.startswith("reward/") for k in r)] == [3, 4]
    demo, url = _launch(app, settings)
    try:
        with Chromium() as browser:
            browser.open(url)
            browser.wait("document.querySelector('#generate-button') !== null", timeout=60)
            browser.click_text("button[role=tab]", "Train & Monitor")
            try:
                for title in ("loss", "reward scores", "learning rate"):
                    lines = browser.wait(f"(() => {{ const n = {LINES_JS}({title!r});"
                                         " return n.length && n.every(c => c > 0) ? n : null; })()",
                                         timeout=30)
                    assert lines, title
                browser.click_text("button[role=tab]", "Rewards")
                browser.wait(f"(() => {{ const n = {LINES_JS}('reward scores');"
                             " return n.length && n.every(c => c > 0); })()", timeout=30)
            except TimeoutError:
                shot = browser.screenshot(tmp_path / "plots.png")
                found = {t: browser.js(f"{LINES_JS}({t!r})")
                         for t in ("loss", "reward scores", "learning rate")}
                pytest.fail(f"plots without visible lines (coloured data lines per plot: {found}); "
                            f"screenshot {shot}")
    finally:
        demo.close()
