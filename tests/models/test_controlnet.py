"""ControlNet with every recipe on tiny random SD1.5 / SDXL models: our sampler equals the
stock diffusers ControlNet pipelines; the full one-step UNet loads in diffusers' format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hypersd_core.models import lora as L
from hypersd_core.models import sampling as SM
from hypersd_core.models.backbone import load_backbone
from hypersd_core.models.controlnet import (
    ControlNetNotFoundError,
    control_pipeline,
    load_controlnet,
    mask_image,
    sketch_to_mask,
)
from hypersd_core.models.sampling import RECIPES, Sampler, make_scheduler
from hypersd_core.models.unet import is_unet_source, load_unet, save_unet

PROMPT = "a red handwritten digit 7"


def _arr(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def _tiny_controlnet(model_folder, out, seed=0):
    """A ControlNet made from the model's UNet, every weight random (zero convs too)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_folder, subfolder="unet")
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cn.save_pretrained(out)
    return out


def _random_lora(folder, out, seed):
    backbone = load_backbone(str(folder))
    torch.manual_seed(seed)
    params = L.add_lora(backbone.unet, rank=4, alpha=8.0, adapter_name="x")
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)
    return L.save_lora(backbone.unet, out, adapter_name="x")


@pytest.fixture(scope="module")
def models(tiny_sd15, tiny_sdxl, tmp_path_factory):
    out = {}
    for kind, folder in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl)):
        cn = _tiny_controlnet(folder, tmp_path_factory.mktemp(f"cn-{kind}"))
        lora = _random_lora(folder, tmp_path_factory.mktemp(f"cn-lora-{kind}"), seed=3)
        out[kind] = (folder, cn, lora)
    return out


def _control(seed=0, size=32):
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.float32)
    mask[6:26, 12:18] = 1
    mask[rng.integers(0, size, 40), rng.integers(0, size, 40)] = 1
    return mask_image(mask)


def _recipe_at(backbone, method, steps):
    """(scheduler, eta) of the recipe at ``steps`` (recipes may differ per step count)."""
    recipe = RECIPES[method]
    if hasattr(SM, "recipe_eta"):
        return make_scheduler(backbone, method, steps), SM.recipe_eta(recipe, steps)
    return make_scheduler(backbone, method), recipe.eta


def _stock(folder, cn_folder, kind, method, lora):
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    cls = StableDiffusionXLControlNetPipeline if kind == "sdxl" else StableDiffusionControlNetPipeline
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(folder, controlnet=ControlNetModel.from_pretrained(cn_folder), **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(load_backbone(str(folder)), method)
    if RECIPES[method].adapter and method != "hypersd-unet":
        pipe.load_lora_weights(str(lora.parent))
    return pipe


@pytest.mark.parametrize("kind", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ["teacher", "lcm", "tcd", "hypersd", "hypersd-unified"])
def test_every_recipe_with_control_equals_stock_controlnet_pipeline(kind, method, models):
    folder, cn_folder, lora = models[kind]
    sampler = Sampler(load_backbone(str(folder)))
    sampler.set_controlnet(load_controlnet(cn_folder))
    recipe = RECIPES[method]
    adapter = str(lora) if recipe.adapter else None
    pipe = _stock(folder, cn_folder, kind, method, lora)
    guidance = sampler.backbone.guidance_scale if recipe.cfg else 0.0
    control = _control()
    for steps, scale in ((1, 1.0), (2, 0.7), (4, 1.0), (8, 1.0)):
        pipe.scheduler, eta = _recipe_at(sampler.backbone, method, steps)
        kwargs = {"eta": eta} if eta is not None else {}
        ours = sampler.generate(method, steps, [PROMPT], [0], adapter=adapter,
                                control_image=control, controlnet_conditioning_scale=scale)
        ref = pipe(PROMPT, image=control, num_inference_steps=steps, guidance_scale=guidance,
                   controlnet_conditioning_scale=scale,
                   generator=torch.Generator().manual_seed(0), **kwargs).images
        assert np.abs(_arr(ours.images) - _arr(ref)).max() <= 1 / 255, (method, steps)
    # the control acts: another control image, or none, gives another image
    other = sampler.generate(method, 4, [PROMPT], [0], adapter=adapter, control_image=_control(1))
    plain = sampler.generate(method, 4, [PROMPT], [0], adapter=adapter)
    assert np.abs(_arr(other.images) - _arr(ours.images)).max() > 2 / 255
    assert np.abs(_arr(plain.images) - _arr(ours.images)).max() > 2 / 255


def test_control_images_per_prompt_and_batches(models):
    folder, cn_folder, _ = models["sd15"]
    sampler = Sampler(load_backbone(str(folder)))
    sampler.set_controlnet(load_controlnet(cn_folder))
    prompts, controls = [PROMPT, "a blue handwritten digit 1"], [_control(0), _control(2)]
    both = sampler.generate("teacher", 2, prompts, [0, 1], control_image=controls, batch_size=1)
    one = sampler.generate("teacher", 2, prompts[1:], [1], control_image=controls[1])
    assert np.abs(_arr(both.images[1:]) - _arr(one.images)).max() <= 1 / 255
    with pytest.raises(ValueError, match="2 control images for 1 prompts"):
        sampler.generate("teacher", 2, prompts[:1], [0], control_image=controls)


def test_onestep_unet_folder_with_control_equals_stock(models, tmp_path):
    """hypersd-unet: a full UNet in diffusers' format replaces the base UNet (LCM, t=800)."""
    from diffusers import UNet2DConditionModel

    folder, cn_folder, lora = models["sd15"]
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    torch.manual_seed(5)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_unet(unet, tmp_path / "onestep", dtype=torch.float32)
    assert is_unet_source(tmp_path / "onestep") and not is_unet_source(lora)
    sampler = Sampler(load_backbone(str(folder)))
    sampler.set_controlnet(load_controlnet(cn_folder))
    control = _control()
    ours = sampler.generate("hypersd-unet", 1, [PROMPT], [0], adapter=str(tmp_path / "onestep"),
                            control_image=control)
    pipe = _stock(folder, cn_folder, "sd15", "hypersd-unet", lora)
    pipe.unet = UNet2DConditionModel.from_pretrained(tmp_path / "onestep")
    ref = pipe(PROMPT, image=control, timesteps=[800], guidance_scale=0.0,
               generator=torch.Generator().manual_seed(0)).images
    assert np.abs(_arr(ours.images) - _arr(ref)).max() <= 1 / 255
    base = sampler.generate("hypersd-unet", 1, [PROMPT], [0], control_image=control)
    assert np.abs(_arr(base.images) - _arr(ours.images)).max() > 2 / 255  # the full UNet acts
    # the base UNet is back in place after the call
    again = sampler.generate("teacher", 2, [PROMPT], [0])
    stock = _stock(folder, cn_folder, "sd15", "teacher", lora)
    assert sampler.backbone.pipe.unet is sampler._control_pipe.unet
    assert again.images[0].size == (32, 32) and stock is not None
    # a state-dict file (the official one-step UNet's format) loads into the base config
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / "u.safetensors")
    assert is_unet_source(tmp_path / "u.safetensors")
    loaded = load_unet(tmp_path / "u.safetensors", sampler.backbone.unet)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 unet.state_dict().values()))


def test_bad_controlnet_inputs(models, tmp_path, tiny_sd15, tiny_sdxl):
    folder, cn_folder, _ = models["sd15"]
    sampler = Sampler(load_backbone(str(folder)))
    with pytest.raises(ValueError, match="needs a ControlNet"):
        sampler.generate("teacher", 1, [PROMPT], [0], control_image=_control())
    with pytest.raises(ControlNetNotFoundError, match="not a diffusers ControlNet folder"):
        load_controlnet(tmp_path)
    with pytest.raises(ControlNetNotFoundError, match="could not be loaded from the Hugging Face"):
        load_controlnet("nobody/not-a-controlnet")
    xl_cn = load_controlnet(models["sdxl"][1])
    with pytest.raises(ValueError, match="made for another base model"):
        control_pipeline(sampler.backbone.pipe, xl_cn)
    with pytest.raises(ValueError, match="the drawing is empty"):
        sketch_to_mask(Image.new("RGB", (64, 64), "white"), 32)


def test_sketch_to_mask_finds_strokes_on_any_background():
    for bg, ink in (("white", "black"), ("black", "white"), ((30, 40, 200), (250, 250, 0))):
        im = Image.new("RGB", (128, 128), bg)
        im.paste(ink, (40, 16, 64, 112))  # a vertical bar
        mask = np.asarray(sketch_to_mask(im, 32))[..., 0] > 127
        assert mask.shape == (32, 32)
        assert mask[4:28, 10:16].mean() > 0.9 and mask[:, 20:].sum() == 0
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (20, 0, 30, 64))
    assert (np.asarray(sketch_to_mask({"composite": rgba}, 32))[..., 0] > 127)[:, 10:15].all()
