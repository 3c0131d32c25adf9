"""Fused inference and cached prompts: the same images as stock diffusers (unfused
``load_lora_weights`` and ``fuse_lora``), exact unfusing after many switches, no PEFT
warnings from loading and switching, a bounded prompt cache."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from hypersd_core.models import lora as L
from hypersd_core.models.backbone import load_backbone
from hypersd_core.models.prompt_cache import PromptCache
from hypersd_core.models.sampling import Sampler, make_scheduler

PROMPTS = ["a red handwritten digit 7", "a blue handwritten digit 1"]


def _arr(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def _random_lora(folder, out, seed, rank):
    backbone = load_backbone(str(folder))
    torch.manual_seed(seed)
    params = L.add_lora(backbone.unet, rank=rank, alpha=float(rank), adapter_name="x")
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)
    return L.save_lora(backbone.unet, out, adapter_name="x")


@pytest.fixture(scope="module")
def loras(tiny_sd15, tmp_path_factory):
    """Two rank-4 LoRAs (same layout) and a rank-8 one (another layout)."""
    return {name: _random_lora(tiny_sd15, tmp_path_factory.mktemp(f"fused-{name}"), seed, rank)
            for name, seed, rank in [("a", 11, 4), ("b", 12, 4), ("c", 13, 8)]}


@pytest.fixture(scope="module")
def xl_lora(tiny_sdxl, tmp_path_factory):
    return _random_lora(tiny_sdxl, tmp_path_factory.mktemp("fused-xl"), 14, 4)


def _stock(folder, kind, method="hypersd"):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(load_backbone(str(folder)), method)
    return pipe


def _stock_images(pipe, steps, prompts=PROMPTS, seeds=(0, 3)):
    return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=0.0,
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_fused_generate_equals_stock_unfused_and_fused(kind, tiny_sd15, tiny_sdxl, loras, xl_lora):
    folder, lora = (tiny_sd15, loras["a"]) if kind == "sd15" else (tiny_sdxl, xl_lora)
    sampler = Sampler(load_backbone(str(folder)))
    ours = {n: sampler.generate("hypersd", n, PROMPTS, [0, 3], adapter=str(lora)).images
            for n in (1, 2)}
    assert sampler.adapters.fused and sampler.adapters.active == lora.parent.name  # its folder
    # the UNet is plain diffusers: no PEFT wrapper is left to cost time per call
    assert not [n for n, _ in sampler.backbone.unet.named_modules() if "lora" in n]
    stock = _stock(folder, kind)
    stock.load_lora_weights(str(lora.parent))
    base = Sampler(load_backbone(str(folder))).generate("teacher", 1, PROMPTS, [0, 3], guidance=0)
    for n in (1, 2):
        unfused = _stock_images(stock, n)
        assert np.abs(_arr(ours[n]) - _arr(unfused)).max() <= 1 / 255, n
    assert np.abs(_arr(ours[1]) - _arr(base.images)).max() > 4 / 255  # the LoRA acts
    stock.fuse_lora(lora_scale=1.0)
    for n in (1, 2):
        assert np.abs(_arr(ours[n]) - _arr(_stock_images(stock, n))).max() <= 1 / 255, n


def test_many_switches_leave_no_drift(tiny_sd15, loras):
    sampler = Sampler(load_backbone(str(tiny_sd15)))
    unet = sampler.backbone.unet
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    for name, path in loras.items():
        sampler.adapters.load(name, path)
    first = {}
    for name in loras:
        sampler.adapters.use(name)
        first[name] = {k: v.clone() for k, v in unet.state_dict().items()}
        assert any(not torch.equal(first[name][k], base[k]) for k in base)
    image_a = sampler.generate("hypersd", 1, PROMPTS[:1], [0], adapter="a").images
    rng = np.random.default_rng(0)
    choices = [*loras, None]
    for _ in range(300):
        pick = choices[rng.integers(len(choices))]
        sampler.adapters.use(pick, scale=1.0 if rng.random() < 0.8 else 0.5)
    sampler.adapters.use(None)
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items())
    for name in loras:
        sampler.adapters.use(name)
        assert all(torch.equal(v, first[name][k]) for k, v in unet.state_dict().items()), name
    again = sampler.generate("hypersd", 1, PROMPTS[:1], [0], adapter="a").images
    assert np.abs(_arr(again) - _arr(image_a)).max() == 0
    assert sampler.adapters.last_switch_s >= 0 and sampler.adapters.originals_mb() > 0
    sampler.adapters.release()
    assert all(torch.equal(v, base[k]) for k, v in unet.state_dict().items())


def test_scale_fuses_the_scaled_delta(tiny_sd15, loras):
    """use(name, 0.5) puts W0 + 0.5 * delta in the weights, as fuse_lora(lora_scale=0.5)."""
    sampler = Sampler(load_backbone(str(tiny_sd15)))
    sampler.adapters.load("a", loras["a"])
    unet = sampler.backbone.unet
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    sampler.adapters.use("a", 1.0)
    full = {k: v.clone() for k, v in unet.state_dict().items()}
    sampler.adapters.use("a", 0.5)
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, base[k] + 0.5 * (full[k] - base[k]), atol=1e-6, rtol=0)


def test_loading_and_switching_emit_no_peft_warnings(tiny_sd15, loras):
    """Loading adapters of two layouts and switching among them warns nothing (PEFT's
    'Already found a peft_config' / 'Adapter ... was active which is now deleted')."""
    sampler = Sampler(load_backbone(str(tiny_sd15)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, path in loras.items():
            sampler.adapters.load(name, path)
        for name in ["a", "c", "b", None, "c"]:
            sampler.generate("hypersd", 1, PROMPTS[:1], [0], adapter=name) if name else \
                sampler.generate("teacher", 1, PROMPTS[:1], [0], guidance=0)
        sampler.adapters.unload("c")
    peft = [str(w.message) for w in caught if "peft_config" in str(w.message)
            or "which is now deleted" in str(w.message)]
    assert peft == []
    assert sampler.adapters.active is None and "c" not in sampler.adapters.loaded


def test_lora_with_text_encoder_layers_is_refused(tiny_sd15, tmp_path):
    from safetensors.torch import save_file

    state = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)}
    save_file(state, str(tmp_path / "te.safetensors"))
    sampler = Sampler(load_backbone(str(tiny_sd15)))
    with pytest.raises(ValueError, match="only UNet LoRAs"):
        sampler.adapters.load("te", tmp_path / "te.safetensors")


def test_prompt_cache_reuses_embeddings_and_is_bounded(tiny_sd15):
    sampler = Sampler(load_backbone(str(tiny_sd15)))
    cache = sampler.prompts = PromptCache(sampler.backbone.pipe, max_entries=2)
    first = sampler.generate("teacher", 2, PROMPTS, [0, 1]).images  # CFG: negatives too
    assert (cache.misses, cache.hits, len(cache)) == (2, 0, 2)
    again = sampler.generate("teacher", 2, PROMPTS, [0, 1]).images
    assert cache.hits == 2 and np.abs(_arr(again) - _arr(first)).max() == 0
    sampler.generate("teacher", 1, ["a green handwritten digit 3"], [0], guidance=0)
    assert len(cache) == 2 and PROMPTS[0] not in cache._entries  # least recently used left
    with pytest.raises(ValueError, match="max_entries"):
        PromptCache(sampler.backbone.pipe, max_entries=0)
