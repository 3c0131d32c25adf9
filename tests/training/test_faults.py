"""Fault injection: kill -9 during training and during checkpoint writes (resume ends on
the same weights as an uninterrupted run), same-size corruption of the newest
checkpoint (resume falls back to the previous one, naming the bad one), concurrent
resume (refused, naming the holder's PID; the lock goes with a killed process), a run
that cannot start (status "failed" with the reason), non-finite weights never
checkpointed, and the decompression-bomb upload refused by the app with bounded RSS.

The default run keeps one kill of each kind; ``-m slow`` runs the long random loop.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

from hypersd_core.training.config import make_config
from hypersd_core.training.runs import COMPLETE, Run, RunLockedError, launch, lock_holder
from hypersd_core.training.trainer import NonFiniteLossError, train

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# the trainer in a child process, with every checkpoint file write followed by a pause:
# a kill that lands in the pause leaves a checkpoint half written (no COMPLETE manifest)
SLOW_WRITES = """
import sys, time
import safetensors.torch, torch
def slow(fn):
    def wrapped(*a, **k):
        out = fn(*a, **k)
        time.sleep(float(sys.argv[2]))
        return out
    return wrapped
torch.save = slow(torch.save)
safetensors.torch.save_file = slow(safetensors.torch.save_file)
from hypersd_core.training.trainer import main
sys.exit(main(["--run-dir", sys.argv[1]] + sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), 8)


def _cfg(model, data, **kw):
    values = {"model": str(model), "data": str(data), "steps": 8, "batch_size": 2,
              "log_every": 1, "sample_every": 1000, "checkpoint_every": 2, "lora_rank": 4,
              "lora_alpha": 4, "keep_checkpoints": 2,
              "sample_prompts": ["a red handwritten digit 1"], **kw}
    return make_config(values)


def _final(run: Run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run.final_dir / "pytorch_lora_weights.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _start(run: Run, resume: bool, pause: float) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SLOW_WRITES, str(run.dir), str(pause)]
    return subprocess.Popen(cmd + (["--resume"] if resume else []), cwd=ROOT, env=ENV,
                            start_new_session=True, stdout=open(run.dir / "log.txt", "a"),
                            stderr=subprocess.STDOUT)


def _kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _wait(predicate, proc: subprocess.Popen, timeout: float = 240) -> bool:
    """Poll until predicate() or the process ends; True when predicate() held."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError("the run neither reached the point nor ended")


def _writing(run: Run) -> bool:
    """A checkpoint is being written: its temp folder holds a file but no manifest yet."""
    for tmp in run.checkpoints_dir.glob("step-*.tmp"):
        try:
            names = {p.name for p in tmp.iterdir()}
        except FileNotFoundError:
            continue
        if names and COMPLETE not in names:
            return True
    return False


def _run_with_kills(run: Run, kinds: list[str], rng: random.Random) -> dict:
    """Start, kill -9 at each planned point ("train": a random step; "write": inside a
    checkpoint write), resume, until the run is done. Returns counts."""
    stats = {"kills_in_training": 0, "kills_in_writes": 0, "starts": 0, "missed": 0}
    resume = False
    for kind in kinds + [None]:
        proc = _start(run, resume, pause=0.4)
        stats["starts"] += 1
        if kind is None:
            assert proc.wait(timeout=300) == 0, run.log_path.read_text()[-3000:]
            break
        if kind == "train":
            target = run.status().get("step", 0) + rng.randint(1, 3)
            hit = _wait(lambda t=target: run.status().get("state") == "running"
                        and run.status().get("step", 0) >= t, proc)
        else:
            hit = _wait(lambda: _writing(run), proc)
        if hit:
            _kill9(proc)
            stats["kills_in_training" if kind == "train" else "kills_in_writes"] += 1
            assert run.status()["state"] == "failed"  # the dead process is seen as such
            assert run.holder() is None  # kill -9 released the lock
        else:  # the run ended before the planned point
            stats["missed"] += 1
            assert proc.wait(timeout=60) == 0
            break
        resume = True
    return stats


@pytest.fixture(scope="module")
def straight(tiny_sd15, data_dir, tmp_path_factory):
    """The uninterrupted run every interrupted one must match."""
    run = Run.create(tmp_path_factory.mktemp("straight") / "run",
                     _cfg(tiny_sd15, data_dir, keep_checkpoints=4))  # 2, 4, 6, 8
    assert train(run.dir)["state"] == "done"
    return run


def _check_same_curve(run: Run, straight: Run) -> float:
    assert run.status()["state"] == "done"
    records, _ = run.read_metrics()
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # no duplicates
    diff = _max_diff(_final(run), _final(straight))
    assert diff < 1e-5, diff
    return diff


@pytest.mark.slow  # training processes killed and resumed
def test_kill9_in_training_and_in_a_checkpoint_write_then_resume(straight, tiny_sd15, data_dir,
                                                                  tmp_path):
    run = Run.create(tmp_path / "run", _cfg(tiny_sd15, data_dir))
    stats = _run_with_kills(run, ["write", "train"], random.Random(0))
    assert stats["kills_in_writes"] == 1, stats
    diff = _check_same_curve(run, straight)
    print(f"\nkill -9: {stats}, final weights max |diff| vs uninterrupted {diff:.2e}")


@pytest.mark.slow
def test_random_kill9_loop(straight, tiny_sd15, data_dir, tmp_path):
    rng = random.Random(12)
    totals: dict[str, int] = {}
    for trial in range(3):
        run = Run.create(tmp_path / f"run{trial}", _cfg(tiny_sd15, data_dir))
        kinds = [rng.choice(["train", "write"]) for _ in range(4)]
        stats = _run_with_kills(run, kinds, rng)
        _check_same_curve(run, straight)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
    print(f"\nrandom kill -9 loop: {totals}; every run ended on the uninterrupted weights")
    assert totals["kills_in_training"] + totals["kills_in_writes"] >= 8


def _corrupt_same_size(path: Path, seed: int = 0) -> None:
    size = path.stat().st_size
    path.write_bytes(random.Random(seed).randbytes(size))


@pytest.mark.parametrize("manifest", ["sha256", "sizes-only"])
def test_same_size_corruption_falls_back_to_the_previous_checkpoint(straight, tmp_path, manifest,
                                                                    capfd):
    run = Run(tmp_path / "run")  # the straight run as if it had stopped at step 6
    shutil.copytree(straight.dir, run.dir, ignore=shutil.ignore_patterns("LOCK"))
    shutil.rmtree(run.final_dir)
    shutil.rmtree(run.checkpoints_dir / "step-0000008")
    run.truncate_metrics(6)
    run.write_status(state="stopped", step=6)
    bad = run.checkpoints_dir / "step-0000006"
    if manifest == "sizes-only":  # a checkpoint from before checksums: the load itself fails
        files = json.loads((bad / COMPLETE).read_text())["files"]
        (bad / COMPLETE).write_text(json.dumps({"step": 6, "files": {
            k: v["size"] for k, v in files.items()}}))
        _corrupt_same_size(bad / "trainer.pt")
    else:
        _corrupt_same_size(bad / "lora.safetensors")
    status = train(run.dir, resume=True)
    err = capfd.readouterr().err
    assert f"skipping checkpoint {bad}" in err or f"corrupt checkpoint {bad}" in err, err[-2000:]
    assert "resumed from step 4" in run.status()["warning"]
    assert status["state"] == "done" and status["step"] == 8
    records, _ = run.read_metrics()
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert _max_diff(_final(run), _final(straight)) < 1e-5


@pytest.mark.slow  # a training process held while another resumes
def test_concurrent_resume_is_refused_naming_the_holder(tiny_sd15, data_dir, tmp_path):
    run = Run.create(tmp_path / "run", _cfg(tiny_sd15, data_dir, steps=100000,
                                            checkpoint_every=1000))
    first = launch(run, env={"OMP_NUM_THREADS": "1"})
    try:
        assert _wait(lambda: run.status().get("state") == "running"
                     and run.status().get("step", 0) >= 1, first)
        assert lock_holder(run.dir) == first.pid
        res = subprocess.run([sys.executable, "-m", "hypersd_core", "train", "--resume",
                              str(run.dir)], capture_output=True, text=True, timeout=120,
                             cwd=ROOT, env=ENV)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by process {first.pid}" in lines[0], res.stderr
        with pytest.raises(RunLockedError, match=f"process {first.pid}"):
            launch(run, resume=True)  # the app's path
        with pytest.raises(RunLockedError, match=f"process {first.pid}"):
            train(run.dir, resume=True)
        assert run.status()["pid"] == first.pid and first.poll() is None  # untouched
    finally:
        _kill9(first)
    assert lock_holder(run.dir) is None  # released by the kernel on kill -9
    run.lock().release()


def test_a_run_that_cannot_start_is_failed_with_the_reason(tiny_sd15, data_dir, tmp_path):
    run = Run.create(tmp_path / "run", _cfg(tiny_sd15, data_dir))
    text = run.config_path.read_text().replace("steps: 8", "steps: true")
    run.config_path.write_text(text)
    proc = launch(run, resume=True, env={"OMP_NUM_THREADS": "1"})
    assert proc.wait(timeout=120) == 2
    status = run.status()
    assert status["state"] == "failed" and "steps must be int" in status["error"], status
    log = run.log_path.read_text().strip().splitlines()
    assert "Traceback" not in run.log_path.read_text() and "steps must be int" in log[-1]


def test_nonfinite_weights_are_never_checkpointed(tiny_sd15, data_dir, tmp_path, monkeypatch):
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # step 3 leaves NaN weights (as lr=inf did)
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    run = Run.create(tmp_path / "run", _cfg(tiny_sd15, data_dir, steps=20, max_nonfinite=3,
                                            keep_checkpoints=5))
    with pytest.raises(NonFiniteLossError, match="last good checkpoint: .*step-0000002"):
        train(run.dir)
    status = run.status()
    assert status["state"] == "failed" and "step-0000002" in status["error"]
    from safetensors.torch import load_file

    names = [p.name for p in run.checkpoints()]
    assert names == ["step-0000002"], names
    for ckpt in run.checkpoints():
        assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "lora.safetensors")).values())


# ----------------------------------------------------------------- the app
def _bomb_png(path: Path, side: int = 13000) -> Path:
    """A 1-bit greyscale PNG of side x side pixels (a few KB; 507 MB once decoded to RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.slow  # a child process, its memory bounded
def test_decompression_bomb_upload_is_refused_with_bounded_rss(tmp_path, monkeypatch):
    """The Rewards tab's private Score function, called by fn_index as an attacker would."""
    import psutil
    import requests

    import app
    from hypersd_core.app.service import AppSettings

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("HYPERSD_STUDY_SALT", "test-salt-0123456789abcdef")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = AppSettings.from_env(model="digits", runs_dir=tmp_path / "runs",
                                    study_db=tmp_path / "study" / "votes.db", port=port,
                                    lora_dir=tmp_path / "loras", models_dir=tmp_path / "models",
                                    data_dir=tmp_path / "data")
    demo = app.build_demo(settings)
    kwargs = {**app.launch_kwargs(settings), "prevent_thread_lock": True, "quiet": True}
    _, url, _ = demo.launch(**kwargs)
    url = url.rstrip("/")
    try:
        config = requests.get(url + "/config", timeout=30).json()
        comps = {c["id"]: c for c in config["components"]}
        fn_index = next(i for i, d in enumerate(config["dependencies"])
                        if len(d["inputs"]) == 7 and any(comps[c]["type"] == "file"
                                                         for c in d["inputs"]))
        png = _bomb_png(tmp_path / "bomb.png")
        up = requests.post(url + "/gradio_api/upload",
                           files={"files": ("bomb.png", png.read_bytes(), "image/png")}, timeout=60)
        up.raise_for_status()
        data = ["upload", ["digits-quality"], "hypersd", 1, 0, "a red handwritten digit 7",
                [{"path": up.json()[0], "orig_name": "bomb.png", "meta": {"_type": "gradio.FileData"}}]]
        proc = psutil.Process()
        base = peak = proc.memory_info().rss
        done = threading.Event()

        def watch():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, proc.memory_info().rss)
                time.sleep(0.01)

        threading.Thread(target=watch, daemon=True).start()
        session = "bomb" + os.urandom(4).hex()
        requests.post(url + "/gradio_api/queue/join", json={
            "data": data, "fn_index": fn_index, "session_hash": session}, timeout=30).raise_for_status()
        message = None
        with requests.get(url + f"/gradio_api/queue/data?session_hash={session}", stream=True,
                          timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith(b"data:"):
                    msg = json.loads(line[5:])
                    if msg.get("msg") == "process_completed":
                        message = msg
                        break
        done.set()
        growth_mb = (peak - base) / 2**20
        print(f"\nbomb upload ({png.stat().st_size} bytes, 13000 x 13000): "
              f"peak RSS growth {growth_mb:.0f} MB; reply: {message['output'].get('error')}")
        assert message["success"] is False
        assert "169,000,000 pixels" in message["output"]["error"]
        assert growth_mb < 200  # decoding it would take 507 MB as RGB, ~8 GB through scoring
    finally:
        demo.close()
        demo.hypersd["store"].close()


# ----------------------------------------------------------- hostile input, one line each
@pytest.mark.parametrize("text,message", [
    ("steps: 10\nlr: [1, 2\nk: 8\n", "bad.yaml:3:2: invalid YAML"),
    ("hello\n", "bad.yaml: expected a mapping of settings"),
    ("steps: true\n", "steps must be int, got True"),
    ("lr: .inf\n", "lr must be finite, got inf"),
    ("sample_prompts: []\n", "sample_prompts must be a non-empty list"),
    ("seed: 1180591620717411303424\n", "seed must be in [0, 4294967295]"),
    ("sample_steps: 2000\n", "sample_steps must be in [0, 1000]"),
    ("rewards: {digits-quality: true}\n", "rewards must be dict"),
])
def test_bad_yaml_and_values_are_one_line(tmp_path, text, message):
    from hypersd_core.training.config import load_preset

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_preset(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_lora_of_another_architecture_is_one_line(tiny_sd15, tiny_sdxl, tmp_path):
    from diffusers import UNet2DConditionModel

    from hypersd_core.models.lora import add_lora, check_lora_fits, load_lora_into, save_lora

    sdxl = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    add_lora(sdxl, 4, 4.0)
    file = save_lora(sdxl, tmp_path / "sdxl-lora")
    sd15 = UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet")
    with pytest.raises(ValueError) as err:
        check_lora_fits(sd15, file)
    text = str(err.value)
    assert "does not fit this model: layer " in text and "lora_A (" in text and "\n" not in text
    check_lora_fits(sdxl, file)  # its own model: silent
    add_lora(sd15, 4, 4.0, adapter_name="student")
    with pytest.raises(ValueError, match="does not fit this model"):
        load_lora_into(sd15, file, "student")
