"""Who may call what, probed over HTTP the way a hostile client would: every event by
``fn_index``, anonymously, against the app in public (Space) mode. Every owner-only and
training event must be refused on the server, no event may be auto-named, the editor's
blob route is bounded, and one client cannot fill the queue."""

from __future__ import annotations

import ast
import io
import json
import socket
import threading
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
UI_FILES = [ROOT / "app.py", *sorted((ROOT / "compare_tab").glob("*.py")),
            *sorted((ROOT / "train_tab").glob("*.py"))]
EVENTS = {"click", "change", "input", "select", "tick", "load", "then", "submit", "success",
          "upload", "release", "blur", "focus", "clear", "edit", "stop"}
NOT_COMPONENTS = {"jar", "safe_yaml", "yaml", "json", "ctl"}
OWNER_TOKEN = "owner-secret-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def public_app(tmp_path_factory):
    """The app as a Space runs it: public, one trusted proxy, an owner token."""
    from conftest import build_tiny_sd15

    import app
    from hypersd_core.app.service import AppSettings

    root = tmp_path_factory.mktemp("access")
    model = build_tiny_sd15(root / "tiny")
    index = json.loads((model / "model_index.json").read_text())
    index["_hypersd"] = {"kind": "digits", "guidance_scale": 2.0}
    (model / "model_index.json").write_text(json.dumps(index))
    study_yaml = root / "study.yaml"
    study_yaml.write_text(yaml.safe_dump({
        "prompts": ["a red handwritten digit 7"], "methods": ["teacher", "hypersd-unet"],
        "steps": [1], "seeds": [0]}))
    mp = pytest.MonkeyPatch()
    mp.setattr("hypersd_core.models.backbone.DIGITS_ADAPTERS", root / "no-adapters")
    mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio-tmp"))
    mp.setenv("HYPERSD_STUDY_SALT", "test-salt-0123456789abcdef")
    # Gradio's launch gives up when the first HEAD of the page takes over 3 s (a loaded
    # machine); the probe's own calls below fail loudly if the server is not up
    mp.setattr("gradio.networking.url_ok", lambda url: True)
    settings = AppSettings.from_env(
        model=str(model), runs_dir=root / "runs", study_db=root / "study" / "votes.db",
        study_config=study_yaml, lora_dir=root / "loras", models_dir=root / "models",
        data_dir=root / "data", port=_free_port(), public=True)
    settings.owner_token, settings.trusted_proxies, settings.queue_per_client = OWNER_TOKEN, 1, 3
    demo = app.build_demo(settings)
    kwargs = app.launch_kwargs(settings)
    kwargs.update(prevent_thread_lock=True, quiet=True)
    _, url, _ = demo.launch(**kwargs)
    yield demo, url.rstrip("/"), settings
    demo.close()
    demo.hypersd["store"].close()
    mp.undo()


def call(url: str, fn_index: int, data: list, trigger_id=None, session: str | None = None,
         headers: dict | None = None, timeout: float = 300) -> dict:
    """One event over plain HTTP: join the queue by fn_index, read the event stream until
    the call completes; returns the final message (success, output)."""
    session = session or uuid.uuid4().hex[:10]
    with httpx.Client(base_url=url, headers=headers or {}, timeout=timeout) as http:
        join = http.post("/gradio_api/queue/join", json={
            "data": data, "fn_index": fn_index, "session_hash": session,
            "trigger_id": trigger_id, "event_data": {"index": 0, "value": "x", "selected": True}})
        if join.status_code != 200:
            return {"success": False, "joined": False, "status": join.status_code,
                    "output": {"error": join.json().get("detail")}}
        event_id = join.json()["event_id"]
        with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as r:
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") == event_id and msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError(f"fn_index {fn_index}: no completion")


def default_inputs(config: dict, dep: dict) -> list:
    """Each input component's default value from /config; prompts left empty so that
    the public generation events answer at once (they are reached, not run)."""
    comps = {c["id"]: c for c in config["components"]}
    out = []
    for cid in dep["inputs"]:
        props = comps[cid].get("props", {})
        value = props.get("value")
        if comps[cid]["type"] == "textbox" and "prompt" in str(props.get("label", "")).lower():
            value = ""
        out.append(value)
    return out


def error_of(msg: dict) -> str:
    out = msg.get("output") or {}
    return str(out.get("error") or "") if not msg.get("success") else ""


# ---------------------------------------------------------------- the probe
def test_every_event_is_named_and_guarded_in_the_source():
    """Each event listener in the UI code names its endpoint and wraps its function in
    guard(..., role, ...): none is auto-named (lambda_3, handler_1) and none unchecked."""
    missing = []
    for path in UI_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in EVENTS and node.args):
                continue
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id in NOT_COMPONENTS:
                continue  # a module or cookie jar, not an event listener
            first = node.args[0]
            named = any(k.arg == "api_name" for k in node.keywords)
            guarded = (isinstance(first, ast.Call) and isinstance(first.func, ast.Name)
                       and first.func.id == "guard")
            if not (named and guarded):
                missing.append(f"{path.name}:{node.lineno} .{node.func.attr}(...)")
    assert not missing, missing


def test_anonymous_calls_by_fn_index(public_app):
    """Every event, called by fn_index with no cookie and no token: owner and training
    events are refused with their one-line reason; public ones are reached."""
    from hypersd_core.app.access import OWNER_REFUSED

    demo, url, settings = public_app
    config = httpx.get(f"{url}/config").json()
    deps = [d for d in config["dependencies"] if d.get("backend_fn")]
    assert len(deps) == len([f for f in demo.fns.values() if f.fn is not None]) > 30
    names, refused, reached = set(), {}, {}
    for dep in deps:
        fn = demo.fns[dep["id"]]
        role = getattr(fn.fn, "access_role", None)
        assert role in ("public", "owner", "training"), (dep["id"], dep.get("api_name"))
        api_name = dep["api_name"]
        assert api_name not in names, api_name
        names.add(api_name)
        trigger = dep["targets"][0][0] if dep.get("targets") else None
        msg = call(url, dep["id"], default_inputs(config, dep), trigger)
        error = error_of(msg)
        if role == "owner":
            assert error == OWNER_REFUSED, (api_name, error)
            refused[api_name] = role
        elif role == "training":
            assert error == settings.training_disabled_reason, (api_name, error)
            refused[api_name] = role
        else:
            assert OWNER_REFUSED not in error and "Training is off" not in error, (api_name, error)
            reached[api_name] = error[:60]
        assert "/" not in error or "http" in error, (api_name, error)  # no server paths
    print(f"\n{len(deps)} events: {len(refused)} refused anonymously "
          f"({', '.join(sorted(refused))}); {len(reached)} public")
    assert {"study_export", "study_results", "study_results_tab", "train_start", "train_chain",
            "train_stop", "train_resume", "train_check_settings"} <= set(refused)
    assert not list(settings.runs_dir.glob("*")) if settings.runs_dir.exists() else True


def test_owner_token_opens_the_export(public_app):
    demo, url, _ = public_app
    export = next(i for i, f in demo.fns.items() if f.api_name == "study_export")
    assert error_of(call(url, export, ["wrong-token"])) != ""
    msg = call(url, export, [OWNER_TOKEN])
    assert msg["success"], msg
    files = msg["output"]["data"][0]
    assert [Path(f["path"]).name for f in files] == ["votes.csv", "votes.columns.md"]


# ---------------------------------------------------------------- editor blobs
def _blob(url: str, component_id: int, index, blob_id: str, size: int = 100):
    return httpx.post(f"{url}/gradio_api/component_server", data={
        "component_id": str(component_id), "session_hash": "s1", "fn_name": "accept_blobs",
        "type": "layer", "index": str(index), "id": blob_id},
        files={"blob": ("blob", io.BytesIO(b"\0" * size), "application/octet-stream")})


def test_editor_blob_route_is_bounded(public_app):
    from ui_common.guard import MAX_BLOB_BYTES, MAX_PENDING_DRAWINGS

    demo, url, _ = public_app
    sketch = next(b for b in demo.blocks.values() if type(b).__name__ == "BoundedSketchpad")
    r = _blob(url, sketch._id, 1_000_000, "bomb")  # the old route allocated index + 1 slots
    assert r.status_code >= 400
    held = sketch.blob_storage.get("bomb")
    assert held is None or len(held.layers) <= 3
    assert _blob(url, sketch._id, 0, "big", MAX_BLOB_BYTES + 1).status_code >= 400
    for i in range(MAX_PENDING_DRAWINGS + 8):
        assert _blob(url, sketch._id, 0, f"d{i}").status_code == 200
    assert len(sketch.blob_storage) == MAX_PENDING_DRAWINGS


def test_sketchpad_bomb_is_one_short_error(tmp_path):
    import gradio as gr
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData

    from hypersd_core.app.limits import guard_decoder
    from ui_common.guard import BoundedSketchpad

    guard_decoder()
    bomb = tmp_path / "bomb.png"
    Image.new("1", (4000, 4000)).save(bomb)  # 16 M pixels in a few KB
    pad = BoundedSketchpad(type="pil", canvas_size=(256, 256))
    with pytest.raises(gr.Error) as err:
        pad.preprocess(EditorData(background=None, layers=[], composite=FileData(path=str(bomb))))
    assert "too large" in err.value.message and len(err.value.message) < 100


# ---------------------------------------------------------------- queue
def test_one_client_cannot_fill_the_queue(public_app):
    """A client with queue_per_client calls waiting is refused; another client still joins."""
    demo, url, settings = public_app
    generate = next(i for i, f in demo.fns.items() if f.api_name == "generate")
    block_fn = demo.fns[generate]
    queue = demo._queue
    hold = threading.Lock()
    hold.acquire()
    real = block_fn.fn

    def slow(*args):  # every call holds the GPU slot until released: a backlog forms
        hold.acquire(timeout=60)
        hold.release()
        return None, {}

    block_fn.fn = slow
    try:
        args = [c.value for c in block_fn.inputs]  # the page's defaults: they preprocess
        joins = []
        for _ in range(settings.queue_per_client + 3):
            r = httpx.post(f"{url}/gradio_api/queue/join", headers={"x-forwarded-for": "198.51.100.1"},
                           json={"data": args, "fn_index": generate, "session_hash": uuid.uuid4().hex[:10]})
            joins.append(r.status_code)
        other = httpx.post(f"{url}/gradio_api/queue/join", headers={"x-forwarded-for": "198.51.100.2"},
                           json={"data": args, "fn_index": generate, "session_hash": "other"})
        waiting = sum(len(q.queue) for q in queue.event_queue_per_concurrency_id.values())
    finally:
        hold.release()
        block_fn.fn = real
    accepted = joins.count(200)
    # one running + queue_per_client waiting; the rest refused; another client still joins
    assert accepted <= settings.queue_per_client + 1 and 503 in joins, joins
    assert other.status_code == 200 and waiting >= 1
