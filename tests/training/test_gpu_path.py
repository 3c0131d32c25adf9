"""The GPU's dtype path on the CPU (issue: the first real GPU run must succeed).

Every stage type trains 2 steps with ``mixed_precision=bf16, frozen_dtype=bf16`` (bf16
frozen weights, fp32 LoRA, autocast), as it does on a GPU; random draws pass never both a
generator and a device (a CPU generator cannot fill a CUDA tensor); a step without
gradients takes no optimizer step; checkpointed blocks recompute under the forward's
LoRA state; gradients average over processes in flat buckets.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hypersd_core.paths import ROOT
from hypersd_core.training.config import load_preset
from hypersd_core.training.runs import Run
from hypersd_core.training.trainer import frozen_dtype, train

GPU_PATH = {"mixed_precision": "bf16", "frozen_dtype": "bf16", "steps": 2, "batch_size": 4,
            "log_every": 1, "sample_every": 100, "checkpoint_every": 100,
            "sample_prompts": ["a red handwritten digit 7"], "sample_steps": 1}


def _run(tmp_path, preset, **extra):
    cfg = load_preset(preset, {**GPU_PATH, **extra})
    run = Run.create(tmp_path / "run", cfg)
    return run, train(run.dir)


@pytest.mark.parametrize("preset,extra", [
    ("digits-tscd-k8", {}),  # TSCD without the adversarial term
    ("digits-tscd-k1", {"gradient_checkpointing": "on"}),  # with it, checkpointed
    ("digits-lcm", {}),
    ("digits-tcd", {}),
    pytest.param("digits-feedback", {}, marks=pytest.mark.slow),  # the heaviest two stages
    pytest.param("digits-dmd", {"gradient_checkpointing": "on", "critic_steps": 1},
                 marks=pytest.mark.slow),
])
def test_every_stage_type_runs_the_gpu_dtype_path(preset, extra, tmp_path):
    run, status = _run(tmp_path, preset, **extra)
    assert status["state"] == "done" and status["step"] == 2, status
    records, _ = run.read_metrics()
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in losses)
    if preset == "digits-tscd-k1":  # the discriminator's own step ran (under autocast), then G's
        assert "loss_adv_d" in losses[0] and np.isfinite(losses[0]["loss_adv_d"])
        assert "loss_adv_g" in losses[1] and np.isfinite(losses[1]["loss_adv_g"])
    if preset == "digits-dmd":
        assert all(np.isfinite(r["loss_fake"]) for r in losses)


def test_frozen_dtype_follows_mixed_precision():
    cfg = load_preset("digits-tscd-k8", {"mixed_precision": "bf16"})
    assert frozen_dtype(cfg, use_cuda=True) == torch.bfloat16
    assert frozen_dtype(cfg, use_cuda=False) == torch.float32  # auto on the CPU
    cfg = load_preset("digits-tscd-k8", {"mixed_precision": "bf16", "frozen_dtype": "bf16"})
    assert frozen_dtype(cfg, use_cuda=False) == torch.bfloat16
    with pytest.raises(ValueError, match="frozen_dtype=bf16 needs mixed_precision"):
        load_preset("digits-tscd-k8", {"frozen_dtype": "bf16"})


def test_fp16_is_refused_on_the_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        _run(tmp_path, "digits-tscd-k8", mixed_precision="fp16", frozen_dtype="fp32")


def test_critic_only_step_takes_no_optimizer_step(tmp_path):
    """DMD with critic_steps=2: step 1 updates only the fake score; the student stays
    exactly the init adapter (no momentum-only or weight-decay step)."""
    from safetensors.torch import load_file

    run, status = _run(tmp_path, "digits-dmd", steps=1, critic_steps=2, weight_decay=0.01)
    assert status["state"] == "done"
    cfg = run.config()
    init = load_file(str(Path(cfg.init_adapter) / "pytorch_lora_weights.safetensors")
                     if Path(cfg.init_adapter).is_dir() else cfg.init_adapter)
    final = load_file(str(run.final_dir / "pytorch_lora_weights.safetensors"))
    assert init.keys() == final.keys()
    assert cfg.lora_alpha == cfg.lora_rank  # saved files bake alpha / rank into lora_B
    for key, value in init.items():
        assert torch.equal(final[key].float(), value.float()), key
    ckpt = torch.load(run.latest_checkpoint() / "trainer.pt", weights_only=True)
    fake_b = [v for k, v in ckpt["stage"]["fake"].items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in fake_b)  # ... while the fake score did learn


RANDOM_FNS = {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial",
              "rand_like", "randn_like", "randint_like", "poisson"}


def test_no_random_draw_passes_both_a_generator_and_a_device():
    """``torch.randn(..., generator=g, device=d)`` fails when g is a CPU generator and d a
    GPU. Every such draw goes through ``distill.schedule.draw`` (draws where the
    generator lives, then moves), the one place allowed to pass both."""
    sources = [*ROOT.joinpath("hypersd_core").rglob("*.py"), ROOT / "app.py",
               *ROOT.joinpath("train_tab").rglob("*.py"), *ROOT.joinpath("compare_tab").rglob("*.py")]
    found = []
    for path in sources:
        tree = ast.parse(path.read_text())
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "draw" and path.name == "schedule.py":
                allowed |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or id(node) in allowed:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            keys = {k.arg for k in node.keywords}
            if {"generator", "device"} <= keys and name in RANDOM_FNS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:80]}")
    assert not found, "random draws passing generator and device:\n" + "\n".join(found)
    # the helper draws where the generator lives, then moves: the numbers of a plain draw
    from hypersd_core.distill.schedule import draw

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert draw(torch.randn, (4,), generator=g1, device="meta").device.type == "meta"
    g1.manual_seed(3)
    assert torch.equal(draw(torch.randn, (4,), generator=g1, device="cpu", dtype=torch.float64),
                       torch.randn(4, generator=g2, dtype=torch.float64))


def test_checkpointing_recomputes_under_the_forward_lora_state():
    """A forward with adapters off and gradients to its input, backpropagated after the
    adapters are back on (the discriminator in TSCD): same gradient as without
    checkpointing (diffusers' default checkpointing raised CheckpointError here)."""
    from hypersd_core.models.checkpointing import adapter_aware_checkpoint
    from hypersd_core.models.lora import adapters_disabled, add_lora
    from hypersd_core.models.random_model import build_modules, load_configs, shrink

    unet = build_modules("sd15", shrink("sd15", load_configs("sd15")))["unet"]
    params = add_lora(unet, 4, 4.0, adapter_name="student")
    for p in params:
        torch.nn.init.normal_(p, std=0.1)
    unet.set_adapter("student")
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim)

    def grad(checkpointing: bool):
        if checkpointing:
            unet.enable_gradient_checkpointing(adapter_aware_checkpoint)
        else:
            unet.disable_gradient_checkpointing()
        xi = x.clone().requires_grad_(True)
        with adapters_disabled(unet):
            out = unet(xi, t, encoder_hidden_states=ctx).sample
        out.square().mean().backward()  # adapters are on again here
        return xi.grad

    plain = grad(False)
    assert torch.allclose(grad(True), plain, atol=1e-5)


def _all_reduce_worker(rank, world, init_file, out):
    import torch.distributed as dist

    from hypersd_core.distill.optim import all_reduce_grads

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 5, 7)]
    params[0].grad = torch.full((3,), float(rank + 1))
    params[1].grad = torch.full((5,), 10.0 * (rank + 1))
    if rank == 0:  # unused on one process: counts as zero
        params[2].grad = torch.full((7,), 4.0)
    calls = all_reduce_grads(params, bucket_numel=8)
    torch.save({"grads": [p.grad for p in params], "calls": calls}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_all_reduce_grads_averages_in_flat_buckets(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "grads"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    for res in results:
        assert res["calls"] == 2  # 15 elements in buckets of >= 8: 2 collectives, not 3
        assert torch.equal(res["grads"][0], torch.full((3,), 1.5))
        assert torch.equal(res["grads"][1], torch.full((5,), 15.0))
        assert torch.equal(res["grads"][2], torch.full((7,), 2.0))
