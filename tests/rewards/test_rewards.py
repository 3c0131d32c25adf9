"""Rewards: loading code on tiny random weights, the protocol's shapes and gradients,
clear errors, the shipped digits rewards' sanity, and scoring image files."""

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
    score_images,
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


# ---------------------------------------------------------------- digits rewards (shipped)


@pytest.fixture(scope="module")
def heldout():
    data = world.DigitsDataset("heldout").tensors()
    idx = torch.randperm(data["images"].shape[0], generator=torch.Generator().manual_seed(0))[:96]
    return {k: v[idx] for k, v in data.items()} | {"x": (data["images"][idx] + 1) / 2}


def test_digits_rewards_differentiable():
    for name in ("digits-quality", "digits-alignment"):
        _check_protocol(load_reward(name), "a red handwritten digit 7", 2, 32, 32)
    # any size is scored at 32x32: the 256 px nearest-neighbour enlargement the app shows
    # scores exactly as its 32 px original
    small = torch.rand(2, 3, 32, 32)
    shown = small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    for name in ("digits-quality", "digits-alignment"):
        r = load_reward(name)
        assert torch.allclose(r.score(shown, "a red handwritten digit 7"),
                              r.score(small, "a red handwritten digit 7"), atol=1e-6)
    with pytest.raises(ValueError, match="not a digits-world prompt"):
        load_reward("digits-alignment").score(torch.rand(1, 3, 32, 32), "a cat")


def test_digits_quality_real_beats_degraded(heldout):
    from hypersd_core.rewards.digits_train import DEGRADATIONS

    q = load_reward("digits-quality")
    g = torch.Generator().manual_seed(0)
    real = q.score(heldout["x"], "").mean()
    assert real > 0.7
    for name, fn in DEGRADATIONS.items():
        assert q.score(fn(heldout["x"], g), "").mean() < real - 0.2, name


def test_digits_alignment_correct_beats_wrong(heldout):
    a = load_reward("digits-alignment")
    d, c = heldout["digits"], heldout["colours"]
    right = [world.caption(world.COLOUR_NAMES[ci], int(di)) for ci, di in zip(c, d)]
    wrong_digit = [world.caption(world.COLOUR_NAMES[ci], int(di + 3) % 10) for ci, di in zip(c, d)]
    wrong_colour = [world.caption(world.COLOUR_NAMES[(ci + 2) % 8], int(di)) for ci, di in zip(c, d)]
    s = a.score(heldout["x"], right)
    assert s.mean() > 0.6
    assert (s > a.score(heldout["x"], wrong_digit)).float().mean() > 0.85
    assert (s > a.score(heldout["x"], wrong_colour)).float().mean() > 0.95


def test_digits_perception_wrong_mask_costs_more(heldout):
    from hypersd_core.rewards.perception import mask_to_target

    p = load_reward("digits-perception")
    x, m, d = heldout["x"][:16], heldout["masks"][:16], heldout["digits"][:16]
    right = p.loss_tensors(x, m, d)
    assert right.shape == (16,)
    assert (p.loss_tensors(x, m.roll(8, dims=-1), d) > right).all()
    assert (p.loss_tensors(x, m, (d + 1) % 10) > right).float().mean() > 0.8
    targets = [mask_to_target(m[i], int(d[i]) + 1) for i in range(16)]  # Mask R-CNN's format
    assert torch.allclose(p.loss(x, targets), right)
    xg = x.clone().requires_grad_(True)
    p.loss_tensors(xg, m, d).sum().backward()
    assert xg.grad.abs().sum() > 0


def test_digits_rewards_json():
    from hypersd_core.rewards.digits import REWARDS_DIR

    meta = json.loads((REWARDS_DIR / "rewards.json").read_text())
    assert set(meta["rewards"]) == {"digits-quality", "digits-alignment", "digits-perception"}
    assert sum(f.stat().st_size for f in REWARDS_DIR.iterdir()) < 1_000_000


def test_train_digit_rewards_smoke(tmp_path):
    from hypersd_core.rewards.digits_train import train_digit_rewards

    meta = train_digit_rewards(tmp_path, steps=2, batch=8, width=8,
                               generator=torch.Generator().manual_seed(0), teacher_per_level=0)
    r = load_reward("digits-alignment", path=tmp_path)
    assert meta["rewards"]["digits-alignment"]["width"] == 8
    assert r.score(torch.rand(2, 3, 32, 32), "a red handwritten digit 3").shape == (2,)
    q = load_reward("digits-quality", path=tmp_path)
    assert q.net.conditioned and meta["rewards"]["digits-quality"]["conditioned"]
    # --only keeps the other rewards' files and entries
    before = (tmp_path / "alignment.safetensors").read_bytes()
    meta = train_digit_rewards(tmp_path, steps=1, batch=8, width=8, only=("digits-quality",),
                               teacher_per_level=0)
    assert (tmp_path / "alignment.safetensors").read_bytes() == before
    assert set(meta["rewards"]) == {"digits-quality", "digits-alignment", "digits-perception"}


def test_quality_batch_grades_its_levels():
    from hypersd_core.rewards.digits_train import QUALITY_LEVELS, quality_batch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    colours = torch.arange(64) % 8
    levels = {n: {"images": torch.rand(8, 3, 32, 32), "colours": torch.zeros(8, dtype=torch.long)}
              for n in (1, 2, 4)}
    images, cond, target = quality_batch(torch.arange(64), x, colours, levels, g, drop_colour=0.0)
    assert images.shape == (64, 3, 32, 32) and cond.shape == (64, 4)
    counts = {v: int((target == v).sum()) for v in QUALITY_LEVELS.values()}
    assert counts == {1.0: 16, 0.75: 8, 0.5: 8, 0.25: 8, 0.0: 24}
    assert (cond[:, 3] == 1).all()  # no colour dropped at drop_colour=0
    red = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.equal(cond[0], red) and torch.equal(cond[40], red)  # colour 0, teacher@1 red


def test_off_hue_moves_the_ink_away_from_the_prompted_hue():
    from hypersd_core.digits.measures import hue_error
    from hypersd_core.rewards.digits_train import OFF_HUE_MIN_DEG, off_hue

    x = torch.zeros(16, 3, 32, 32)
    x[:, :, 8:24, 14:18] = 1.0
    colours = torch.arange(16) % 8
    y = off_hue(x, colours, torch.Generator().manual_seed(0))
    names = [world.COLOUR_NAMES[int(c)] for c in colours]
    err = hue_error(y, names)
    chromatic = [i for i, n in enumerate(names) if n != "white"]
    assert (err[chromatic] >= OFF_HUE_MIN_DEG - 1).all()
    assert torch.equal(y.amax(1) > 0, x.amax(1) > 0)  # the same stroke


def test_quality_takes_the_prompted_colour():
    from hypersd_core.rewards.digits import QualityNet, colour_condition

    cond = colour_condition(["a red handwritten digit 7", "a cat", "a white handwritten digit 1"])
    assert cond.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    net = QualityNet(8, conditioned=True)
    x = torch.rand(3, 3, 32, 32)
    assert not torch.allclose(net(x, cond), net(x, torch.zeros(3, 4)))


@pytest.mark.slow
def test_shipped_quality_ranks_the_teachers_steps_and_noise_on_held_out_seeds():
    """digits-quality on held-out prompts and seeds: teacher@1 < @2 < @4 <= @25, and pure
    noise and off-hue digits below the 2-step teacher (the reward the feedback stage
    optimises must not prefer noise)."""
    from hypersd_core.rewards.digits_rank import ranking_sets, ranking_table

    rows = {r["set"]: r["digits-quality"]
            for r in ranking_table(ranking_sets(64), n_boot=10, rewards=("digits-quality",))}
    assert rows["teacher@1"] < rows["teacher@2"] < rows["teacher@4"] <= rows["teacher@25"] + 0.02
    for low in ("uniform noise", "off-hue (held-out digits)"):
        assert rows[low] < min(rows["teacher@2"], 0.3), (low, rows)
    assert rows["real (held-out digits)"] > rows["teacher@2"]


# ---------------------------------------------------------------- score_images


def test_score_images_folder(tmp_path, heldout):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        arr = (heldout["x"][i].permute(1, 2, 0).numpy() * 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"{i}.png")
    Image.fromarray(arr).convert("L").save(folder / "3.png")  # grey: converted to RGB
    out = score_images("digits-quality", folder, "a red handwritten digit 7")
    assert [os.path.basename(p) for p, _ in out] == ["0.png", "1.png", "2.png", "3.png"]
    assert all(0.0 <= s <= 1.0 for _, s in out)
    with pytest.raises(ValueError, match="unknown reward"):
        score_images("nope", folder, "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        score_images("digits-quality", empty, "x")
    (folder / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="non-image files"):
        score_images("digits-quality", folder, "x")
    (folder / "notes.txt").unlink()
    (folder / "broken.png").write_text("not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        score_images("digits-quality", folder, "x")
