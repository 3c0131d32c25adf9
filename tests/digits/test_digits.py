"""The digits world: data pipeline, the shipped pipeline in stock diffusers, a quick
quality check of the shipped weights, and the metrics on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypersd_core.paths import DIGITS_EVAL, DIGITS_PIPELINE
from hypersd_core.worlds import digits

shipped = pytest.mark.skipif(not (DIGITS_PIPELINE / "model_index.json").is_file(),
                             reason="digits world not built")


def test_split_is_fixed_disjoint_and_about_20_percent():
    train, held = digits.split_indices()
    assert len(set(train) & set(held)) == 0 and len(train) + len(held) == 1797
    assert abs(len(held) / 1797 - 0.2) < 0.01
    digits.split_indices.cache_clear()
    train2, held2 = digits.split_indices()
    assert np.array_equal(held, held2) and np.array_equal(train, train2)


def test_samples_shapes_colours_captions_masks():
    ds = digits.DigitsDataset("train")
    assert len(ds) == len(digits.split_indices()[0]) * 8
    s = ds[3]  # digit 0 of the split in colour 3 (yellow)
    assert s.image.shape == (3, 32, 32) and s.image.min() >= -1 and s.image.max() <= 1
    assert s.colour == "yellow" and s.caption == f"a yellow handwritten digit {s.digit}"
    assert s.mask.dtype == torch.bool and s.mask.shape == (32, 32) and s.mask.any()
    # ink drawn in the named colour: the blue channel of yellow is black everywhere
    img01 = (s.image + 1) / 2
    assert img01[2].max() == 0 and torch.allclose(img01[0], img01[1])
    orange = digits.colourise(torch.ones(2, 2), "orange")
    assert orange[:, 0, 0].tolist() == pytest.approx([1.0, 128 / 255, 0.0])
    t = ds.tensors()
    assert torch.equal(t["images"][3], s.image) and t["digits"][3] == s.digit
    assert torch.equal(t["masks"][3], s.mask)


def test_captions_and_parsing():
    assert len(digits.ALL_PROMPTS) == 80 and len({p for p, _, _ in digits.ALL_PROMPTS}) == 80
    assert digits.parse_caption("a magenta handwritten digit 4") == ("magenta", 4)
    with pytest.raises(ValueError, match="not a digits-world prompt"):
        digits.parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="split must be"):
        digits.DigitsDataset("test")


def test_tokenizer_keeps_caption_words_whole(tmp_path):
    from transformers import CLIPTokenizer

    digits.write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    words = tok.convert_ids_to_tokens(tok("a orange handwritten digit 7").input_ids)
    assert words == ["<|startoftext|>", "a</w>", "orange</w>", "handwritten</w>", "digit</w>",
                     "7</w>", "<|endoftext|>"]
    ids = tok("anything at all, even unseen words", truncation=True).input_ids
    assert len(ids) == digits.MAX_TOKENS and tok.unk_token_id not in ids[1:-1]


def test_ink_colour_and_frechet_on_known_inputs():
    from hypersd_core.digits.evaluate import frechet_distance, ink_colour

    ink = digits.ink_32()[:8]
    for i, name in enumerate(digits.COLOUR_NAMES):
        assert ink_colour(digits.colourise(ink, name)).eq(i).all(), name
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g)
    assert frechet_distance(a, a) < 1e-6
    assert frechet_distance(a, a + 3.0) == pytest.approx(72.0, rel=1e-6)  # 8 dims x 3^2


@shipped
def test_metrics_on_real_heldout_images():
    from hypersd_core.digits.evaluate import default_evaluator

    ev = default_evaluator()
    held = digits.DigitsDataset("heldout")
    idx = torch.arange(0, len(held), 7)[:400]
    images = torch.stack([(held[int(i)].image + 1) / 2 for i in idx])
    prompts = [held[int(i)].caption for i in idx]
    m = ev.metrics(images, prompts)
    assert m["digit_acc"] > 95 and m["colour_acc"] == 100
    assert m["fd"] < 3 * ev.fd_floor + 1
    shuffled = list(np.random.default_rng(0).permutation(prompts))
    m2 = ev.metrics(images, shuffled)
    assert 3 < m2["digit_acc"] < 20 and m2["colour_acc"] < 25  # chance is ~10% / 12.5%
    assert ev.fd_floor > 0 and DIGITS_EVAL.is_dir()


@shipped
def test_shipped_pipeline_loads_in_stock_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DIGITS_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red handwritten digit 7", num_inference_steps=10, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    arr = np.asarray(image, dtype=np.float32)
    assert arr[..., 0].max() > 150 and arr[..., 1:].mean() < arr[..., 0].mean()  # red ink


@pytest.mark.slow  # evaluates the shipped teacher on many images
@shipped
def test_quick_quality_of_shipped_teacher():
    """80 images (every prompt once) at 25 steps: the teacher draws the prompted digits."""
    from hypersd_core.digits.evaluate import default_evaluator, eval_prompts
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    prompts, seeds = eval_prompts(80)
    gen = Sampler(load_backbone("digits")).generate("teacher", 25, prompts, seeds)
    m = default_evaluator().metrics(gen.images, prompts)
    assert m["digit_acc"] >= 90 and m["colour_acc"] >= 95, m
