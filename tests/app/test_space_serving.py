"""The Space serves SD1.5 / SDXL few-step methods: official LoRA files fetched by their
published names (never from the network here: the download is replaced), one line
offline, a fused adapter that survives the per-call fork of ZeroGPU, and GPU durations
that follow the request."""

from __future__ import annotations

import os
import signal
import sys
import time
import types

import pytest
import torch
from test_app import make_lora_file

from hypersd_core.models import official


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path, tiny_sd15, tiny_sdxl):
    """official._download serving LoRAs made for the tiny models; it records each request.
    Only plain file names exist (the fp16 variant is asked for first and missing)."""
    asked = []
    files = {"sd15": make_lora_file(tiny_sd15, tmp_path / "sd15.safetensors"),
             "sdxl": make_lora_file(tiny_sdxl, tmp_path / "sdxl.safetensors")}

    def download(repo, filename):
        asked.append((repo, filename))
        if filename.endswith(".fp16.safetensors"):
            raise FileNotFoundError("404")
        return files["sdxl" if "SDXL" in filename or "sdxl" in repo else "sd15"]

    monkeypatch.setattr(official, "_download", download)
    monkeypatch.setattr(official, "cached", lambda kind, adapter: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # "online": the download above is the only one
    return asked


def test_sdxl_generates_one_step_with_the_official_lora(fake_hub, tiny_sdxl):
    from hypersd_core.app.service import ModelService

    service = ModelService(str(tiny_sdxl), device="cpu")
    cell = service.generate("hypersd", 1, ["a red handwritten digit 7"], [0])[0]
    assert not cell.error and cell.image is not None
    assert fake_hub == [("ByteDance/Hyper-SD", "Hyper-SDXL-1step-lora.fp16.safetensors"),
                        ("ByteDance/Hyper-SD", "Hyper-SDXL-1step-lora.safetensors")]
    assert service.method_available("lcm", 4)  # online: fetched on first use
    cell = service.generate("lcm", 4, ["a red handwritten digit 7"], [0])[0]
    assert not cell.error and fake_hub[-1] == ("latent-consistency/lcm-lora-sdxl",
                                               "pytorch_lora_weights.safetensors")


def test_sd15_names_and_offline_message(fake_hub, tiny_sd15, monkeypatch):
    from hypersd_core.app.service import ModelService

    service = ModelService(str(tiny_sd15), device="cpu")
    assert not service.generate("tcd", 2, ["a"], [0])[0].error
    assert fake_hub[-1] == ("h1t/TCD-SD15-LoRA", "TCD-SD15-LoRA.safetensors")
    assert official.official_file("sd15", "hypersd-k4") == ("ByteDance/Hyper-SD",
                                                            "Hyper-SD15-4steps-lora.safetensors")
    # offline and not in the cache: one line naming the file, no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(official, "_download", lambda repo, filename: (_ for _ in ()).throw(
        FileNotFoundError("not cached")))
    assert not service.method_available("hypersd", 4)
    err = service.generate("hypersd", 4, ["a"], [0])[0].error
    assert "ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors" in err and "offline" in err
    assert "\n" not in err


def test_preloaded_fused_adapter_survives_the_per_call_fork():
    """ZeroGPU runs each call in a process forked from the main one: the adapter fused at
    preload is already in the weights there, so the call switches nothing."""
    from hypersd_core.app.service import ModelService

    service = ModelService("digits", device="cpu")
    assert service.preload(resident="hypersd-unified") == {}
    assert service.sampler.adapters.active == "hypersd-unified"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "GPU call"
        try:
            # the parent's OpenMP pool does not survive fork (ZeroGPU's calls run on the GPU);
            # on the CPU the child computes on one thread, or it waits on the lost pool forever
            torch.set_num_threads(1)
            cell = service.generate("hypersd-unified", 1, ["a red handwritten digit 7"], [0])[0]
            ok = cell.error == "" and service.sampler.adapters.last_switch_s == 0.0
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 120
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked call did not finish in 120 s")
        time.sleep(0.2)
    assert os.read(read, 1) == b"1"


def test_gpu_durations_follow_the_request(monkeypatch):
    import gradio as gr

    from hypersd_core.app import zerogpu
    from hypersd_core.app.service import AppSettings, ModelService

    durations = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration=120: (durations.append(duration), lambda f: f)[1]
    monkeypatch.setitem(sys.modules, "spaces", fake)
    from compare_tab.compare import build_compare_tab
    from compare_tab.generate import build_generate_tab

    service = ModelService("digits", device="cpu")
    with gr.Blocks():
        build_generate_tab(AppSettings(), service)
        build_compare_tab(AppSettings(), service)
    assert durations and all(callable(d) for d in durations)
    assert durations[0]("a red digit", "teacher", 25, 0) == 10  # digits: the floor
    monkeypatch.setattr(type(service), "kind", property(lambda self: "sdxl"))
    one = durations[0]("a red digit", "hypersd", 1, 0)
    teacher = durations[0]("a red digit", "teacher", 25, 0)
    small_grid = durations[1]("a", 0, [], [])
    big_grid = durations[1]("a\nb\nc\nd", 0, ["x.safetensors"], [])
    assert one == zerogpu.gpu_seconds(1, 1, "sdxl") == 10
    assert one < teacher < small_grid < 120 < big_grid <= 300
