"""Beyond the base model on the digits world: the ControlNet's training input equals what
the stock pipeline feeds it, control IoU on known masks, the glow style, the one-step
UNet stage (every UNet weight trained, teacher frozen), and the shipped extras."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hypersd_core.paths import DIGITS_PIPELINE
from hypersd_core.worlds import digits

shipped = pytest.mark.skipif(not (DIGITS_PIPELINE / "model_index.json").is_file(),
                             reason="digits world not built")


def test_control_tensor_is_what_the_stock_pipeline_feeds_the_controlnet():
    from diffusers.image_processor import VaeImageProcessor

    from hypersd_core.digits.controlnet import control_tensor
    from hypersd_core.models.controlnet import mask_image

    masks = digits.DigitsDataset("heldout").tensors()["masks"][:6]
    proc = VaeImageProcessor(vae_scale_factor=4, do_convert_rgb=True, do_normalize=False)
    stock = torch.cat([proc.preprocess(mask_image(m), height=32, width=32) for m in masks])
    assert torch.equal(control_tensor(masks), stock.float())
    assert set(stock.unique().tolist()) == {0.0, 1.0}


def test_ink_iou_on_known_masks():
    from hypersd_core.digits.evaluate_extra import ink_iou

    mask = torch.zeros(3, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 8:16] = True
    images = torch.zeros(3, 3, 32, 32)
    images[0, 1, 8:24, 8:16] = 1.0  # the same ink, green
    images[1, 0, 8:24, 16:24] = 1.0  # beside it
    images[2, 2, 8:24, 12:20] = 0.9  # half over it
    iou = ink_iou(images, mask)
    assert iou[0] == 1 and iou[1] == 0 and iou[2] == pytest.approx(64 / 192)
    images[0, 1, 8:24, 8:16] = 0.2  # below the ink threshold: no ink
    assert ink_iou(images, mask)[0] == 0


def test_control_set_uses_heldout_digits_with_their_own_labels():
    from hypersd_core.digits.evaluate_extra import control_set

    prompts, seeds, masks = control_set(20)
    train, held = digits.split_indices()
    for i, (p, m) in enumerate(zip(prompts, masks)):
        idx = int(held[i])
        colour, digit = digits.parse_caption(p)
        assert digit == int(digits.labels()[idx]) and colour == digits.COLOUR_NAMES[i % 8]
        assert torch.equal(m, digits.ink_32()[idx] > digits.MASK_THRESHOLD)
    assert len(set(seeds)) == 20 and not set(held[:20]) & set(train)


def test_glow_style_keeps_ink_and_adds_a_halo():
    from hypersd_core.digits.style import GLOW, glow, style_tensors

    ink = torch.zeros(32, 32)
    ink[10:22, 15:17] = 1.0
    g = glow(ink)
    assert torch.equal(g[10:22, 15:17], ink[10:22, 15:17])  # strokes unchanged
    assert 0.2 < g[16, 18] <= GLOW and g[16, 13] > 0.2  # a halo beside them
    assert g[0, 0] == 0 and g[16, 28] == 0  # far background stays black
    styled = style_tensors("heldout")
    plain = digits.DigitsDataset("heldout").tensors()
    assert styled["images"].shape == plain["images"].shape
    assert torch.equal(styled["digits"], plain["digits"])
    assert (styled["images"] >= plain["images"] - 1e-6).all()
    assert (styled["images"] > plain["images"] + 0.1).any()


@shipped
def test_onestep_unet_stage_trains_every_weight_and_keeps_the_teacher():
    from hypersd_core.digits.onestep import fused_student
    from hypersd_core.distill.onestep_unet import OneStepUNetStage
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.training.config import load_preset
    from hypersd_core.training.data import DigitsData

    torch.manual_seed(0)
    cfg = load_preset("digits-dmd", {"one_step_t": 800, "multistep_prob": 0.0, "batch_size": 4,
                                     "mse_weight": 1.0})
    backbone = load_backbone("digits")
    teacher_before = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    student = fused_student(None)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    stage = OneStepUNetStage(cfg, backbone, student)
    fake_before = [p.detach().clone() for p in stage.fake_params]
    gen = torch.Generator().manual_seed(0)
    batch = DigitsData(backbone).sample(4, gen)
    loss, logs = stage.loss(batch, gen)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert {"loss_fake", "loss_dmd", "loss_mse", "loss_reward"} <= set(logs)
    loss.mean().backward()
    with_grad = [n for n, p in student.named_parameters() if p.grad is not None
                 and p.grad.abs().sum() > 0]
    assert len(with_grad) > 0.9 * len(list(student.parameters()))  # the full UNet learns
    assert any("lora" not in n and "attn" in n for n in with_grad)
    assert any(not torch.equal(a, b) for a, b in zip(fake_before, stage.fake_params))
    base = {k: v for k, v in backbone.unet.state_dict().items() if "lora" not in k}
    assert all(torch.equal(v, teacher_before[k.replace(".base_layer", "")]) for k, v in base.items())
    torch.optim.SGD(student.parameters(), lr=1e-3).step()
    assert any(not torch.equal(v, start[k]) for k, v in student.state_dict().items())


@shipped
def test_fused_student_is_the_unified_lora_in_the_weights():
    """The student starts as base + unified LoRA: the same one-step image as the LoRA."""
    from hypersd_core.digits.onestep import INIT_ADAPTER, fused_student
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    if not INIT_ADAPTER.is_dir():
        pytest.skip("unified adapter not shipped")
    from diffusers import TCDScheduler

    sampler = Sampler(load_backbone("digits"))
    lora = sampler.generate("hypersd-unified", 1, ["a red handwritten digit 7"], [0])
    sampler.adapters.use(None)
    pipe = sampler.backbone.pipe
    base_unet, base_sched = pipe.unet, pipe.scheduler
    pipe.unet = fused_student()
    pipe.scheduler = TCDScheduler.from_config(base_sched.config)
    try:
        img = pipe("a red handwritten digit 7", num_inference_steps=1, guidance_scale=0.0,
                   eta=1.0, generator=torch.Generator().manual_seed(0)).images[0]
    finally:
        pipe.unet, pipe.scheduler = base_unet, base_sched
    diff = np.abs(np.asarray(img, np.float32) - np.asarray(lora.images[0], np.float32))
    assert diff.max() <= 3  # fusing is exact up to float rounding


@pytest.mark.slow
@shipped
def test_controlnet_training_step_and_folder_round_trip(tmp_path):
    from hypersd_core.digits.controlnet import ControlNetConfig, save_controlnet, train_controlnet
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.controlnet import load_controlnet, mask_image
    from hypersd_core.models.sampling import Sampler

    backbone = load_backbone("digits")
    cn, seconds, done = train_controlnet(backbone, ControlNetConfig(steps=3, batch_size=4, lr=1e-2),
                                         log=lambda *a: None)
    assert done == 3 and seconds > 0
    zero_convs = [p for n, p in cn.named_parameters() if "controlnet_down_blocks" in n]
    assert any(p.abs().sum() > 0 for p in zero_convs)  # the zero convs left zero
    save_controlnet(cn, tmp_path / "cn", {"steps": 3})
    assert json.loads((tmp_path / "cn" / "training.json").read_text())["steps"] == 3
    sampler = Sampler(backbone)
    sampler.set_controlnet(load_controlnet(tmp_path / "cn"))
    mask = digits.DigitsDataset("heldout").tensors()["masks"][0]
    gen = sampler.generate("hypersd", 2, ["a red handwritten digit 7"], [0],
                           control_image=mask_image(mask))
    assert gen.images[0].size == (32, 32)


def test_heldout_control_choices_and_sketch():
    from PIL import Image

    from compare_tab.control import NO_MASK, control_from_inputs, heldout_choices

    choices = heldout_choices()
    assert choices[0] == NO_MASK and len(choices) > 10
    image = control_from_inputs(None, choices[3])
    _, held = digits.split_indices()
    want = (digits.ink_32()[int(held[2])] > digits.MASK_THRESHOLD).numpy()
    assert np.array_equal(np.asarray(image)[..., 0] > 127, want)
    drawn = Image.new("RGB", (256, 256), "white")
    drawn.paste("black", (100, 20, 140, 230))
    mask = np.asarray(control_from_inputs({"composite": drawn}, NO_MASK))[..., 0] > 127
    assert mask[5:28, 13:17].all() and not mask[:, :10].any()
    import gradio as gr
    with pytest.raises(gr.Error, match="empty"):
        control_from_inputs({"composite": Image.new("RGB", (64, 64), "white")}, NO_MASK)


controlnet_shipped = pytest.mark.skipif(
    not (DIGITS_PIPELINE.parent / "controlnet" / "config.json").is_file(),
    reason="digits ControlNet not built")


@shipped
@controlnet_shipped
def test_docs_stock_script_reproduces_the_apps_controlled_image(monkeypatch):
    """The stock diffusers script of docs/beyond.md (digits ControlNet + Hyper-SD 2-step
    adapter), run as written, gives the app's image for the same prompt, seed and mask."""
    import re

    from compare_tab.control import heldout_choices, heldout_mask
    from hypersd_core.app.service import ModelService, compare_grid
    from hypersd_core.paths import ROOT

    doc = (ROOT / "docs" / "beyond.md").read_text()
    script = next(block for block in re.findall(r"```python\n(.*?)```", doc, re.S)
                  if "StableDiffusionControlNetPipeline" in block)
    label = re.search(r'heldout_mask\("([^"]+)"\)', script).group(1)
    assert label in heldout_choices(), f"the docs name a held-out mask the app does not offer: {label}"
    mask = heldout_mask(label)
    service = ModelService("digits", device="cpu")
    app = service.generate("hypersd", 2, ["a red handwritten digit 7"], [0], control_image=mask)[0]
    assert not app.error, app.error
    monkeypatch.chdir(ROOT)  # the script's paths are relative to the repository
    scope: dict = {}
    exec(compile(script, "docs/beyond.md", "exec"), scope)
    image = scope["image"]
    diff = np.abs(np.asarray(image, np.float32) - np.asarray(app.image, np.float32))
    assert diff.max() <= 1  # identical up to one level of rounding (fused vs unfused LoRA)
    # the grid under control: the one-step UNet row only at 1 step, reference controlled
    cells, _, _ = compare_grid(service, ["a red handwritten digit 7"], [0],
                               [("hypersd", None, "H"), ("hypersd-unet", None, "U")], (1, 2),
                               control_image=mask)
    ref = cells[0]
    assert ref.label == "teacher (reference)" and ref.image is not None
    unet_cells = [c for c in cells if c.label == "U"]
    assert unet_cells[0].image is not None and unet_cells[1].error == "one-step model: 1 step only"


@shipped
def test_style_backbone_is_offered_and_takes_the_base_adapters(tmp_path):
    from hypersd_core.app.choices import model_choices
    from hypersd_core.app.service import AppSettings
    from hypersd_core.digits.style import STYLE_PIPELINE, load_style_net
    from hypersd_core.models.backbone import load_backbone

    if not (STYLE_PIPELINE / "model_index.json").is_file():
        pytest.skip("style backbone not built")
    assert str(STYLE_PIPELINE) in model_choices(AppSettings(models_dir=tmp_path))
    style, base = load_backbone(str(STYLE_PIPELINE)), load_backbone("digits")
    assert style.kind == "digits" and set(base.adapter_dirs) <= set(style.adapter_dirs)
    w = "conv_in.weight"
    assert not torch.equal(style.unet.state_dict()[w], base.unet.state_dict()[w])
    assert torch.equal(style.vae.state_dict()["encoder.conv_in.weight"],
                       base.vae.state_dict()["encoder.conv_in.weight"])
    from hypersd_core.digits.style import style_tensors

    net = load_style_net()
    held_plain = digits.DigitsDataset("heldout").tensors()["images"][:200]
    held_glow = style_tensors("heldout")["images"][:200]
    with torch.no_grad():
        assert (net(held_plain).argmax(1) == 0).float().mean() > 0.95
        assert (net(held_glow).argmax(1) == 1).float().mean() > 0.95
