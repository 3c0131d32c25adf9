"""End to end in headless Chromium: open the page, run a 1-step generation, see the image.

Skipped when Debian's ``chromium`` is not installed.
"""

from __future__ import annotations

import pytest
from cdp import Chromium, find_chromium
from test_app import free_port, make_lora_file, make_tiny_digits

pytestmark = [pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed")]


@pytest.fixture()
def app_url(tmp_path, monkeypatch):
    import app
    from hypersd_core.app.service import AppSettings

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-tmp"))
    monkeypatch.setenv("HYPERSD_STUDY_SALT", "browser-salt-0123456789")
    model = make_tiny_digits(tmp_path / "tiny")
    # the page's default recipe (Hyper-SD, 1 step) uses adapter hypersd-k1: give the tiny model one
    adapters = tmp_path / "adapters"
    make_lora_file(model, adapters / "hypersd-k1" / "pytorch_lora_weights.safetensors")
    monkeypatch.setattr("hypersd_core.models.backbone.DIGITS_ADAPTERS", adapters)
    settings = AppSettings.from_env(
        model=str(model), runs_dir=tmp_path / "runs",
        study_db=tmp_path / "study" / "votes.db", lora_dir=tmp_path / "loras",
        port=free_port())
    demo = app.build_demo(settings)
    kwargs = {**app.launch_kwargs(settings), "prevent_thread_lock": True, "quiet": True}
    _, url, _ = demo.launch(**kwargs)
    yield url
    demo.close()


def test_one_step_generation_in_the_browser(app_url, tmp_path):
    with Chromium() as browser:
        browser.open(app_url)
        browser.wait("document.querySelector('#generate-button') !== null", timeout=60)
        assert browser.js("document.title") == "Hyper-SD Studio"
        browser.click("#generate-button")  # defaults: Hyper-SD, 1 step
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
        assert browser.js("document.querySelector('#generate-image img').naturalWidth") == 32
