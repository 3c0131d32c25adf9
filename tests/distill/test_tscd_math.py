"""Invariants and exact numbers of the schedule, TSCD, LCM and adversarial math."""

from __future__ import annotations

import pytest
import torch

from hypersd_core.distill import schedule as S
from hypersd_core.distill import tscd
from hypersd_core.distill.adversarial import (
    hinge_d_loss,
    hinge_g_loss,
    mean_over_maps,
    renoise_time,
)


@pytest.fixture(scope="module")
def ac():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear").alphas_cumprod.double()


def test_solver_grid():
    grid = S.solver_grid(1000, 40)
    assert grid[:3].tolist() == [24, 49, 74] and grid[-1] == 999 and len(grid) == 40
    with pytest.raises(ValueError, match="must divide"):
        S.solver_grid(1000, 30)


@pytest.mark.parametrize("k", [8, 4, 2, 1])
def test_edges_partition_and_match_trailing_sampler(k):
    from diffusers import DDIMScheduler

    edges = S.segment_edges(k)
    assert edges[-1] == S.CLEAN and len(edges) == k
    # the segments (edge, upper] partition [0, T): every timestep has exactly one
    uppers = torch.cat([torch.tensor([999]), edges[:-1]])
    covered = torch.zeros(1000, dtype=torch.int)
    for lo, hi in zip(edges.tolist(), uppers.tolist()):
        covered[lo + 1:hi + 1] += 1
    assert covered[1:].eq(1).all() and covered[0] == 1
    # the k-step DDIM-trailing timesteps are exactly T-1 and the upper edges
    ddim = DDIMScheduler(timestep_spacing="trailing", steps_offset=1)
    ddim.set_timesteps(k)
    assert ddim.timesteps.tolist() == uppers.tolist()
    # and every edge lies on the N=40 solver grid (or is clean)
    grid = set(S.solver_grid(1000, 40).tolist())
    assert all(e in grid or e == S.CLEAN for e in edges.tolist())
    S.check_grid_fits_segments(1000, 40, k)


def test_grid_that_misses_edges_is_rejected():
    with pytest.raises(ValueError, match="does not put the k=8 segment edges"):
        S.check_grid_fits_segments(1000, 50, 8)


def test_segment_lower_edge_examples():
    t = torch.tensor([999, 749, 750, 274, 249, 24])
    assert S.segment_lower_edge(t, 4).tolist() == [749, 499, 749, 249, -1, -1]
    assert S.segment_lower_edge(t, 1).tolist() == [-1] * 6


def test_alpha_bar_clean_is_final_alpha(ac):
    a = S.alpha_bar(ac, torch.tensor([-1, 0, 999]))
    assert a[0] == ac[0] and a[1] == ac[0] and a[2] == ac[999]


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_jump_to_t_itself_is_identity(ac, pred):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    out = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    a_t = S.alpha_bar(ac, torch.tensor([10, 500, 990]))
    x0, eps = S.predictions(out, x_t, a_t, pred)
    assert torch.allclose(S.ddim_jump(x0, eps, a_t), x_t, atol=1e-9)


def test_predictions_round_trip_forward_diffusion(ac):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    a = S.alpha_bar(ac, torch.tensor([100, 900]))
    x_t = S.add_noise(x0, eps, a)
    v = a.sqrt().view(-1, 1, 1, 1) * eps - (1 - a).sqrt().view(-1, 1, 1, 1) * x0
    for pred, out in [("epsilon", eps), ("v_prediction", v)]:
        x0_hat, eps_hat = S.predictions(out, x_t, a, pred)
        assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)


def test_ddim_jump_matches_diffusers_ddim_step(ac):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    eps = torch.randn(1, 4, 8, 8, generator=g)
    for t, s in [(999, 749), (249, -1)]:
        ref = sched.step(eps, t, x).prev_sample
        x0, e = S.predictions(eps.double(), x.double(), S.alpha_bar(ac, torch.tensor([t])))
        ours = S.ddim_jump(x0, e, S.alpha_bar(ac, torch.tensor([s])))
        assert torch.allclose(ours.float(), ref, atol=1e-5)


def test_lcm_boundary_scalings():
    c_skip, c_out = S.lcm_boundary_scalings(torch.tensor([0, 1, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] == pytest.approx(0.25 / 100.25) and c_out[1] == pytest.approx(10 / 100.25**0.5)
    assert c_skip[2] < 1e-6 and c_out[2] == pytest.approx(1.0, abs=1e-6)


def test_lcm_scalings_match_lcm_scheduler():
    from diffusers import LCMScheduler

    sched = LCMScheduler()
    for t in (0, 19, 499):
        ref = sched.get_scalings_for_boundary_condition_discrete(t)
        ours = S.lcm_boundary_scalings(torch.tensor([t]))
        assert float(ours[0]) == pytest.approx(float(ref[0])) and float(ours[1]) == pytest.approx(float(ref[1]))


def test_cfg_lcm_form_and_teacher_step(ac):
    c, u = torch.full((1, 1), 2.0), torch.full((1, 1), 1.0)
    assert S.cfg_lcm_form(c, u, torch.tensor([3.0])).item() == 5.0  # 2 + 3 * (2 - 1)
    x = torch.ones(1, 1, dtype=torch.float64)
    a_t, a_p = S.alpha_bar(ac, torch.tensor([499])), S.alpha_bar(ac, torch.tensor([474]))
    same = tscd.teacher_ddim_step(x, c.double(), c.double(), torch.tensor([7.0]), a_t, a_p)
    x0, eps = S.predictions(c.double(), x, a_t)
    assert torch.allclose(same, S.ddim_jump(x0, eps, a_p))  # no guidance effect when c == u


def test_sample_t_end_in_range():
    g = torch.Generator().manual_seed(0)
    t_prev = torch.tensor([974, 724, 224, 24] * 50)
    edge = S.segment_lower_edge(t_prev + 25, 4)
    t_end = tscd.sample_t_end(t_prev, edge, "uniform", g)
    assert (t_end >= edge).all() and (t_end <= t_prev).all()
    assert (t_end == t_prev).any() and (t_end == edge).any()
    assert torch.equal(tscd.sample_t_end(t_prev, edge, "edge", g), edge)
    with pytest.raises(ValueError, match="t_end mode"):
        tscd.sample_t_end(t_prev, edge, "random", g)


def test_distances_small_exact_numbers():
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert tscd.distance(a, b, "mse").tolist() == [2.0, 0.0]
    h = tscd.distance(a, b, "huber", huber_c=1.0)
    assert h[0].item() == pytest.approx(((4 + 1) ** 0.5 - 1) / 2) and h[1].item() == 0.0


def test_tscd_loss_zero_when_student_equals_target(ac):
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    a_end = S.alpha_bar(ac, torch.tensor([249, -1])).float()
    target = S.ddim_jump(x0, eps, a_end)
    assert tscd.tscd_loss(x0, eps, target, a_end).abs().max() < 1e-12
    # from t_{n-1} = clean the target stays put
    x_prev = torch.randn(2, 4, 4, 4, generator=g)
    kept = tscd.target_jump(x_prev, x0, eps, torch.tensor([-1, 24]), a_end)
    assert torch.equal(kept[0], x_prev[0]) and not torch.equal(kept[1], x_prev[1])


def test_offset_noise():
    g = torch.Generator().manual_seed(0)
    n = torch.zeros(2, 4, 8, 8)
    assert torch.equal(S.offset_noise(n, 0.0, g), n)
    out = S.offset_noise(n, 0.1, g)
    assert out.std(dim=(2, 3)).max() == 0 and out.abs().max() > 0  # constant per channel


def test_hinge_losses_and_renoise_time():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).tolist() == [0.0, 2.5]
    assert hinge_g_loss(fake).tolist() == [3.0, 0.5]  # PCM's relu(1 - D), not -D
    assert hinge_g_loss(torch.tensor([1.5])).tolist() == [0.0]  # no push beyond the margin
    g = torch.Generator().manual_seed(0)
    edge = torch.tensor([749, 499, -1] * 100)
    t = renoise_time(edge, 4, 1000, g)
    assert (t >= edge.clamp(min=0)).all() and (t < edge.clamp(min=0) + 250).all() and (t < 1000).all()


def test_hinge_is_per_pixel_not_on_pooled_logits():
    """PCM applies the hinge to every pixel of every head's map, then averages: a map that
    is confidently right on half its pixels and wrong on the other half costs more than
    the hinge of its pooled logit (which is 0, exactly at the margin's middle)."""
    real = torch.tensor([3.0, 3.0, -3.0, -3.0]).view(1, 1, 2, 2)
    fake = -real
    per_pixel = mean_over_maps([hinge_d_loss(real, fake)])
    pooled = hinge_d_loss(real.mean((1, 2, 3)), fake.mean((1, 2, 3)))
    assert per_pixel.tolist() == [4.0]  # (0 + 0 + 8 + 8) / 4
    assert pooled.tolist() == [2.0]
    g_per_pixel = mean_over_maps([hinge_g_loss(fake)])
    assert g_per_pixel.tolist() == [2.0] and hinge_g_loss(fake.mean((1, 2, 3))).tolist() == [1.0]
    # several heads: the mean of the heads' per-sample means
    two = mean_over_maps([torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 4, 4)])
    assert two.tolist() == [0.5, 0.5, 0.5]
