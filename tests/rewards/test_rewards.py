"""Rewards: loading code on tiny random weights, the protocol's shapes and gradients,
clear errors (the shipped digits rewards: test_digits_rewards.py)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hypersd_core.rewards import (  # noqa: E402
    Reward,
    RewardWeightsMissing,
    available_rewards,
    load_reward,
    to_image_tensor,
)
from hypersd_core.worlds import digits as world  # noqa: E402

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _images(b: int = 2, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g).requires_grad_(True)


def _check_protocol(r: Reward, prompts, b: int = 2, h: int = 40, w: int = 48) -> torch.Tensor:
    """Shape [B], float dtype, finite, and gradients reach the input images."""
    x = _images(b, h, w)
    s = r.score(x, prompts)
    assert s.shape == (b,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert r.differentiable
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in r.parameters())
    return s


# ---------------------------------------------------------------- protocol and registry


def test_registry_names_and_unknown():
    names = available_rewards()
    for n in ("imagereward", "aesthetic", "clip-score", "pickscore", "perception",
              "digits-quality", "digits-alignment", "digits-perception"):
        assert n in names
    with pytest.raises(ValueError, match="known rewards: .*clip-score"):
        load_reward("no-such-reward")


@pytest.mark.parametrize("bad, match", [
    (torch.rand(3, 32, 32), r"\[B,3,H,W\].*got tensor of shape \[3, 32, 32\]"),
    (torch.rand(2, 1, 32, 32), r"RGB \[B,3,H,W\]"),
    (torch.rand(2, 3, 32, 32) * 2 - 1, r"values in \[-"),
    (torch.rand(0, 3, 32, 32), "empty"),
    ([], "empty"),
    (torch.randint(0, 255, (2, 3, 8, 8)), "floating-point"),
])
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        to_image_tensor(bad)


def test_pil_conversion_and_mode():
    from PIL import Image

    im = Image.new("RGB", (8, 6), (255, 0, 0))
    x = to_image_tensor([im, im])
    assert x.shape == (2, 3, 6, 8) and x[:, 0].min() == 1 and x[:, 1:].max() == 0
    with pytest.raises(ValueError, match="mode 'L'"):
        to_image_tensor([im.convert("L")])


def test_prompt_count_mismatch():
    r = load_reward("digits-quality")
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        r.score(torch.rand(2, 3, 32, 32), ["a", "b", "c"])


def test_missing_weights_are_one_clear_error(tmp_path):
    for name in ("clip-score", "aesthetic", "imagereward", "pickscore", "digits-quality"):
        with pytest.raises(RewardWeightsMissing, match="(?i)download|no weights|ship"):
            load_reward(name, path=tmp_path / "nothing-here")
    with pytest.raises(RewardWeightsMissing, match="huggingface.co/timm/vit_base_patch32"):
        load_reward("clip-score")  # offline hub: the cache is empty
    with pytest.raises(RewardWeightsMissing, match="maskrcnn_resnet50_fpn_coco"):
        load_reward("perception", path=tmp_path / "nothing-here")


# ---------------------------------------------------------------- open_clip rewards


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    from open_clip.model import CLIP

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("open-clip")
    net = CLIP(**TINY_CLIP, quick_gelu=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return folder


def test_clip_score(tiny_open_clip):
    r = load_reward("clip-score", path=tiny_open_clip, model=TINY_CLIP)
    assert r.range == (0.0, 100.0) and r.higher_is_better
    s = _check_protocol(r, ["a red handwritten digit 7", "a photo of a cat"])
    assert (s >= 0).all() and (s <= 100).all()
    cos = r.cosine(_images(2).detach(), ["a red handwritten digit 7"] * 2)
    assert torch.allclose(r.score(_images(2).detach(), "a red handwritten digit 7"),
                          100 * cos.clamp(min=0), atol=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_loads_public_key_layout(tiny_open_clip, tmp_path, suffix):
    from hypersd_core.rewards.aesthetic import AestheticMLP

    torch.manual_seed(1)
    mlp = AestheticMLP(16)
    keys = [k for k in mlp.state_dict() if k.endswith("weight")]
    assert keys == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]  # the public .pth layout
    assert [mlp.state_dict()[k].shape[0] for k in keys] == [1024, 128, 64, 16, 1]
    f = tmp_path / f"mlp{suffix}"
    (torch.save if suffix == ".pth" else lambda sd, p: save_file(sd, str(p)))(mlp.state_dict(), f)
    r = load_reward("aesthetic", path=f, clip_path=tiny_open_clip, model=TINY_CLIP)
    assert not r.mlp.training
    _check_protocol(r, "")
    with pytest.raises(ValueError, match="not an aesthetic MLP"):
        load_reward("aesthetic", path=f, clip_path=tiny_open_clip, model=TINY_CLIP, hidden=(32, 8))


# ---------------------------------------------------------------- PickScore


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("pickscore")
    world.write_tokenizer(folder)  # a tiny CLIP BPE vocabulary written locally
    tok = CLIPTokenizer.from_pretrained(str(folder))
    v = tok.get_vocab()
    ids = dict(bos_token_id=v[world.SPECIAL_BOS], eos_token_id=v[world.SPECIAL_EOS],
               pad_token_id=v[world.SPECIAL_EOS])
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(v), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return folder


def test_pickscore(tiny_pickscore):
    r = load_reward("pickscore", path=tiny_pickscore)
    assert r.image_size == 32
    s = _check_protocol(r, ["a red handwritten digit 7", "a blue handwritten digit 1"])
    assert s.abs().max() <= r.model.logit_scale.exp() + 1e-4  # logit_scale * cos


# ---------------------------------------------------------------- ImageReward


def _tiny_imagereward(folder):
    """Tiny med_config + BERT vocab + random checkpoint in the package's key layout."""
    from transformers.models.bert.configuration_bert import BertConfig

    from hypersd_core.rewards import imagereward as irm

    VisionTransformer, BertModel, MLP = irm._import_imagereward_modules()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"a red blue handwritten digit 7 1 photo of cat".split()]
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n")
    med = {"architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": len(words) + 2,
           "max_position_embeddings": 64, "add_cross_attention": True, "encoder_width": 64,
           "pad_token_id": 0, "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "model_type": "bert"}
    (folder / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(0)
    blip = irm._Blip(VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=1),
                     BertModel(config=BertConfig(**med), add_pooling_layer=False))
    mlp = MLP(32)
    for p in mlp.parameters():  # the package's init is ~0; make the head visibly non-constant
        torch.nn.init.normal_(p, std=0.3)
    sd = {"blip." + k: v for k, v in blip.state_dict().items()}
    sd |= {"mlp." + k: v for k, v in mlp.state_dict().items()}
    torch.save(sd, folder / "ImageReward.pt")
    return folder


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    return _tiny_imagereward(tmp_path_factory.mktemp("imagereward"))


def test_imagereward_compat_shim():
    import transformers.modeling_utils as mu

    from hypersd_core.rewards.imagereward import install_compat_shim, prune_linear_layer

    install_compat_shim()
    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        assert callable(getattr(mu, name))
    heads, index = mu.find_pruneable_heads_and_indices([1], 3, 2, set())
    assert heads == {1} and index.tolist() == [0, 1, 4, 5]
    lin = torch.nn.Linear(4, 6)
    out = prune_linear_layer(lin, index, dim=0)
    assert out.weight.shape == (4, 4) and torch.equal(out.weight, lin.weight[[0, 1, 4, 5]])
    assert torch.equal(out.bias, lin.bias[[0, 1, 4, 5]]) and out.weight.requires_grad
    inp = prune_linear_layer(lin, torch.tensor([0, 3]), dim=1)
    assert inp.weight.shape == (6, 2) and torch.equal(inp.bias, lin.bias)


def test_imagereward_tiny(tiny_imagereward):
    from hypersd_core.rewards.imagereward import load_imagereward

    # the same loader the real ImageReward.pt goes through (registry folder form too)
    r = load_imagereward(tiny_imagereward / "ImageReward.pt", tiny_imagereward / "med_config.json",
                         tiny_imagereward / "tokenizer")
    assert r.image_size == 32 and len(r.blip.visual_encoder.blocks) == 1
    s = _check_protocol(r, ["a red handwritten digit 7", "a photo of a cat"])
    r2 = load_reward("imagereward", path=tiny_imagereward)
    assert torch.allclose(r2.score(_images(2).detach(), ["a red handwritten digit 7", "a photo of a cat"]),
                          s.detach(), atol=1e-5)


def test_imagereward_matches_package_pil_path(tiny_imagereward):
    """Our tensor path equals the package's own PIL preprocessing + score_gard math."""
    import numpy as np
    from PIL import Image

    from hypersd_core.rewards.imagereward import _import_imagereward_modules

    _import_imagereward_modules()
    from ImageReward.ImageReward import _transform

    r = load_reward("imagereward", path=tiny_imagereward)
    arr = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    pil = Image.fromarray(arr)
    ours = r.score([pil], "a red digit")
    x = _transform(32)(pil)[None]
    text = r.tokenizer(["a red digit"], padding="max_length", truncation=True, max_length=35,
                       return_tensors="pt")
    emb = r.blip.visual_encoder(x)
    out = r.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                              encoder_hidden_states=emb,
                              encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long),
                              return_dict=True)
    ref = (r.mlp(out.last_hidden_state[:, 0]) - r.mean) / r.std
    assert torch.allclose(ours, ref[:, 0], atol=1e-4)


# ---------------------------------------------------------------- perception (Mask R-CNN)


def test_mask_to_target():
    from hypersd_core.rewards.perception import mask_to_target

    m = torch.zeros(10, 12, dtype=torch.bool)
    m[2:5, 3:9] = True
    t = mask_to_target(m, 4)
    assert t["boxes"].tolist() == [[3.0, 2.0, 9.0, 5.0]] and t["labels"].tolist() == [4]
    assert t["masks"].shape == (1, 10, 12) and t["masks"].dtype == torch.uint8
    with pytest.raises(ValueError, match="empty"):
        mask_to_target(torch.zeros(4, 4), 1)
    with pytest.raises(ValueError, match="background"):
        mask_to_target(m, 0)


def _tiny_maskrcnn():
    return load_reward("perception", random_weights=True, num_classes=11, min_size=32,
                       max_size=32, backbone="resnet18", seed=0,
                       detector_kw=dict(box_batch_size_per_image=16, rpn_post_nms_top_n_train=64))


def test_maskrcnn_perception_loss():
    from hypersd_core.rewards.perception import mask_to_target

    r = _tiny_maskrcnn()
    assert not r.higher_is_better
    x = _images(2, 32, 32)
    targets = [mask_to_target(((x[i].detach().mean(0)) > 0.5), 3) for i in range(2)]
    loss = r.loss(x, targets)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in r.parameters())
    with pytest.raises(ValueError, match="needs ground-truth targets"):
        r.score(x, "a prompt")
    with pytest.raises(ValueError, match=r"masks \[N,32,32\]"):
        r.loss(x, [mask_to_target(torch.ones(8, 8), 1)] * 2)
    with pytest.raises(ValueError, match="2 targets for 1 images"):
        r.loss(x[:1], targets)


def test_maskrcnn_loss_descends_on_the_image():
    """One signed-gradient step on the image lowers its loss (gradients point the right way)."""
    from hypersd_core.rewards.perception import mask_to_target

    r = _tiny_maskrcnn()
    m = torch.zeros(32, 32, dtype=torch.bool)
    m[8:24, 10:22] = True
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = (0.5 * m.float().expand(1, 3, 32, 32) + 0.2 * noise).requires_grad_(True)
    targets = [mask_to_target(m, 3)]
    before = r.loss(x, targets)
    before.sum().backward()
    after = r.loss((x - 0.03 * x.grad.sign()).clamp(0, 1).detach(), targets)
    assert after.item() < before.item() - 0.05


def test_solo_backend_error_without_mmdet():
    pytest.importorskip("torchvision")
    try:
        import mmdet  # noqa: F401
        pytest.skip("mmdet is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="mmcv<2.2.*C\\+\\+20.*maskrcnn"):
        load_reward("perception", backend="solo")
