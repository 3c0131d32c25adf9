"""Shared fixtures: tiny random SD1.5- and SDXL-shaped pipelines built from config
(local tokenizer files; nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from hypersd_core.worlds import digits  # noqa: E402

if "OMP_NUM_THREADS" not in os.environ:  # a busy machine can ask for fewer
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _text_encoder(vocab_size: int, bos: int, eos: int, projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=digits.MAX_TOKENS, projection_dim=32,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _tokenizer(folder):
    from transformers import CLIPTokenizer

    digits.write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                         norm_num_groups=8, sample_size=32)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_tiny_sd15(folder):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tok = _tokenizer(folder / "_tok")
    vocab = tok.get_vocab()
    te = _text_encoder(len(vocab), vocab[digits.SPECIAL_BOS], vocab[digits.SPECIAL_EOS])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=4)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tok = _tokenizer(folder / "_tok")
    vocab = tok.get_vocab()
    ids = (len(vocab), vocab[digits.SPECIAL_BOS], vocab[digits.SPECIAL_EOS])
    te1 = _text_encoder(*ids)
    te2 = _text_encoder(*ids, projection=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        norm_num_groups=8, attention_head_dim=4, transformer_layers_per_block=1,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=tok, tokenizer_2=tok, unet=unet,
                                     scheduler=_scheduler())
    pipe.save_pretrained(folder)
    return folder


def make_image_folder(folder, n: int):
    """n random 32x32 PNGs with digits captions in metadata.jsonl (FolderData's layout)."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a red handwritten digit {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    return folder


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """In-process trainings with different ``mixed_precision`` in one pytest process: accelerate
    keeps one global state per process (a run process has one), so reset it after each test."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the CPU may be shared with other jobs, and two
    spinning threads on two busy cores make every op wait (several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
