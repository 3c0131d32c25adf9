"""What the app needs from the library, with no UI in it: settings, one model in memory,
generation cells that report errors instead of raising, reward scoring and the
teacher reference cache and the compare grid. The lists of files and rewards the UI
may offer are in ``choices.py``, the ZeroGPU helpers in ``zerogpu.py``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from hypersd_core.app.zerogpu import on_space
from hypersd_core.paths import ROOT
from hypersd_core.study.store import STUDY_YAML

COMPARE_METHODS = ("teacher", "lcm", "tcd", "hypersd", "hypersd-unified")
COMPARE_STEPS = (1, 2, 4, 8)
TEACHER_REFERENCE_STEPS = 25
NEEDS_TARGETS = ("perception", "digits-perception")  # losses against ground truth: not for generated images
ONE_STEP_ONLY = ("hypersd-unet",)  # rows shown at 1 step only in the grid
REFERENCE_CACHE = 64  # teacher references kept per model service (prompt, seed)
RESIDENT_ADAPTER = "hypersd-unified"  # fused at preload: the 1-step adapter most calls use


@dataclass
class AppSettings:
    """Where things are and what the app may do; filled from CLI flags and env vars."""

    model: str = "digits"
    runs_dir: Path = ROOT / "runs"
    study_db: Path = ROOT / "study" / "votes.db"
    study_config: Path = STUDY_YAML
    lora_dir: Path = ROOT / "models" / "loras"
    models_dir: Path = ROOT / "models"
    data_dir: Path = ROOT / "data"
    public: bool = False
    host: str = "127.0.0.1"
    port: int = 7860
    max_file_size: str = "10mb"
    queue_size: int = 32
    queue_per_client: int = 4  # waiting calls one client (address) may hold in the queue
    trusted_proxies: int = 0  # proxies whose X-Forwarded-For entry is trusted (access.py)
    owner_token: str = field(default="", repr=False)  # the study owner's token (results, export)
    extra_models: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls, **overrides) -> AppSettings:
        """Settings from HYPERSD_* / GRADIO_SERVER_* env vars, then explicit overrides."""
        env = os.environ
        s = cls(
            model=env.get("HYPERSD_MODEL", "digits"),
            runs_dir=Path(env.get("HYPERSD_RUNS_DIR", ROOT / "runs")),
            study_db=Path(env.get("HYPERSD_STUDY_DB", ROOT / "study" / "votes.db")),
            study_config=Path(env.get("HYPERSD_STUDY_CONFIG", STUDY_YAML)),
            lora_dir=Path(env.get("HYPERSD_LORA_DIR", ROOT / "models" / "loras")),
            models_dir=Path(env.get("HYPERSD_MODELS_DIR", ROOT / "models")),
            data_dir=Path(env.get("HYPERSD_DATA_DIR", ROOT / "data")),
            public=on_space() or env.get("HYPERSD_PUBLIC", "") in ("1", "true", "yes"),
            host=env.get("GRADIO_SERVER_NAME", "0.0.0.0" if on_space() else "127.0.0.1"),
            port=int(env.get("GRADIO_SERVER_PORT", "7860")),
            trusted_proxies=_int_env("HYPERSD_TRUSTED_PROXIES", 1 if on_space() else 0),
            queue_per_client=_int_env("HYPERSD_QUEUE_PER_CLIENT", 4, low=1),
            owner_token=env.get("HYPERSD_STUDY_OWNER_TOKEN", ""),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        s.public = s.public or on_space()
        for key in ("runs_dir", "study_db", "study_config", "lora_dir", "models_dir", "data_dir"):
            setattr(s, key, Path(getattr(s, key)).resolve())
        return s

    @property
    def training_disabled_reason(self) -> str:
        """Why training controls are off ('' when they are on)."""
        if on_space():
            return ("Training is off on a Space (GPU time there is too short for a stage): "
                    "this tab shows finished runs. Run `python app.py` on your machine to train.")
        if self.public:
            return ("Training is off because the app was started with --public: anyone could "
                    "start processes. Restart without --public to train.")
        return ""


def _int_env(name: str, default: int, low: int = 0) -> int:
    """An integer env var, with one clear error when it is not one."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer >= {low}, got {raw!r}") from None
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")
    return value


# ------------------------------------------------------------------- generation
@dataclass
class Cell:
    """One generated image of a grid, or the reason it is missing."""

    method: str
    steps: int
    prompt: str
    seed: int
    image: Image.Image | None = None
    seconds: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)
    error: str = ""
    label: str = ""

    @property
    def caption(self) -> str:
        name = self.label or self.method
        steps = f"{self.steps} step" + ("s" if self.steps != 1 else "")
        if self.error:
            return f"{name} · {steps} · {self.error}"
        scores = " ".join(f"{k.removeprefix('digits-')} {v:.2f}" for k, v in self.scores.items())
        return f"{name} · {steps} · {self.seconds:.2f} s" + (f" · {scores}" if scores else "")


def clean_image(image: Image.Image) -> Image.Image:
    """A copy with no metadata (blind votes must not leak anything through PNG chunks)."""
    out = Image.new(image.mode, image.size)
    out.paste(image)
    return out


class ModelService:
    """One base model in memory (loaded on first use), used by one call at a time."""

    def __init__(self, model: str, device: str | None = None, controlnet: str = "digits"):
        self.model = model
        self.device = device or ("cuda" if _cuda() else "cpu")
        self.controlnet = controlnet  # loaded on the first call with a control image
        self._sampler = None
        self._lock = threading.RLock()
        self._rewards: dict[str, object] = {}
        self._references: OrderedDict[tuple[str, int], Cell] = OrderedDict()
        self.load_seconds = 0.0
        # half precision on a GPU (a ZeroGPU slice gets the weights resident, not fp32)
        self.dtype = "fp16" if str(self.device).startswith("cuda") else "fp32"

    @property
    def sampler(self):
        """The Sampler, loading the model on first use (ModelNotFoundError if it is missing)."""
        with self._lock:
            if self._sampler is None:
                import torch

                from hypersd_core.models.backbone import load_backbone
                from hypersd_core.models.sampling import Sampler

                t0 = time.perf_counter()
                dtype = torch.float16 if self.dtype == "fp16" else torch.float32
                self._sampler = Sampler(load_backbone(self.model, device=self.device, dtype=dtype))
                self.load_seconds = time.perf_counter() - t0
            return self._sampler

    @property
    def kind(self) -> str:
        """The model's kind ("digits", "sd15", "sdxl"); before loading, a guess that errs
        large (sdxl) so a GPU duration is never too short."""
        if self._sampler is not None:
            return self._sampler.backbone.kind
        return "digits" if self.model == "digits" else "sdxl"

    def preload(self, rewards: list[str] | tuple[str, ...] = (),
                resident: str | None = RESIDENT_ADAPTER) -> dict[str, str]:
        """Load the model, every adapter shipped with it and the named rewards now, in
        this process: on ZeroGPU the GPU worker is forked from the main process per
        call, so whatever is loaded lazily inside a call is loaded again on every call.
        ``resident`` (the unified 1-step LoRA; an SD1.5 / SDXL model fetches the official
        file) is fused here too, so calls with it start fused and switch nothing.
        Returns what could not load (rewards, the resident adapter), with the reason."""
        failed: dict[str, str] = {}
        with self._lock:
            sampler = self.sampler
            for name, path in sampler.backbone.adapter_dirs.items():
                if name not in sampler.adapters.loaded:
                    sampler.adapters.load(name, path)
            if resident is not None:
                try:
                    if sampler.resolve_adapter(resident, 1, None) is not None:
                        sampler.adapters.use(resident)
                except Exception as err:  # offline without the file: the calls say so
                    failed[resident] = f"{type(err).__name__}: {err}"
            for name in rewards:
                try:
                    self.reward(name)
                except Exception as err:  # a missing reward must not stop the app
                    failed[name] = f"{type(err).__name__}: {err}"
        return failed

    def method_available(self, method: str, steps: int) -> bool:
        """True when the method's adapter exists for this model (or it needs none)."""
        name = default_adapter_name(method, steps)
        if name is None or method == "hypersd-unet":
            return True
        sampler = self.sampler
        if name in sampler.backbone.adapter_dirs or name in sampler.adapters.loaded:
            return True
        from hypersd_core.models import official

        return official.available(sampler.backbone.kind, name)  # fetched on first use

    def has_onestep_unet(self) -> bool:
        """True when "hypersd-unet" has a full one-step UNet for this model."""
        with self._lock:
            return self.sampler.full_unet("hypersd-unet", None) is not None

    def ensure_controlnet(self) -> None:
        """Load ``self.controlnet`` into the sampler (once); raises if it is missing."""
        with self._lock:
            if self.sampler.controlnet is None:
                from hypersd_core.models.controlnet import load_controlnet

                self.sampler.set_controlnet(load_controlnet(self.controlnet, device=self.device))

    def generate(self, method: str, steps: int, prompts: list[str], seeds: list[int],
                 adapter: str | None = None, label: str = "", control_image=None,
                 control_scale: float = 1.0) -> list[Cell]:
        """One cell per prompt; a missing adapter or a failed call fills ``error``.
        With ``control_image`` (a PIL image) the call runs under the ControlNet."""
        cells = [Cell(method, steps, p, s, label=label) for p, s in zip(prompts, seeds)]
        try:
            with self._lock:
                if control_image is not None:
                    self.ensure_controlnet()
                gen = self.sampler.generate(method, steps, prompts, seeds, adapter=adapter,
                                            control_image=control_image,
                                            controlnet_conditioning_scale=control_scale)
        except Exception as err:  # one failed cell must not break a grid
            msg = str(err).strip("'\"") or type(err).__name__
            if "needs the adapter" in msg:
                msg = f"not available: adapter {default_adapter_name(method, steps)!r} missing"
            for c in cells:
                c.error = msg
            return cells
        for c, image, sec in zip(cells, gen.images, gen.seconds_per_image):
            c.image, c.seconds = clean_image(image), sec
        return cells

    def reference(self, prompts: list[str], seeds: list[int]) -> list[Cell]:
        """The teacher at TEACHER_REFERENCE_STEPS for each (prompt, seed), generated once
        and then served from a bounded cache (it is deterministic: same weights, seed)."""
        with self._lock:
            todo = list(dict.fromkeys((p, s) for p, s in zip(prompts, seeds)
                                      if (p, s) not in self._references))
            if todo:
                made = self.generate("teacher", TEACHER_REFERENCE_STEPS, [p for p, _ in todo],
                                     [s for _, s in todo], label="teacher (reference)")
                for key, cell in zip(todo, made):
                    if not cell.error:  # failures are not remembered
                        self._references[key] = cell
                    else:
                        return [replace(cell, prompt=p, seed=s, scores={})
                                for p, s in zip(prompts, seeds)]
            out = []
            for key in zip(prompts, seeds):
                self._references.move_to_end(key)
                out.append(replace(self._references[key], scores={}))
            while len(self._references) > REFERENCE_CACHE:
                self._references.popitem(last=False)
            return out

    # ---- rewards
    def reward(self, name: str):
        """A loaded reward (cached). A reward whose weights are not on disk is not loaded
        (no download attempts): RewardWeightsMissing says which files it needs."""
        with self._lock:
            if name not in self._rewards:
                from hypersd_core.rewards import RewardWeightsMissing, load_reward
                from hypersd_core.rewards.availability import availability

                found = availability(name)
                if not found.ok:
                    raise RewardWeightsMissing(found.note)
                self._rewards[name] = load_reward(name, device=self.device, **found.kwargs)
            return self._rewards[name]

    def score(self, images: list[Image.Image], prompts: list[str],
              names: list[str]) -> tuple[dict[str, list[float]], dict[str, str]]:
        """Scores per reward name, and the reason for each reward that could not score."""
        import torch

        scores: dict[str, list[float]] = {}
        errors: dict[str, str] = {}
        for name in names:
            if name in NEEDS_TARGETS:
                errors[name] = "needs ground-truth masks (used in training, not for new images)"
                continue
            try:
                with self._lock, torch.no_grad():
                    values = self.reward(name).score(images, prompts)
                scores[name] = [float(v) for v in values.detach().cpu()]
            except Exception as err:  # a reward's failure must not break the page: one line
                text = " ".join(f"{type(err).__name__}: {err}".split())
                errors[name] = text if len(text) <= 300 else text[:297] + "..."
        return scores, errors

    def score_cells(self, cells: list[Cell], names: list[str]) -> dict[str, str]:
        """Fill ``cell.scores`` for cells with images; return the rewards' errors."""
        ok = [c for c in cells if c.image is not None]
        if not ok or not names:
            return {}
        scores, errors = self.score([c.image for c in ok], [c.prompt for c in ok], names)
        for name, values in scores.items():
            for c, v in zip(ok, values):
                c.scores[name] = v
        return errors


def default_adapter_name(method: str, steps: int) -> str | None:
    from hypersd_core.models.sampling import default_adapter

    return default_adapter(method, steps)


def compare_grid(service: ModelService, prompts: list[str], seeds: list[int],
                 methods: list[tuple[str, str | None, str]], steps: tuple[int, ...] = COMPARE_STEPS,
                 rewards: list[str] | None = None, teacher_reference: bool = True,
                 control_image=None, control_scale: float = 1.0,
                 ) -> tuple[list[Cell], dict[str, str], float]:
    """Every (method, steps) cell for the prompts, plus the teacher at 25 steps.

    One pipeline call per (row, steps) covers all prompts (the cells sharing an adapter
    and step count), the calls run grouped by adapter so each adapter is fused once,
    repeated (prompt, seed) pairs are generated once, prompt embeddings come from the
    sampler's cache, and the teacher reference from ``service.reference``. A cell's image
    is the one ``service.generate`` gives for the same (method, steps, prompt, seed)
    alone: identical for a one-prompt grid; with several prompts the batched call can
    differ from a lone call in the last bit of a few pixels (<= 1/255), as any batched
    diffusers call does on the CPU.

    Args:
        methods: (recipe name, adapter file or None, row label) per row.
        control_image, control_scale: every cell (reference too) under the ControlNet.
    Returns:
        cells (reference first, then row by row), reward errors, total seconds.
    """
    t0 = time.perf_counter()
    control = {"control_image": control_image, "control_scale": control_scale}
    pairs = list(dict.fromkeys(zip(prompts, seeds)))  # each (prompt, seed) once
    uniq_prompts, uniq_seeds = [p for p, _ in pairs], [s for _, s in pairs]
    cells: list[Cell] = []
    if teacher_reference and control_image is None:
        cells += service.reference(prompts, seeds)
    elif teacher_reference:  # the cache holds uncontrolled references only
        cells += service.generate("teacher", TEACHER_REFERENCE_STEPS, prompts, seeds,
                                  label="teacher (reference)", **control)
    jobs = [(i, method, adapter, label, n) for i, (method, adapter, label) in enumerate(methods)
            for n in steps]

    def adapter_key(job) -> str:
        _, method, adapter, _, n = job
        return adapter or default_adapter_name(method, n) or ""

    made: dict[tuple, dict[tuple[str, int], Cell]] = {}
    for job in sorted(jobs, key=adapter_key):  # stable: row order within an adapter
        _, method, adapter, label, n = job
        if method in ONE_STEP_ONLY and n != 1:  # timesteps=[800]: every count is 1 step
            out = [Cell(method, n, p, s, label=label, error="one-step model: 1 step only")
                   for p, s in zip(uniq_prompts, uniq_seeds)]
        else:
            out = service.generate(method, n, uniq_prompts, uniq_seeds, adapter=adapter,
                                   label=label, **control)
        made[job] = {(c.prompt, c.seed): c for c in out}
    for job in jobs:
        cells += [replace(made[job][key], scores={}) for key in zip(prompts, seeds)]
    errors = service.score_cells(cells, rewards or [])
    return cells, errors, time.perf_counter() - t0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
