"""Human-feedback learning (Hyper-SD section 3.2): a separate LoRA on top of the TSCD
k=1 model, trained with

* the reward loss, ReFL style (Xu et al. 2023, ImageReward paper, Algorithm 1): sample
  without gradients to a late step, take the last step with gradients, decode x0'
  through the VAE with gradients and apply ``mean(relu(alpha - r(x0', c)))`` per reward
  (Hyper-SD eq. 13);
* the perceptual loss (Hyper-SD eq. 14, after UniFL): noise a real image to t, denoise
  it to x0' in one step, and score x0' with an instance-segmentation loss against the
  image's ground truth.

Then the feedback LoRA is merged with the TSCD adapter (``merge_scale``), as the paper
does. The top half is pure tensor functions; ``FeedbackLosses`` (shared with the DMD
stage) and ``FeedbackStage`` wire them to the models. Every loss is per sample, [B].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hypersd_core.distill import schedule as S

TSCD_ADAPTER = "tscd"  # the frozen TSCD k=1 adapter under the feedback LoRA
FEEDBACK_ONLY = "feedback_lora"  # run subfolder: the feedback LoRA before the merge


def reward_hinge(reward: torch.Tensor, alpha: float) -> torch.Tensor:
    """Hyper-SD eq. 13 / ReFL: relu(alpha - r), per sample. [B] -> [B]"""
    return torch.relu(alpha - reward)


def weighted_reward_loss(rewards: dict[str, torch.Tensor], weights: dict[str, float],
                         alpha: float, alphas: dict[str, float] | None = None) -> torch.Tensor:
    """sum_i w_i relu(alpha_i - r_i): the feedback objective over several rewards, with
    alpha_i from ``alphas`` or the shared ``alpha`` (reward scales differ). [B]"""
    if not rewards:
        raise ValueError("no rewards given")
    alphas = alphas or {}
    return sum(weights[name] * reward_hinge(r.float(), alphas.get(name, alpha))
               for name, r in rewards.items())


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """DDIM "trailing" timesteps of an N-step sampler (N=4: 999, 749, 499, 249). [N] long"""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    return torch.from_numpy(t.astype(np.int64))


def latents_to_unit(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> images in [0, 1] as the reward protocol takes them."""
    return ((decoded.float() + 1) / 2).clamp(0, 1)


def split_nonfinite(images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images with non-finite samples set to 0, [B] mask of those samples).

    A decode that overflowed (NaN/inf) must make a non-finite loss, which the trainer
    counts and skips, not an error inside a reward model.
    """
    bad = ~torch.isfinite(images01).flatten(1).all(1)
    clean = torch.where(bad.view(-1, *[1] * (images01.dim() - 1)),
                        torch.zeros_like(images01), images01)
    return clean, bad


def lora_file_rank(path: str | Path) -> int:
    """Rank of a LoRA file (its lora_A / lora.down rows)."""
    from safetensors import safe_open

    from hypersd_core.models.lora import check_lora_file

    with safe_open(str(check_lora_file(path)), "pt") as f:
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys()
                 if ".lora_A." in k or ".lora.down." in k}
    if len(ranks) != 1:
        raise ValueError(f"{path}: expected one LoRA rank, found {sorted(ranks)}")
    return ranks.pop()


def pad_lora_rank(path: str | Path, rank: int | None = None) -> int:
    """Zero-pad every layer of a LoRA file to one rank (the largest, or ``rank``).

    An SVD merge keeps at most min(out, in) components of a small layer; zero rows
    and columns change no output and let single-rank loaders (PEFT) take the file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from hypersd_core.models.lora import check_lora_file

    path = check_lora_file(path)
    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    rank = rank or max(v.shape[0] for k, v in state.items() if ".lora_A." in k)
    for key in [k for k in state if ".lora_A." in k]:
        down, up_key = state[key], key.replace(".lora_A.", ".lora_B.")
        r = down.shape[0]
        if r < rank:
            state[key] = torch.cat([down, down.new_zeros(rank - r, *down.shape[1:])])
            up = state[up_key]
            state[up_key] = torch.cat([up, up.new_zeros(up.shape[0], rank - r, *up.shape[2:])], 1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return rank


def perceptual_x0(model_x0, batch, t_range: tuple[int, int], alphas_cumprod: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """UniFL / Hyper-SD eq. 14: a real image's latents noised to t ~ U[t_range], denoised
    to x0' in one step by ``model_x0(x_t, t, embeds)``. [B,4,h,w]"""
    x0 = batch.latents
    t = torch.randint(t_range[0], t_range[1] + 1, (x0.shape[0],), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = S.add_noise(x0, noise, S.alpha_bar(alphas_cumprod, t))
    return model_x0(x_t, t, batch.embeds)


class FeedbackLosses:
    """The reward models and the perception model of a stage, and their losses."""

    def __init__(self, cfg, backbone):
        from hypersd_core.rewards import load_reward

        self.cfg = cfg
        self.backbone = backbone
        device = backbone.device
        self.rewards = {name: load_reward(name, device=device)
                        for name, w in cfg.rewards.items() if w > 0}
        self.perception = None
        if cfg.perceptual_weight > 0:
            if cfg.perceptual_backend == "digits":
                self.perception = load_reward("digits-perception", device=device)
            else:
                self.perception = load_reward("perception", device=device,
                                              backend=cfg.perceptual_backend)

    def decode(self, x0_latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B,3,H,W] in [0,1], differentiable through the VAE."""
        return latents_to_unit(self.backbone.decode_latents(x0_latents))

    def reward_loss(self, images01: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        """Weighted hinge loss of the rewards on decoded images. ([B], logs)"""
        images01, bad = split_nonfinite(images01)
        scores = {name: r.score(images01, prompts) for name, r in self.rewards.items()}
        loss = weighted_reward_loss(scores, self.cfg.rewards, self.cfg.reward_alpha,
                                    self.cfg.reward_alphas)
        loss = torch.where(bad, torch.full_like(loss, float("nan")), loss)
        logs = {f"train_reward/{n}": s.mean().item() for n, s in scores.items()}
        logs["loss_reward"] = loss.mean().item()
        return loss, logs

    def perceptual_loss(self, images01: torch.Tensor, batch) -> tuple[torch.Tensor, dict]:
        """Instance-segmentation loss of denoised real images vs their ground truth. ([B], logs)"""
        if batch.masks is None or batch.labels is None:
            raise ValueError("perceptual_weight > 0 needs ground-truth masks and labels in the "
                             "data (the digits world has them; an image folder does not): set "
                             "perceptual_weight=0")
        images01, bad = split_nonfinite(images01)
        if self.cfg.perceptual_backend == "digits":
            loss = self.perception.loss_tensors(images01, batch.masks, batch.labels)
        else:
            from hypersd_core.rewards.perception import mask_to_target

            targets = [mask_to_target(m, int(lab) + 1) for m, lab in zip(batch.masks, batch.labels)]
            loss = self.perception.loss(images01, targets)
        loss = torch.where(bad, torch.full_like(loss, float("nan")), loss)
        return loss, {"loss_perceptual": loss.mean().item()}


class FeedbackStage:
    """Reward + perceptual feedback on a new LoRA ("student") over the frozen TSCD adapter.

    ``cfg.init_adapter`` is the TSCD k=1 adapter: loaded as a separate frozen adapter
    (``setup``), never into the trained LoRA. ``finalize`` merges the two.
    """

    def __init__(self, cfg, backbone):
        from hypersd_core.rewards.reward_log import SampleScorer, sample_reward_names

        if cfg.init_adapter and not Path(cfg.init_adapter).exists():
            raise FileNotFoundError(f"init_adapter (the TSCD k=1 adapter) not found: {cfg.init_adapter}")
        self.cfg = cfg
        self.backbone = backbone
        self.unet = backbone.unet
        self.ac = backbone.alphas_cumprod.to(backbone.device).float()
        self.T = backbone.num_train_timesteps
        self.pred_type = backbone.prediction_type
        self.losses = FeedbackLosses(cfg, backbone)
        self.scorer = SampleScorer(sample_reward_names(cfg, backbone.kind), backbone.device,
                                   self.losses.rewards)
        self.frozen: list[torch.nn.Parameter] = []

    def setup(self, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """Load the TSCD adapter frozen beside the student; both stay active."""
        from hypersd_core.models.lora import add_lora, load_lora_into

        if self.cfg.init_adapter:
            rank = lora_file_rank(self.cfg.init_adapter)
            self.frozen = add_lora(self.unet, rank, float(rank), adapter_name=TSCD_ADAPTER)
            load_lora_into(self.unet, self.cfg.init_adapter, TSCD_ADAPTER)
            self.unet.set_adapters([TSCD_ADAPTER, "student"], [1.0, 1.0])
        self._freeze()
        return params

    def _freeze(self) -> None:
        # PEFT re-enables requires_grad on every active adapter whenever adapters switch
        for p in self.frozen:
            p.requires_grad_(False)
            p.grad = None

    def _x0(self, x_t: torch.Tensor, t: torch.Tensor, embeds) -> torch.Tensor:
        out = self.unet(x_t, t, **embeds.unet_kwargs()).sample
        return S.predictions(out, x_t, S.alpha_bar(self.ac, t), self.pred_type)[0]

    def refl_x0(self, batch, generator: torch.Generator) -> torch.Tensor:
        """ReFL: N ~ U{lo..hi} trailing DDIM steps from noise, all but the last without
        gradients; x0' of the last step keeps its graph. [B,4,h,w]"""
        lo, hi = self.cfg.feedback_steps_range
        n = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        ts = trailing_timesteps(n, self.T).to(batch.latents.device)
        x = torch.randn(batch.latents.shape, generator=generator).to(batch.latents.device)
        b = x.shape[0]
        with torch.no_grad():
            for i in range(n - 1):
                t = ts[i].expand(b)
                out = self.unet(x, t, **batch.embeds.unet_kwargs()).sample
                x0, eps = S.predictions(out, x, S.alpha_bar(self.ac, t), self.pred_type)
                x = S.ddim_jump(x0, eps, S.alpha_bar(self.ac, ts[i + 1].expand(b)))
        return self._x0(x, ts[-1].expand(b), batch.embeds)

    def perceptual_x0(self, batch, generator: torch.Generator) -> torch.Tensor:
        return perceptual_x0(self._x0, batch, self.cfg.perceptual_t_range, self.ac, generator)

    def loss(self, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Per-sample feedback loss [B]: rewards on ReFL samples + weighted perceptual loss."""
        self._freeze()
        b = batch.latents.shape[0]
        loss = torch.zeros(b, device=batch.latents.device)
        logs: dict[str, float] = {}
        if self.losses.rewards:
            images = self.losses.decode(self.refl_x0(batch, generator))
            r_loss, r_logs = self.losses.reward_loss(images, batch.prompts)
            loss = loss + r_loss
            logs.update(r_logs)
        if self.losses.perception is not None:
            images = self.losses.decode(self.perceptual_x0(batch, generator))
            p_loss, p_logs = self.losses.perceptual_loss(images, batch)
            loss = loss + self.cfg.perceptual_weight * p_loss
            logs.update(p_logs)
        return loss, logs

    def score_samples(self, images, prompts: list[str]) -> dict[str, float]:
        return self.scorer(images, prompts)

    def finalize(self, run) -> None:
        """final/ = TSCD adapter + merge_scale * feedback LoRA, one diffusers-format LoRA;
        the feedback LoRA alone stays in ``feedback_lora/``."""
        import shutil

        from hypersd_core.models.lora import WEIGHT_NAME, merge_lora_files

        only = run.dir / FEEDBACK_ONLY
        shutil.rmtree(only, ignore_errors=True)
        shutil.copytree(run.final_dir, only)
        if not self.cfg.init_adapter:
            if self.cfg.merge_scale != 1.0:
                pad_lora_rank(merge_lora_files([only / WEIGHT_NAME], [self.cfg.merge_scale],
                                               run.final_dir))
            return
        pad_lora_rank(merge_lora_files([self.cfg.init_adapter, only / WEIGHT_NAME],
                                       [1.0, self.cfg.merge_scale], run.final_dir))
