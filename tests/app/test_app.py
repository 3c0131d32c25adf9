"""The Gradio app in-process: endpoints via gradio_client, training via the tab's functions,
the study's vote flow and concurrency, and route safety via fastapi's TestClient."""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import pytest
import yaml
from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_digits(folder):
    """A tiny random SD1.5-shaped pipeline marked as the digits kind (so digits data trains it)."""
    from conftest import build_tiny_sd15

    build_tiny_sd15(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_hypersd"] = {"kind": "digits", "guidance_scale": 2.0}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def make_lora_file(model_dir, out_file):
    """A random rank-4 LoRA for the tiny UNet, saved under an official-looking file name."""
    import torch
    from diffusers import UNet2DConditionModel

    from hypersd_core.models.lora import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    torch.manual_seed(0)
    add_lora(unet, 4, 4.0)
    saved = save_lora(unet, out_file.parent / "_tmp")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    saved.rename(out_file)
    return out_file


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Settings pointing every location at a temp folder, and a tiny model."""
    from hypersd_core.app.service import AppSettings

    root = tmp_path_factory.mktemp("app")
    model = make_tiny_digits(root / "tiny")
    make_lora_file(model, root / "loras" / "Hyper-SD15-1step-lora.safetensors")
    study_yaml = root / "study.yaml"
    study_yaml.write_text(yaml.safe_dump({
        "prompts": ["a red handwritten digit 7", "a blue handwritten digit 3"],
        "methods": ["teacher", "hypersd-unet"], "steps": [1, 2], "seeds": [0, 1]}))
    mp = pytest.MonkeyPatch()
    mp.setattr("hypersd_core.models.backbone.DIGITS_ADAPTERS", root / "no-adapters")  # tiny: none shipped
    mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio-tmp"))
    mp.setenv("HYPERSD_STUDY_SALT", "test-salt-0123456789abcdef")
    settings = AppSettings.from_env(
        model=str(model), runs_dir=root / "runs", study_db=root / "study" / "votes.db",
        study_config=study_yaml, lora_dir=root / "loras", models_dir=root / "models",
        data_dir=root / "data", port=free_port(), max_file_size="1mb")
    yield settings
    mp.undo()


@pytest.fixture(scope="module")
def launched(env):
    """The app launched in-process on a free port; yields (demo, url)."""
    import app

    demo = app.build_demo(env)
    kwargs = app.launch_kwargs(env)
    kwargs.update(prevent_thread_lock=True, quiet=True)
    _, url, _ = demo.launch(**kwargs)
    yield demo, url
    demo.close()
    demo.hypersd["store"].close()


@pytest.fixture(scope="module")
def client(launched):
    from gradio_client import Client

    return Client(launched[1], verbose=False)


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


# ------------------------------------------------------------------ endpoints
def test_named_endpoints(client):
    assert {"/generate", "/compare"} <= set(client.view_api(return_format="dict")["named_endpoints"])


def test_generate(client):
    image, info = client.predict("a red handwritten digit 7", "hypersd-unet", 1, 3,
                                 api_name="/generate")
    assert is_png(image)
    assert Image.open(image).size == (32, 32)
    assert info["method"] == "hypersd-unet" and info["steps"] == 1 and info["seed"] == 3


def test_generate_missing_adapter_is_a_clear_error(client):
    with pytest.raises(Exception, match="adapter"):
        client.predict("a red handwritten digit 7", "lcm", 4, 0, api_name="/generate")


def test_compare_all_cells_png(client):
    lora = "Hyper-SD15-1step-lora.safetensors"
    reference, cells, table, summary = client.predict(
        "a red handwritten digit 7", 0, [lora], [], api_name="/compare")
    assert is_png(reference)
    assert len(cells) == 6 * 4  # five methods + one official LoRA row, x 1/2/4/8 steps
    assert all(is_png(c["image"]) for c in cells)
    captions = [c["caption"] for c in cells]
    assert all(f"· {n} step{'s' * (n > 1)} ·" in captions[i]
               for i, n in enumerate([1, 2, 4, 8] * 6))
    # the tiny model ships no adapters: those cells say so instead of breaking the grid
    assert sum("not available" in c for c in captions) == 16
    assert all(" s" in c and "not available" not in c for c in captions[:4] + captions[20:])
    assert len(table["data"]) == 1 + 24  # plus the teacher's 25-step reference
    assert "Reference: teacher (reference) · 25 steps" in summary


def test_compare_switches_adapters_without_reloading(launched, client):
    service = launched[0].hypersd["service"]
    pipe = service.sampler.backbone.pipe
    client.predict("a blue handwritten digit 3", 1, ["Hyper-SD15-1step-lora.safetensors"], [],
                   api_name="/compare")
    assert service.sampler.backbone.pipe is pipe
    assert "Hyper-SD15-1step-lora" in service.sampler.adapters.loaded


# -------------------------------------------------------------------- training
def _wait(predicate, timeout: float, what: str, every: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _settings_text(steps: int, **extra) -> str:
    from train_tab import controller as ctl

    values = yaml.safe_load(ctl.preset_text("digits-tscd-k8"))
    values.update(steps=steps, batch_size=2, log_every=1, sample_every=max(1, min(steps, 3)),
                  checkpoint_every=max(1, min(steps, 5)), warmup_steps=1, **extra)
    return yaml.safe_dump(values)


def test_settings_errors_shown_before_start(env):
    from train_tab import controller as ctl

    bad = _settings_text(3).replace("lora_rank: 16", "lora_rank: 0") + "w_min: 9\n"
    checked = ctl.check_settings(bad, env.model, "", "digits", env)
    assert checked.config is None
    assert any("lora_rank" in e for e in checked.errors) and any("w_min" in e for e in checked.errors)
    with pytest.raises(ctl.ControlError, match="lora_rank"):
        ctl.start(bad, env.model, "", "digits", env)
    typed = ctl.check_settings("init_adapter: /etc/passwd\n", env.model, "", "digits", env)
    assert typed.config.init_adapter == ""  # a typed path is never used: the dropdown chooses
    assert any("init_adapter" in n and "not used" in n for n in typed.notes)
    ok = ctl.check_settings(_settings_text(3), env.model, "", "digits", env)
    assert ok.config is not None and "steps: 3" in ok.resolved


def test_short_training_run_polled_to_done_and_plotted(env):
    from train_tab import controller as ctl
    from train_tab.ui import tick

    run, msg = ctl.start(_settings_text(3), env.model, "", "digits", env)
    assert msg.startswith("Started run")
    state = {"offset": 0, "records": [], "sample": "", "out": None}

    def done():
        out = tick(env, run.dir.name, state["offset"], state["records"], state["sample"])
        state.update(offset=out[6], records=out[7], sample=out[8], out=out)
        return run.status()["state"] in ("done", "failed")

    _wait(done, 240, "the 3-step run to finish")
    status = run.status()
    assert status["state"] == "done", (status, ctl.log_tail(run))
    out = tick(env, run.dir.name, 0, [], "", force=True)
    assert [x for x, _ in ctl.metric_series(out[7])["loss"]["loss"]] == [1, 2, 3]
    assert out[1].count('class="hsd-line"') >= 1 and out[3].count('class="hsd-line"') == 1
    assert out[1].count("<circle") >= 3  # loss and lr drawn, one marker per step
    assert out[4] is not None and out[4].size[0] >= 256  # the sample grid, enlarged (PIL)
    assert "state **done**" in out[0] and "step 3/3" in out[0]
    assert run.dir.name in [rid for _, rid in ctl.init_choices(env)]  # usable by the next stage


def test_queue_stop_and_resume(env):
    from train_tab import controller as ctl

    long_run, _ = ctl.start(_settings_text(100000), env.model, "", "digits", env)
    _wait(lambda: long_run.status().get("step", 0) >= 2, 180, "the long run to train")
    second, msg = ctl.start(_settings_text(3), env.model, "", "digits", env)
    assert f"waits because run {long_run.dir.name} is training" in msg
    _wait(lambda: "waits because" in ctl.status_text(second), 30, "the wait note")
    assert "will not start" in ctl.stop(second.dir.name, env)
    _wait(lambda: second.status()["state"] == "stopped", 30, "the waiting run to stop")

    ctl.stop(long_run.dir.name, env)
    _wait(lambda: long_run.status()["state"] == "stopped", 60, "the long run to stop")
    stopped_at = long_run.status()["step"]
    assert long_run.latest_checkpoint() is not None
    msg = ctl.resume(long_run.dir.name, env)
    assert "Resuming" in msg and "step-" in msg
    _wait(lambda: long_run.status()["state"] == "running"
          and long_run.status()["step"] > stopped_at, 180, "the resumed run to go on")
    records, _ = long_run.read_metrics()
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one continuous curve
    ctl.stop(long_run.dir.name, env)
    _wait(lambda: long_run.status()["state"] == "stopped", 60, "the resumed run to stop")
    with pytest.raises(ctl.ControlError, match="not running"):
        ctl.stop(long_run.dir.name, env)


def test_public_mode_disables_training(env):
    import dataclasses

    from train_tab import controller as ctl

    public = dataclasses.replace(env, public=True)
    with pytest.raises(ctl.ControlError, match="--public"):
        ctl.start(_settings_text(3), env.model, "", "digits", public)
    with pytest.raises(ctl.ControlError, match="--public"):
        ctl.resume("anything", public)


# ----------------------------------------------------------------------- study
@pytest.fixture()
def handlers(launched, env):
    from compare_tab.study import StudyHandlers
    from hypersd_core.study.store import StudyConfig

    demo = launched[0]
    return StudyHandlers(demo.hypersd["service"], demo.hypersd["store"],
                         StudyConfig.from_yaml(env.study_config))


def test_vote_flow_and_replay(handlers):
    left, right, caption, _, token, *_ = handlers.next_pair()
    assert isinstance(left, Image.Image) and not left.info and not right.info
    assert "teacher" not in caption and "hypersd" not in caption  # blind until the vote
    message, cleared, *_ = handlers.vote("A", token)
    assert message.startswith("Thanks!") and cleared is None
    assert "teacher" in message and "hypersd-unet" in message  # revealed after the vote
    replay, *_ = handlers.vote("B", token)
    assert "rejected" in replay and "already used" in replay
    forged, *_ = handlers.vote("A", "forged-token")
    assert "rejected" in forged
    frame = handlers.store.votes_frame()
    assert (frame.token == token).sum() == 1


def test_concurrent_votes_stored_once(handlers, monkeypatch):
    threads_n, per_thread = 16, 50
    store, config = handlers.store, handlers.config
    # every thread votes as one voter here: lift the per-voter cap (tested on its own)
    monkeypatch.setattr(config, "votes_per_voter", 10 * threads_n * per_thread)
    before = len(store.votes_frame())
    tokens = [store.next_pair(config).token for _ in range(threads_n * per_thread)]
    stored, rejected = [0] * threads_n, [0] * threads_n
    barrier = threading.Barrier(threads_n)

    def voter(i: int):
        barrier.wait()
        mine = tokens[i * per_thread:(i + 1) * per_thread]
        other = tokens[((i + 1) % threads_n) * per_thread:((i + 2) % threads_n or threads_n) * per_thread]
        for j, tok in enumerate(mine):
            for t in (tok, other[j]):  # every token is also raced by another thread
                message, *_ = handlers.vote(("A", "B", "tie", "both_bad")[j % 4], t)
                if message.startswith("Thanks"):
                    stored[i] += 1
                else:
                    rejected[i] += 1

    t0 = time.perf_counter()
    workers = [threading.Thread(target=voter, args=(i,)) for i in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    frame = store.votes_frame()
    new = frame[frame.token.isin(tokens)]
    print(f"\nconcurrent votes: {threads_n} threads x {per_thread} tokens (each also raced by a "
          f"second thread): {sum(stored)} stored, {sum(rejected)} rejected, "
          f"{len(new)} rows for {len(tokens)} tokens in {seconds:.2f} s "
          f"({sum(stored) / seconds:.0f} votes/s)")
    assert sum(stored) == len(tokens) and sum(rejected) == len(tokens)
    assert len(new) == len(tokens) and new.token.is_unique
    assert len(frame) == before + len(tokens)


def test_results_and_csv(handlers, tmp_path):
    from compare_tab.study_results import compute

    res = compute(handlers.store, handlers.config, n_boot=100)
    assert {"method", "steps", "strength", "ci_low", "ci_high"} <= set(res.strengths.columns)
    assert "all" not in set(res.strengths.steps)  # strengths only within a step count
    path = handlers.store.export_csv(tmp_path / "votes.csv")
    assert path.read_text().startswith("pair_id,status,shown_at")  # more in tests/study


# ---------------------------------------------------------------------- routes
def test_routes_are_safe(launched, env):
    from fastapi.testclient import TestClient

    demo = launched[0]
    http = TestClient(demo.app)
    ckpt = env.runs_dir / "some-run" / "checkpoints" / "step-0000001" / "lora.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"x")
    dotenv = env.runs_dir.parent / ".env"
    dotenv.write_text("SECRET=1")
    for path in (env.study_db, ckpt, env.study_db.parent / "study_salt"):
        assert http.get(f"/gradio_api/file={path}").status_code == 403, path
    cache = env.runs_dir.parent / "gradio-tmp"
    # percent-encoded dots: a plain "../" would be resolved by the HTTP client itself
    for bad in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd",
                f"{cache}/%2e%2e/%2e%2e/etc/passwd", f"{cache}/..%2F.env", str(dotenv),
                f"{env.runs_dir}/..%2Fstudy/votes.db"):
        r = http.get(f"/gradio_api/file={bad}")
        assert r.status_code == 403 and "root:" not in r.text, bad
    assert http.get("/monitoring").status_code != 200
    assert http.get("/monitoring/summary").status_code != 200
    big = io.BytesIO(b"\0" * (2 * 1024 * 1024))
    r = http.post("/gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert r.status_code == 413, r.status_code
    small = io.BytesIO(b"\0" * 1024)
    assert http.post("/gradio_api/upload",
                     files={"files": ("small.png", small, "image/png")}).status_code == 200


def test_safe_launch_settings(env):
    import app

    kw = app.launch_kwargs(env)
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is False
    assert kw["enable_monitoring"] is False and kw["allowed_paths"] == []
    assert str(env.runs_dir) in kw["blocked_paths"] and str(env.study_db) in kw["blocked_paths"]


def test_compare_cells_carry_reward_scores(client):
    _, cells, table, summary = client.predict(
        "a green handwritten digit 0", 2, [], ["digits-quality", "digits-alignment"],
        api_name="/compare")
    teacher = [c["caption"] for c in cells[:4]]
    assert all("quality" in c and "alignment" in c for c in teacher), teacher
    assert "digits-quality" in table["headers"]


def test_score_table(launched):
    from train_tab.rewards_view import score_table

    service = launched[0].hypersd["service"]
    images = [Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))]
    frame, note = score_table(service, images, ["a red handwritten digit 7"] * 2,
                              ["digits-quality", "digits-perception"])
    assert list(frame["digits-quality"].between(0, 1)) == [True, True]
    assert "digits-perception" in note and "ground-truth" in note


@pytest.mark.slow  # a chain of training processes
def test_chain_passes_adapters_and_stops_after_a_failed_stage(env, tmp_path):
    from hypersd_core.training import chain
    from hypersd_core.training.config import load_preset

    first = load_preset("digits-tscd-k8", {"model": str(tmp_path / "missing-model"), "steps": 2})
    second = load_preset("digits-tscd-k4", {"model": env.model, "steps": 2})
    runs = chain.create_chain([first, second], tmp_path / "runs")
    assert runs[1].config().init_adapter == str(runs[0].final_dir / "pytorch_lora_weights.safetensors")
    assert all(r.status()["state"] == "queued" for r in runs)
    chain.drive(runs, tmp_path / "runs", poll_s=0.2, log=lambda m: None)
    assert runs[0].status()["state"] == "failed"
    assert runs[0].status()["error"]  # (the trainer records setup errors only as "process gone")
    assert runs[1].status()["state"] == "stopped"
    assert "not started" in runs[1].status()["error"]


def test_public_page_has_training_controls_off(env):
    import dataclasses

    import app

    demo = app.build_demo(dataclasses.replace(env, public=True))
    comps = demo.config["components"]
    buttons = {c["props"].get("value"): c["props"] for c in comps if c["type"] == "button"}
    for name in ("Start", "Stop", "Resume"):
        assert buttons[name]["interactive"] is False
    texts = " ".join(str(c["props"].get("value")) for c in comps if c["type"] == "markdown")
    assert "Training is off because the app was started with --public" in texts
    demo.hypersd["store"].close()
