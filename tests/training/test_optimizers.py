"""The 8-bit optimizer option: a digits run with optimizer=adamw8bit keeps 8-bit moments
and finishes; without bitsandbytes the setting is refused before anything loads."""

from __future__ import annotations

import pytest
import torch

from hypersd_core.training import optimizers
from hypersd_core.training.config import load_preset


def test_adamw8bit_refused_without_bitsandbytes(monkeypatch):
    monkeypatch.setattr(optimizers, "have_bitsandbytes", lambda: False)
    with pytest.raises(ValueError, match="adamw8bit needs bitsandbytes"):
        load_preset("digits-tscd-k8", ["optimizer=adamw8bit"])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        load_preset("digits-tscd-k8", ["optimizer=sgd"])


@pytest.mark.skipif(not optimizers.have_bitsandbytes(), reason="bitsandbytes not installed")
def test_adamw8bit_run_keeps_8bit_moments(tmp_path):
    from hypersd_core.training.runs import Run
    from hypersd_core.training.trainer import train

    cfg = load_preset("digits-tscd-k8", ["optimizer=adamw8bit", "steps=2", "batch_size=4",
                                         "sample_every=2", "checkpoint_every=1", "lora_rank=64",
                                         "lora_alpha=64", "sample_prompts=[a red handwritten digit 7]"])
    run = Run.create(tmp_path / "run", cfg)
    assert train(run.dir)["state"] == "done"
    assert (run.final_dir / "pytorch_lora_weights.safetensors").is_file()
    state = torch.load(run.latest_checkpoint() / "trainer.pt", weights_only=True)["optimizer"]["state"]

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (dict, list, tuple)):
            for v in (x.values() if isinstance(x, dict) else x):
                yield from tensors(v)

    # bitsandbytes keeps tensors of >= 4096 elements (rank-64 LoRA matrices here) in 8 bits
    assert any(t.dtype == torch.uint8 for t in tensors(state))
