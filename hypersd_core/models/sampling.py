"""Inference recipes: one table of methods, and ``generate``.

Each recipe is what its authors ship (REFERENCE section 1): the scheduler, its
arguments, whether CFG is used and which adapter goes with it. ``generate`` runs the
stock diffusers pipeline with that recipe, so its output equals a stock pipeline
call with the same weights, scheduler and seed (within 1/255: the adapter is fused into
the UNet's weights by ``AdapterSet`` and the prompt embeddings come from a per-backbone
``PromptCache``, the tensors the pipeline itself would compute).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from hypersd_core.models.adapters import AdapterSet
from hypersd_core.models.backbone import Backbone
from hypersd_core.models.prompt_cache import PromptCache


@dataclass(frozen=True)
class Recipe:
    name: str
    scheduler: str  # diffusers scheduler class name
    scheduler_kwargs: dict = field(default_factory=dict)
    cfg: bool = False
    eta: float | None = None  # passed explicitly: pipelines override the scheduler default
    timesteps: tuple[int, ...] | None = None
    adapter: str | None = None  # default adapter name; "{k}" is filled with the steps
    default_steps: int = 4
    description: str = ""
    # below default_steps: extra scheduler arguments (the teacher's few-step rows use
    # trailing spacing, so its first step starts at t = T-1 and not at t = 1 + offset)
    few_step_kwargs: dict = field(default_factory=dict)
    # eta per step count, measured (README "eta table"); others use ``eta``
    eta_by_steps: tuple[tuple[int, float], ...] = ()


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("teacher", "DDIMScheduler", cfg=True, default_steps=25,
           few_step_kwargs={"timestep_spacing": "trailing"},
           description="base model, DDIM, classifier-free guidance (trailing below 25 steps)"),
    Recipe("lcm", "LCMScheduler", adapter="lcm",
           description="LCM LoRA, LCMScheduler, no CFG"),
    Recipe("tcd", "TCDScheduler", eta=0.3, adapter="tcd",
           description="TCD LoRA, TCDScheduler eta 0.3, no CFG"),
    Recipe("hypersd", "DDIMScheduler", {"timestep_spacing": "trailing"},
           adapter="hypersd-k{k}",
           description="Hyper-SD N-step LoRA (TSCD stage k=N), DDIM trailing, no CFG"),
    # eta per step count: the README eta table (protocol_report, tune seeds, FD vs real);
    # at 1 step eta changes nothing
    Recipe("hypersd-unified", "TCDScheduler", eta=1.0, adapter="hypersd-unified",
           eta_by_steps=((2, 0.0), (4, 0.0), (8, 0.3)),
           description="Hyper-SD unified 1-step LoRA, TCDScheduler, eta 0 at 2-4 steps and "
                       "0.3 at 8 (measured), 1-8 steps"),
    Recipe("hypersd-unet", "LCMScheduler", timesteps=(800,), default_steps=1,
           adapter="hypersd-unet",
           description="Hyper-SD one-step UNet, LCMScheduler timesteps=[800]"),
]}
TSCD_STAGES = (8, 4, 2, 1)


def get_recipe(method: str) -> Recipe:
    if method not in RECIPES:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[method]


def scheduler_kwargs(recipe: Recipe, steps: int | None = None) -> dict:
    """The recipe's scheduler arguments at ``steps`` (few-step ones below default_steps)."""
    few = steps is not None and steps < recipe.default_steps
    return {**recipe.scheduler_kwargs, **(recipe.few_step_kwargs if few else {})}


def recipe_eta(recipe: Recipe, steps: int) -> float | None:
    """The recipe's eta at ``steps``: the measured table's entry for the nearest measured
    step count (the fewer steps on a tie), or the default where there is no table."""
    if not recipe.eta_by_steps:
        return recipe.eta
    return min(recipe.eta_by_steps, key=lambda e: (abs(e[0] - steps), e[0]))[1]


def make_scheduler(backbone: Backbone, method: str, steps: int | None = None):
    """The recipe's scheduler built from the base model's scheduler config."""
    import diffusers

    recipe = get_recipe(method)
    cls = getattr(diffusers, recipe.scheduler)
    return cls.from_config(backbone.pipe.scheduler.config, **scheduler_kwargs(recipe, steps))


def default_adapter(method: str, steps: int) -> str | None:
    """The adapter a method uses by default: Hyper-SD N-step uses TSCD stage k = N
    (the smallest trained k >= N, so 3 steps uses k=4)."""
    recipe = get_recipe(method)
    if recipe.adapter is None:
        return None
    if "{k}" in recipe.adapter:
        k = min((k for k in TSCD_STAGES if k >= steps), default=max(TSCD_STAGES))
        return recipe.adapter.format(k=k)
    return recipe.adapter


@dataclass
class Generation:
    images: list[Image.Image]
    seconds_per_image: list[float]
    method: str
    steps: int
    adapter: str | None
    switch_seconds: float = 0.0


class Sampler:
    """One base model in memory; methods switch schedulers and adapters without reloading."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        # on a GPU the kept base weights go to host memory: the UNet is not held twice there
        self.adapters = AdapterSet(backbone.pipe, "cpu" if str(backbone.device).startswith("cuda") else None)
        self.prompts = PromptCache(backbone.pipe)  # embeddings per text, reused across calls
        self._schedulers: dict[str, object] = {}
        self.base_scheduler = backbone.pipe.scheduler
        self.controlnet = None  # set_controlnet(): control images go through the stock
        self._control_pipe = None  # ControlNet pipeline over the same modules
        self._unets: dict[str, object] = {}  # full UNets (the one-step UNet), by source

    def set_controlnet(self, controlnet) -> None:
        """Use ``controlnet`` (a ControlNetModel, or None) for calls with a control image."""
        from hypersd_core.models.controlnet import control_pipeline

        self._control_pipe = None if controlnet is None else control_pipeline(
            self.backbone.pipe, controlnet)
        self.controlnet = controlnet

    def full_unet(self, method: str, adapter: str | None):
        """(UNet, name) replacing the base UNet for this call, or None: the one-step UNet
        of "hypersd-unet" (a UNet folder/file given as adapter, else the digits model's own)."""
        from pathlib import Path

        from hypersd_core.models.unet import DIGITS_ONESTEP_UNET, is_unet_source, load_unet
        from hypersd_core.paths import DIGITS_PIPELINE

        if method != "hypersd-unet":
            return None
        if adapter is None:
            own = Path(self.backbone.source).resolve() == DIGITS_PIPELINE.resolve()
            if not (own and is_unet_source(DIGITS_ONESTEP_UNET)):
                return None
            adapter = str(DIGITS_ONESTEP_UNET)
        elif not is_unet_source(adapter):
            return None  # a LoRA file: the adapter path handles it
        if adapter not in self._unets:
            self._unets[adapter] = load_unet(adapter, self.backbone.unet)
        return self._unets[adapter], Path(adapter).name

    def scheduler(self, method: str, steps: int | None = None):
        key = (method, tuple(sorted(scheduler_kwargs(get_recipe(method), steps).items())))
        if key not in self._schedulers:
            self._schedulers[key] = make_scheduler(self.backbone, method, steps)
        return self._schedulers[key]

    def resolve_adapter(self, method: str, steps: int, adapter: str | None) -> str | None:
        """Load the adapter a call needs (a name known to the backbone or a file path)."""
        if adapter is None:
            adapter = default_adapter(method, steps)
            if adapter is None:
                return None
            if adapter not in self.backbone.adapter_dirs and adapter not in self.adapters.loaded:
                if method == "hypersd-unet":
                    return None  # the one-step UNet is a full model: base weights if absent
                from hypersd_core.models import official

                if official.official_file(self.backbone.kind, adapter) is not None:
                    # SD1.5 / SDXL: the published Hyper-SD / LCM / TCD file (one line offline)
                    self.adapters.load(adapter, official.fetch(self.backbone.kind, adapter))
                    return adapter
                raise FileNotFoundError(
                    f"method {method!r} needs the adapter {adapter!r}, which this model "
                    f"({self.backbone.source}) does not have; train it or pass --lora FILE")
        if adapter in self.adapters.loaded:
            return adapter
        if adapter in self.backbone.adapter_dirs:
            self.adapters.load(adapter, self.backbone.adapter_dirs[adapter])
            return adapter
        from pathlib import Path

        from hypersd_core.models.lora import WEIGHT_NAME

        path = Path(adapter)
        file = path / WEIGHT_NAME if path.is_dir() else path
        # diffusers names every file pytorch_lora_weights: such files go by their folder
        name = file.parent.name if file.name == WEIGHT_NAME else file.stem
        known = self.adapters.loaded.get(name)
        if known is not None and known.resolve() != file.resolve():
            name = str(file.resolve())  # another file of the same name: its full path
        self.adapters.load(name, path)
        return name

    @torch.no_grad()
    def generate(self, method: str, steps: int, prompts: list[str], seeds: list[int],
                 adapter: str | None = None, guidance: float | None = None,
                 eta: float | None = None, batch_size: int | None = None,
                 control_image=None, controlnet_conditioning_scale: float = 1.0) -> Generation:
        """Images for prompts[i] with torch.Generator().manual_seed(seeds[i]).

        Args:
            method: a key of RECIPES.
            steps: number of sampling steps (>= 1; "hypersd-unet" uses its timesteps).
            prompts, seeds: one seed per prompt (same length).
            adapter: adapter name or LoRA file; default: the method's own.
            guidance: CFG scale (default: the model's for the teacher, 0 otherwise).
            eta: stochasticity of TCD (default: the recipe's).
            batch_size: images per pipeline call (default: all at once).
            control_image: a PIL image for every prompt, or a list (one per prompt); the
                call then runs the stock ControlNet pipeline (set_controlnet first).
            controlnet_conditioning_scale: the ControlNet residuals' scale.
        Returns:
            Generation with PIL images and seconds per image (batch time / batch size).
        """
        recipe = get_recipe(method)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            raise ValueError("no prompts given")
        full = self.full_unet(method, adapter)
        name = self.resolve_adapter(method, steps, adapter) if full is None else full[1]
        switch = self.adapters.use(None if full is not None else name)
        pipe = self.backbone.pipe
        controls = None
        if control_image is not None:
            if self._control_pipe is None:
                raise ValueError("a control image needs a ControlNet: call set_controlnet() "
                                 "(app/CLI: --controlnet digits, a folder or a hub id)")
            controls = control_image if isinstance(control_image, (list, tuple)) \
                else [control_image] * len(prompts)
            if len(controls) != len(prompts):
                raise ValueError(f"got {len(controls)} control images for {len(prompts)} prompts")
            pipe = self._control_pipe
        base_unet = pipe.unet
        if full is not None:
            pipe.unet = full[0]
        pipe.scheduler = self.scheduler(method, steps)
        if guidance is None:
            guidance = self.backbone.guidance_scale if recipe.cfg else 0.0
        kwargs: dict = {"guidance_scale": guidance, "output_type": "pil"}
        if recipe.timesteps is not None:
            kwargs["timesteps"] = list(recipe.timesteps)
        else:
            kwargs["num_inference_steps"] = steps
        eta = recipe_eta(recipe, steps) if eta is None else eta
        if eta is not None:
            kwargs["eta"] = eta
        batch_size = batch_size or len(prompts)
        images: list[Image.Image] = []
        seconds: list[float] = []
        try:
            for i in range(0, len(prompts), batch_size):
                chunk = prompts[i:i + batch_size]
                gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
                if controls is not None:
                    kwargs["image"] = list(controls[i:i + batch_size])
                    kwargs["controlnet_conditioning_scale"] = controlnet_conditioning_scale
                t0 = time.perf_counter()
                out = pipe(**self.prompts.pipeline_kwargs(chunk, guidance > 1),
                           generator=gens, **kwargs)
                dt = time.perf_counter() - t0
                images += out.images
                seconds += [dt / len(chunk)] * len(chunk)
        finally:
            pipe.scheduler = self.base_scheduler
            pipe.unet = base_unet
        return Generation(images, seconds, method, steps, name, switch)


def generate(backbone: Backbone, method: str, steps: int, prompts: list[str],
             seeds: list[int], adapter: str | None = None, guidance: float | None = None,
             eta: float | None = None, control_image=None,
             controlnet_conditioning_scale: float = 1.0) -> Generation:
    """One-shot ``Sampler(backbone).generate(...)`` (keeps a Sampler on the backbone)."""
    sampler = getattr(backbone, "_sampler", None)
    if sampler is None:
        sampler = Sampler(backbone)
        backbone._sampler = sampler
    return sampler.generate(method, steps, prompts, seeds, adapter=adapter,
                            guidance=guidance, eta=eta, control_image=control_image,
                            controlnet_conditioning_scale=controlnet_conditioning_scale)
