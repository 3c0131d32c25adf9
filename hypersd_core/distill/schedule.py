"""Noise-schedule math shared by training and inference: the solver grid, TSCD
segment edges, x0/eps conversions, the DDIM jump, and LCM's boundary scalings.

Timesteps are integers in [0, T); ``-1`` means "clean", with the schedule's final
alpha (DDIM's ``final_alpha_cumprod``: alphas_cumprod[0] for SD, which does not set
alpha to one), so a trailing sampler's last step and the training target agree.
"""

from __future__ import annotations

import torch

CLEAN = -1


def solver_grid(num_train_timesteps: int = 1000, num_steps: int = 40) -> torch.Tensor:
    """The N solver timesteps t_n = n*T/N - 1, n = 1..N (N=40: 24, 49, ..., 999). [N] long."""
    if num_steps < 1 or num_train_timesteps % num_steps:
        raise ValueError(f"num_solver_steps must divide T={num_train_timesteps}, got {num_steps}")
    step = num_train_timesteps // num_steps
    return torch.arange(1, num_steps + 1) * step - 1


def check_grid_fits_segments(num_train_timesteps: int, num_steps: int, k: int) -> None:
    """TSCD needs every segment edge on the grid: the grid spacing must divide T/k."""
    if num_train_timesteps % k or num_train_timesteps % num_steps:
        raise ValueError(f"T={num_train_timesteps} must be divisible by k={k} and N={num_steps}")
    if (num_train_timesteps // k) % (num_train_timesteps // num_steps):
        raise ValueError(
            f"num_solver_steps={num_steps} does not put the k={k} segment edges on its grid: "
            f"its spacing {num_train_timesteps // num_steps} must divide T/k="
            f"{num_train_timesteps // k} (use a multiple of {k}, e.g. 40)")


def segment_edges(k: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Lower edges of the k segments of [0, T), descending; CLEAN (-1) closes the last.

    They are the DDIM-trailing k-step timesteps after the first: k=4 -> 749, 499, 249, -1,
    so a k-step trailing sampler lands exactly on the edges the stage trained for.
    """
    if k < 1 or num_train_timesteps % k:
        raise ValueError(f"k must be >= 1 and divide T={num_train_timesteps}, got {k}")
    span = num_train_timesteps // k
    return torch.arange(k - 1, -1, -1) * span - 1


def segment_lower_edge(t: torch.Tensor, k: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Lower edge of the segment (edge, upper] holding t: t_b of Algorithm 1 (CLEAN for the last)."""
    span = num_train_timesteps // k
    return torch.div(t, span, rounding_mode="floor") * span - 1


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor,
              final_alpha: float | torch.Tensor | None = None) -> torch.Tensor:
    """alpha_bar_t for integer t [B]; t = CLEAN gives ``final_alpha`` (default alphas_cumprod[0])."""
    final = alphas_cumprod[0] if final_alpha is None else torch.as_tensor(final_alpha)
    t = t.to(alphas_cumprod.device)
    a = alphas_cumprod[t.clamp(min=0)]
    return torch.where(t >= 0, a, final.to(a.dtype))


def _b(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return x.to(ref.dtype).view(-1, *[1] * (ref.dim() - 1))


def predictions(model_output: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor,
                prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_pred, eps_pred) from a model output at x_t, for epsilon or v prediction."""
    sa, sb = _b(a_t.sqrt(), x_t), _b((1 - a_t).sqrt(), x_t)
    if prediction_type == "epsilon":
        eps_pred = model_output
        x0_pred = (x_t - sb * eps_pred) / sa
    elif prediction_type == "v_prediction":
        x0_pred = sa * x_t - sb * model_output
        eps_pred = sa * model_output + sb * x_t
    elif prediction_type == "sample":
        x0_pred = model_output
        eps_pred = (x_t - sa * x0_pred) / sb
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0_pred, eps_pred


def ddim_jump(x0_pred: torch.Tensor, eps_pred: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """DDIM (eta=0) jump to timestep s: x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps.

    With the predictions made at t, s = t gives back x_t exactly (the identity).
    """
    return _b(a_s.sqrt(), x0_pred) * x0_pred + _b((1 - a_s).sqrt(), x0_pred) * eps_pred


def add_noise(x0: torch.Tensor, noise: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x0)."""
    return _b(a_t.sqrt(), x0) * x0 + _b((1 - a_t).sqrt(), x0) * noise


def renoise(x_s: torch.Tensor, noise: torch.Tensor, a_s: torch.Tensor,
            a_t: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_s) for t >= s: x_t = sqrt(a_t/a_s) x_s + sqrt(1 - a_t/a_s) noise."""
    ratio = a_t / a_s
    return _b(ratio.sqrt(), x_s) * x_s + _b((1 - ratio).clamp(min=0).sqrt(), x_s) * noise


def draw(fn, *args, generator: torch.Generator | None = None,
         device: torch.device | str | None = None, dtype: torch.dtype | None = None,
         **kwargs) -> torch.Tensor:
    """A random draw ``fn(*args)`` (torch.rand, randn, randint, ...) made on the
    generator's device and then moved to ``device``.

    A CPU generator cannot fill a CUDA tensor ("Expected a 'cuda' device type for
    generator"), and drawing where the generator lives gives the same numbers on every
    device. Every draw that needs both a generator and a device goes through here.
    """
    where = generator.device if generator is not None else device
    if dtype is not None:
        kwargs["dtype"] = dtype
    out = fn(*args, generator=generator, device=where, **kwargs)
    return out if device is None else out.to(device)


def offset_noise(noise: torch.Tensor, strength: float, generator=None) -> torch.Tensor:
    """Offset-noise perturbation (Hyper-SD's "noise perturbation"): add a per-channel constant."""
    if strength == 0:
        return noise
    offset = draw(torch.randn, (noise.shape[0], noise.shape[1], *[1] * (noise.dim() - 2)),
                  generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + strength * offset


def lcm_boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5,
                          timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's (c_skip, c_out) at t, as LCMScheduler uses them: c_skip(0) = 1, c_out(0) = 0."""
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def cfg_lcm_form(out_cond: torch.Tensor, out_uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """LCM-form guidance: out = out_c + w (out_c - out_u) (a scale of 1 + w)."""
    return out_cond + _b(w, out_cond) * (out_cond - out_uncond)
