"""Access rules without a launched app: forwarded addresses trusted only behind configured
proxies, the owner role, and error lines that never name server folders."""

from __future__ import annotations

import pytest

from hypersd_core.app import access
from hypersd_core.app.service import AppSettings


def test_forwarded_for_is_read_only_behind_trusted_proxies():
    headers = {"x-forwarded-for": "6.6.6.6, 203.0.113.7"}  # client wrote 6.6.6.6, proxy appended
    assert access.client_address(headers, "10.0.0.1", 0) == "10.0.0.1"
    assert access.client_address(headers, "10.0.0.1", 1) == "203.0.113.7"
    assert access.client_address(headers, "10.0.0.1", 2) == "6.6.6.6"
    assert access.client_address({"x-forwarded-for": "6.6.6.6"}, "10.0.0.1", 2) == "10.0.0.1"


def test_owner_role(tmp_path):
    local = AppSettings(public=False, owner_token="")
    public = AppSettings(public=True, owner_token="s3cret")
    assert access.refusal("owner", local, "127.0.0.1") == ""
    assert access.refusal("owner", local, "192.0.2.1") == access.OWNER_REFUSED
    assert access.refusal("owner", public, "127.0.0.1") == access.OWNER_REFUSED  # a proxy's peer
    assert access.refusal("owner", public, "192.0.2.1", "wrong") == access.OWNER_REFUSED
    assert access.refusal("owner", public, "192.0.2.1", "s3cret") == ""
    assert "--public" in access.refusal("training", public, "127.0.0.1")
    assert access.refusal("public", public, None) == ""


def test_error_lines_do_not_name_server_folders(tmp_path):
    import gradio as gr

    from train_tab import controller as ctl
    from ui_common.guard import guard

    assert access.scrub_paths("no model at /srv/app/models/sd15 (see https://hf.co/x/y)") == \
        "no model at sd15 (see https://hf.co/x/y)"

    def fails():
        raise FileNotFoundError(f"{tmp_path}/models/sd15/model_index.json not found")

    with pytest.raises(gr.Error) as err:
        guard(fails, "public", AppSettings())()
    assert str(tmp_path) not in err.value.message and "model_index.json" in err.value.message

    settings = AppSettings(runs_dir=tmp_path / "runs")
    with pytest.raises(ctl.ControlError) as err:
        ctl.find_run("nope", settings)
    assert str(tmp_path) not in str(err.value)
