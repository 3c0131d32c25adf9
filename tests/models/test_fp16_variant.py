"""A hub model loaded in half precision fetches its ``*.fp16.safetensors`` files only (the
hub is replaced here; nothing is downloaded)."""

from __future__ import annotations

import torch

from hypersd_core.models import backbone as B


def test_half_precision_fetches_the_fp16_variant(tiny_sd15, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    snapshot = tmp_path / "snapshot"
    StableDiffusionPipeline.from_pretrained(tiny_sd15).save_pretrained(snapshot, variant="fp16")
    assert not list(snapshot.glob("unet/diffusion_pytorch_model.safetensors"))  # fp16 files only
    asked = []

    def snapshot_download(repo_id, local_files_only=False, allow_patterns=None, ignore_patterns=None):
        asked.append(allow_patterns)
        if allow_patterns and "*/*.fp16.safetensors" in allow_patterns:
            return str(snapshot)
        raise FileNotFoundError("only the fp16 files exist in this test's hub")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    bb = B.load_backbone("owner/tiny-sd15", dtype=torch.float16)
    assert bb.unet.dtype == torch.float16 and bb.kind == "sd15"
    assert "*/*.fp16.safetensors" in asked[0] and "*/*.safetensors" not in asked[0]
    assert B.has_variant(snapshot, "fp16") and not B.has_variant(tiny_sd15, "fp16")
