"""Single-file checkpoints: tiny random SD1.5 / SDXL pipelines written in the original
(A1111 / ComfyUI) key layout load through ``--model FILE`` and generate exactly what the
same weights give as a diffusers folder.

The diffusers -> original key mapping below is written for these tests (the inverse of
what diffusers' single-file loader undoes), from the layout of the original LDM / SGM code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _scheduler, _text_encoder, _tokenizer, _vae, build_tiny_sd15, make_image_folder
from safetensors.torch import load_file, save_file

from hypersd_core.models import single_file
from hypersd_core.models.backbone import load_backbone
from hypersd_core.worlds import digits

# ------------------------------------------------------------------ diffusers -> original keys

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
           ("conv_shortcut", "skip_connection")]


def unet_to_original(sd: dict, config: dict) -> dict:
    """UNet2DConditionModel keys -> ``model.diffusion_model.*`` (input/middle/output blocks)."""
    per = config["layers_per_block"] + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    up_has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions", k))}
    out = {}
    for key, value in sd.items():
        new = None
        for src, dst in fixed.items():
            if key.startswith(src + "."):
                new = dst + key[len(src):]
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            slot = 0 if part == "resnets" else 1
            new = f"input_blocks.{per * i + j + 1}.{slot}.{_resnet(rest) if slot == 0 else rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
            if m[1] == "resnets":
                new = f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
            else:
                new = f"middle_block.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            slot = 0 if part == "resnets" else 1
            new = f"output_blocks.{per * i + j}.{slot}.{_resnet(rest) if slot == 0 else rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            i = int(m[1])
            new = f"output_blocks.{per * i + per - 1}.{2 if i in up_has_attn else 1}.conv.{m[2]}"
        assert new is not None, f"no original name for UNet key {key}"
        out["model.diffusion_model." + new] = value
    return out


def _resnet(rest: str) -> str:
    for a, b in _RESNET:
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def vae_to_original(sd: dict, n_blocks: int) -> dict:
    """AutoencoderKL keys -> ``first_stage_model.*`` (LDM encoder/decoder names, conv attention)."""
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", new):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.dim() == 2:
                value = value[:, :, None, None]  # linear -> 1x1 conv, as the original stores it
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.*)", new):
            new = f"encoder.down.{m[1]}.block.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", new):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.*)", new):
            new = f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", new):
            new = f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.{m[2]}"
        out["first_stage_model." + new] = value
    return out


def clip_to_original(sd: dict, prefix: str) -> dict:
    """transformers CLIPTextModel keys -> ``PREFIX text_model.*`` (SD1.5, SDXL's first encoder)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.items()}


def open_clip_to_original(sd: dict, prefix: str, layers: int) -> dict:
    """CLIPTextModelWithProjection keys -> OpenCLIP names (SDXL's second encoder):
    fused in_proj, resblocks, ln_final, text_projection stored transposed."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
           prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(src + f"self_attn.{p}_proj.{kind}") for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = sd.pop(src + f"self_attn.out_proj.{kind}")
            out[dst + f"ln_1.{kind}"] = sd.pop(src + f"layer_norm1.{kind}")
            out[dst + f"ln_2.{kind}"] = sd.pop(src + f"layer_norm2.{kind}")
            out[dst + f"mlp.c_fc.{kind}"] = sd.pop(src + f"mlp.fc1.{kind}")
            out[dst + f"mlp.c_proj.{kind}"] = sd.pop(src + f"mlp.fc2.{kind}")
    assert not sd, f"unmapped OpenCLIP keys: {sorted(sd)}"
    return out


def write_single_file(folder: Path, out: Path) -> Path:
    """The diffusers pipeline in ``folder`` as one original-layout .safetensors file."""
    def part(name):
        return load_file(str(folder / name / "diffusion_pytorch_model.safetensors")) \
            if (folder / name / "diffusion_pytorch_model.safetensors").is_file() \
            else load_file(str(folder / name / "model.safetensors"))

    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    sd = unet_to_original(part("unet"), unet_cfg)
    sd.update(vae_to_original(part("vae"), len(vae_cfg["down_block_types"])))
    if (folder / "text_encoder_2").is_dir():
        sd.update(clip_to_original(part("text_encoder"), "conditioner.embedders.0.transformer."))
        te2_cfg = json.loads((folder / "text_encoder_2" / "config.json").read_text())
        sd.update(open_clip_to_original(part("text_encoder_2"), "conditioner.embedders.1.model.",
                                        te2_cfg["num_hidden_layers"]))
    else:
        sd.update(clip_to_original(part("text_encoder"), "cond_stage_model.transformer."))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    return out


def build_tiny_sdxl_two_widths(folder: Path) -> Path:
    """Tiny SDXL whose two text encoders differ in width (32 / 48), as in SDXL (768 / 1280):
    the original layout tells the encoders apart by their shapes."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tok = _tokenizer(folder / "_tok")
    vocab = tok.get_vocab()
    ids = (len(vocab), vocab[digits.SPECIAL_BOS], vocab[digits.SPECIAL_EOS])
    te1 = _text_encoder(*ids)
    te2 = _text_encoder(*ids, projection=True, hidden=48)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=80,
        norm_num_groups=8, attention_head_dim=4, transformer_layers_per_block=1,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32)
    StableDiffusionXLPipeline(vae=_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                              tokenizer_2=tok, unet=unet, scheduler=_scheduler()).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("single-file")
    sd15 = build_tiny_sd15(root / "sd15")
    sdxl = build_tiny_sdxl_two_widths(root / "sdxl")
    return {"sd15": (sd15, write_single_file(sd15, root / "sd15.safetensors")),
            "sdxl": (sdxl, write_single_file(sdxl, root / "sdxl.safetensors"))}


def _images(backbone) -> np.ndarray:
    out = backbone.pipe(prompt=["a red handwritten digit 7", "a blue handwritten digit 0"],
                        num_inference_steps=3, guidance_scale=2.0, output_type="np",
                        generator=[torch.Generator().manual_seed(i) for i in range(2)])
    return out.images


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_single_file_generates_like_the_diffusers_folder(tiny_files, kind, monkeypatch):
    folder, file = tiny_files[kind]
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in load_file(str(file)))
    assert single_file.detect_single_file_kind(file) == kind
    monkeypatch.setitem(single_file.CONFIGS, kind, folder)  # the tiny architecture
    from_file = load_backbone(str(file))
    from_folder = load_backbone(str(folder))
    assert from_file.kind == from_folder.kind == kind
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if kind == "sdxl" else ()):
        a, b = getattr(from_file.pipe, name).state_dict(), getattr(from_folder.pipe, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ"
    a, b = _images(from_file), _images(from_folder)
    assert a.std() > 0.01  # real images, not a constant
    np.testing.assert_array_equal(a, b)


def test_not_a_checkpoint_is_one_clear_line(tmp_path, capsys):
    from hypersd_core.cli import main

    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2)}, str(tmp_path / "unet.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for name, expect in (("unet.safetensors", "neither an SD1.5 nor an SDXL"),
                         ("junk.safetensors", "not a readable .safetensors")):
        code = main(["sample", "--model", str(tmp_path / name), "--prompt", "x", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and expect in err and len(err.splitlines()) == 1, err


def test_clip_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    tok, ref = single_file.clip_tokenizer(), SimpleTokenizer()
    assert len(tok) == 49408
    for text in ("a photo of a cat sitting on a windowsill", "An astronaut, digital art!! 1024"):
        assert tok(text).input_ids == [49406, *ref.encode(text), 49407]
    assert single_file.clip_tokenizer(pad_token="!").pad_token_id == 0  # SDXL's second tokenizer


def test_training_on_a_single_file_model_saves_and_exports(tiny_files, tmp_path, monkeypatch):
    from hypersd_core.models.lora import export_kohya
    from hypersd_core.training.config import load_preset
    from hypersd_core.training.runs import Run
    from hypersd_core.training.trainer import train

    folder, file = tiny_files["sd15"]
    monkeypatch.setitem(single_file.CONFIGS, "sd15", folder)
    data = make_image_folder(tmp_path / "data", 4) if (tmp_path / "data").mkdir() is None else None
    cfg = load_preset("digits-tscd-k8", [f"model={file}", f"data={data}", "steps=2", "batch_size=2",
                                         "sample_every=2", "checkpoint_every=2", "lora_rank=4",
                                         "lora_alpha=4"])
    run = Run.create(tmp_path / "run", cfg)
    status = train(run.dir)
    assert status["state"] == "done"
    assert (run.final_dir / "pytorch_lora_weights.safetensors").is_file()
    kohya = export_kohya(run.final_dir, tmp_path / "k.safetensors")
    assert any(k.startswith("lora_unet_") for k in load_file(str(kohya)))


def test_app_lists_single_file_checkpoints_not_loras(tiny_files, tmp_path):
    import shutil

    from hypersd_core.app.choices import model_choices
    from hypersd_core.app.service import AppSettings

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_files["sdxl"][1], models / "my-sdxl.safetensors")
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)},
              str(models / "some-lora.safetensors"))
    found = model_choices(AppSettings(models_dir=models))
    assert str(models / "my-sdxl.safetensors") in found
    assert str(models / "some-lora.safetensors") not in found
