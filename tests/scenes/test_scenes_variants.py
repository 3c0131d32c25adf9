"""The teacher variants' high-noise emphasis (scenes/variants.py)."""

from __future__ import annotations

import torch

from hypersd_core.scenes.variants import loss_weights, sample_t


def _alphas_cumprod():
    from diffusers import DDPMScheduler

    from hypersd_core.digits.build import scheduler_config

    cfg = {k: v for k, v in scheduler_config().items()
           if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    return DDPMScheduler(**cfg).alphas_cumprod


def test_loss_weights_lift_high_noise_steps_and_leave_low_noise_ones():
    ac = _alphas_cumprod()
    w = loss_weights(torch.tensor([0, 100, 500, 800, 999]), ac, w_max=20.0)
    assert w[0] == 1.0 and w[1] == 1.0  # SNR > 1: the plain epsilon loss
    assert 1.0 < w[2] < 20.0  # 1 / SNR in between
    assert w[3] == 20.0 and w[4] == 20.0  # capped where SNR is tiny
    assert torch.all(w[1:] >= w[:-1])


def test_sample_t_draws_the_asked_share_from_the_high_noise_range():
    g = torch.Generator().manual_seed(0)
    t = sample_t(20_000, 0.5, 700, "cpu", generator=g)
    assert t.min() >= 0 and t.max() <= 999
    # half from [700, 999] plus 30% of the uniform half: 65% at or above 700
    assert abs((t >= 700).float().mean().item() - 0.65) < 0.02
    assert torch.equal(sample_t(5, 0.0, 700, "cpu", torch.Generator().manual_seed(1)),
                       sample_t(5, 0.0, 700, "cpu", torch.Generator().manual_seed(1)))
