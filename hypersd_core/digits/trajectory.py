"""Trajectory diagnostic: how far a few-step sampler's states lie from the teacher's
ODE solution started from the same noise.

The teacher runs DDIM (eta 0) with the model's recommended CFG on the N=40 solver grid
(t = 999, 974, ..., 24, then clean); its state at any timestep s is the DDIM jump to s
from the grid step just above it. The method runs its own recipe from the same initial
latents; after each of its steps its latents sit at the next timestep of its schedule
(clean after the last) and are compared there. A trajectory-preserving distiller
(TSCD on DDIM trailing) should stay close at every segment edge; LCM re-noises with
fresh noise between steps, so its intermediate states leave the ODE path by design.
"""

from __future__ import annotations

import torch

from hypersd_core.distill import schedule as S

_TEACHER_CACHE: dict = {}  # (backbone id, latents digest, prompts, guidance) -> steps


@torch.no_grad()
def _teacher_steps(backbone, prompts, latents, scale, num_steps):
    """The teacher's DDIM steps [(t, t_next, x0, eps)] on the N-step solver grid (cached:
    every method of one diagnostic starts from the same noise)."""
    key = (id(backbone), float(latents.double().sum()), tuple(prompts), scale, num_steps)
    if key in _TEACHER_CACHE:
        return _TEACHER_CACHE[key]
    pipe = backbone.pipe
    device = backbone.device
    cond, uncond = pipe.encode_prompt(prompts, device, 1, True)
    ac = backbone.alphas_cumprod.to(device).float()
    grid = S.solver_grid(backbone.num_train_timesteps, num_steps).flip(0).tolist()  # 999 .. 24
    x = latents.to(device).float()
    steps = []
    for i, t in enumerate(grid):
        t_next = grid[i + 1] if i + 1 < len(grid) else S.CLEAN
        tt = torch.full((len(x),), t, device=device, dtype=torch.long)
        out = pipe.unet(torch.cat([x, x]).to(pipe.unet.dtype), torch.cat([tt, tt]),
                        encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
        out_u, out_c = out.chunk(2)
        a_t = S.alpha_bar(ac, tt)
        x0_u, eps_u = S.predictions(out_u, x, a_t, backbone.prediction_type)
        x0_c, eps_c = S.predictions(out_c, x, a_t, backbone.prediction_type)
        x0, eps = x0_u + scale * (x0_c - x0_u), eps_u + scale * (eps_c - eps_u)
        steps.append((t, t_next, x0, eps))
        x = S.ddim_jump(x0, eps, S.alpha_bar(ac, torch.full_like(tt, t_next)))
    _TEACHER_CACHE.clear()
    _TEACHER_CACHE[key] = steps
    return steps


@torch.no_grad()
def teacher_ode_states(backbone, prompts: list[str], latents: torch.Tensor,
                       timesteps: list[int], guidance: float | None = None,
                       num_steps: int = 40) -> dict[int, torch.Tensor]:
    """The teacher's DDIM ODE states at ``timesteps`` (-1 = clean) from ``latents`` at T-1."""
    scale = backbone.guidance_scale if guidance is None else guidance
    ac = backbone.alphas_cumprod.to(backbone.device).float()
    states: dict[int, torch.Tensor] = {}
    if backbone.num_train_timesteps - 1 in timesteps:
        states[backbone.num_train_timesteps - 1] = latents.to(backbone.device).float().clone()
    for t, t_next, x0, eps in _teacher_steps(backbone, prompts, latents, scale, num_steps):
        for s in set(timesteps):
            if t_next <= s < t:
                a_s = S.alpha_bar(ac, torch.full((len(x0),), s, device=x0.device, dtype=torch.long))
                states[s] = S.ddim_jump(x0, eps, a_s)
    return states


@torch.no_grad()
def trajectory_error(sampler, method: str, steps: int, prompts: list[str], seeds: list[int],
                     adapter: str | None = None, eta: float | None = None,
                     guidance: float | None = None, teacher_steps: int = 40) -> dict:
    """RMS distance (latent space) between the method's states after each step and the
    teacher's ODE states at the same timesteps, from the same noise.

    Returns {"method", "steps", "timesteps": [t after step 1, ..., -1 (clean)],
    "rmse": [...], "teacher_rms": [...] (the teacher states' own RMS, for scale),
    "relative": rmse / teacher_rms}.
    """
    from diffusers.utils.torch_utils import randn_tensor

    from hypersd_core.models.sampling import get_recipe, recipe_eta

    backbone = sampler.backbone
    pipe = backbone.pipe
    shape = (len(prompts), pipe.unet.config.in_channels, pipe.unet.config.sample_size,
             pipe.unet.config.sample_size)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    latents = randn_tensor(shape, generator=gens, device=backbone.device,
                           dtype=pipe.unet.dtype)
    recipe = get_recipe(method)
    name = sampler.resolve_adapter(method, steps, adapter)
    sampler.adapters.use(name)
    scheduler = sampler.scheduler(method, steps)
    scheduler.set_timesteps(steps, device=backbone.device)
    ts = [int(t) for t in scheduler.timesteps]
    after = ts[1:] + [S.CLEAN]
    captured: list[torch.Tensor] = []

    def grab(p, i, t, kw):
        captured.append(kw["latents"].detach().float().clone())
        return kw

    old = pipe.scheduler
    pipe.scheduler = scheduler
    kwargs: dict = {}
    e = recipe_eta(recipe, steps) if eta is None else eta
    if e is not None:
        kwargs["eta"] = e
    try:
        pipe(prompt=prompts, num_inference_steps=steps, latents=latents * scheduler.init_noise_sigma,
             guidance_scale=(backbone.guidance_scale if recipe.cfg else 0.0)
             if guidance is None else guidance,
             generator=[torch.Generator().manual_seed(int(s) + 1) for s in seeds],
             output_type="latent", callback_on_step_end=grab, **kwargs)
    finally:
        pipe.scheduler = old
    sampler.adapters.use(None)
    teacher = teacher_ode_states(backbone, prompts, latents, after, num_steps=teacher_steps)
    rmse = [float((c - teacher[s]).square().mean().sqrt()) for c, s in zip(captured, after)]
    scale = [float(teacher[s].square().mean().sqrt()) for s in after]
    return {"method": method, "steps": steps, "timesteps": after, "rmse": rmse,
            "teacher_rms": scale, "relative": [r / max(s, 1e-8) for r, s in zip(rmse, scale)]}
