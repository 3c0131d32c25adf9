"""LoRA adapters on the UNet: add (PEFT, explicit rank and alpha), save in diffusers
format, export kohya format, load either format, switch named adapters on one base
model, and fuse with a scale.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

# PCM's target list (REFERENCE section 4): attention, feed-forward, resnet convs and time proj.
TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
    "time_emb_proj",
]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet, rank: int, alpha: float, adapter_name: str = "default",
             target_modules: list[str] | None = None) -> list[torch.nn.Parameter]:
    """Add a trainable LoRA (fp32 weights) to ``unet``; return its parameters.

    alpha is always explicit: PEFT's default (8) silently scales rank-64 LoRAs by 1/8.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                        target_modules=target_modules or TARGET_MODULES)
    unet.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(unet, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT state dict of one adapter (keys without the adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=adapter_name)


def save_lora(unet, out_dir: str | Path, adapter_name: str = "default",
              dtype: torch.dtype = torch.float32) -> Path:
    """Save one adapter in diffusers format, loadable by stock ``pipe.load_lora_weights``."""
    from diffusers import StableDiffusionPipeline
    # Bake alpha / r into lora_B so that every loader (diffusers, kohya tools) that
    # assumes alpha = r reproduces the trained adapter exactly.
    config = unet.peft_config[adapter_name]
    scale = config.lora_alpha / config.r
    state = {k: v * scale if "lora_B" in k else v
             for k, v in lora_state_dict(unet, adapter_name).items()}
    # PEFT key names throughout: diffusers' loader drops the attention layers of a file
    # that mixes PEFT names with convert_state_dict_to_diffusers' "lora.down" names.
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=state,
                                              safe_serialization=True)
    return out_dir / WEIGHT_NAME


def export_kohya(lora_file: str | Path, out_file: str | Path) -> Path:
    """Convert a diffusers-format LoRA file to kohya keys (ComfyUI / A1111)."""
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
    from safetensors.torch import load_file, save_file

    state = load_file(str(check_lora_file(lora_file)))
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet:
        raise ValueError(f"{lora_file} holds no UNet LoRA keys in diffusers format "
                         "(expected 'unet.*'; a kohya file needs no export)")
    try:
        peft_state = {f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(unet).items()}
        kohya = convert_state_dict_to_kohya(peft_state)
    except Exception as err:  # diffusers' converters raise bare errors on odd key sets
        raise ValueError(f"{lora_file}: its keys cannot be converted to kohya format "
                         f"({type(err).__name__}: {err})") from None
    kohya = {k.replace("lora_unet_unet_", "lora_unet_"): v.contiguous() for k, v in kohya.items()}
    out_file = Path(out_file)
    if out_file.is_dir():
        raise ValueError(f"{out_file} is a folder; give the output file name")
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        save_file(kohya, str(out_file))
    except Exception as err:  # safetensors reports I/O errors as its own exception type
        msg = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise ValueError(f"cannot write {out_file}: {msg}") from None
    # safetensors writes through a private temp file (mode 0600): give the export the
    # mode any new file gets (0666 minus the umask), so other programs can read it
    umask = os.umask(0)
    os.umask(umask)
    out_file.chmod(0o666 & ~umask)
    return out_file


def _weights_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA weights must be a .safetensors file")
    return path


def check_lora_file(path: str | Path) -> Path:
    """Validate a LoRA file (diffusers or kohya keys) before loading it."""
    from safetensors import safe_open

    path = _weights_file(path)
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    if not any("lora" in k for k in keys):
        raise ValueError(f"{path} holds no LoRA weights (no 'lora' keys; is it a full model?)")
    return path


def check_lora_fits(unet, source: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """ValueError naming the first layer whose LoRA factors do not fit ``unet`` (a LoRA
    trained for another architecture), with both shapes; silent when every layer the
    file and the UNet share fits. ``state``: diffusers, PEFT or converted kohya keys
    (default: the shapes in the file ``source``, read without loading its tensors)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open

    if state is None:
        with safe_open(str(_weights_file(source)), "pt") as f:
            state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}

    unet_keys = {k.removeprefix("unet."): v for k, v in state.items()
                 if not k.startswith(("text_encoder", "te_", "lora_te"))}
    try:
        unet_keys = convert_unet_state_dict_to_peft(unet_keys)
    except Exception:  # noqa: BLE001 - keys already in PEFT form
        pass
    modules = dict(unet.named_modules())
    for key, down in sorted(unet_keys.items()):
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        up = unet_keys.get(key.replace(".lora_A.", ".lora_B."))
        module = modules.get(name)
        module = getattr(module, "base_layer", module)
        weight = getattr(module, "weight", None)
        if weight is None or up is None:
            continue
        fits = (down.ndim == weight.ndim and down.shape[1] == weight.shape[1]
                and up.shape[0] == weight.shape[0] and tuple(down.shape[2:]) == tuple(weight.shape[2:]))
        if not fits:
            raise ValueError(
                f"{source} does not fit this model: layer {name} has weight "
                f"{tuple(weight.shape)} but the LoRA gives lora_A {tuple(down.shape)}, lora_B "
                f"{tuple(up.shape)} (it was trained for another architecture)")


_OLD_PROCESSOR_KEYS = {f"processor.{p}_lora.": f"{q}.lora." for p, q in [
    ("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")]}


def read_lora_state(path: Path) -> dict[str, torch.Tensor] | None:
    """A kohya-format file converted to diffusers keys (alphas folded into the up
    weights); None for files already in diffusers/PEFT format.

    diffusers' kohya converter emits attention keys in the old attention-processor
    form (``attn1.processor.to_q_lora.down``) that its PEFT loader then drops; they are
    renamed here so every layer of the file is applied.
    """
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    raw = load_file(str(path))
    if not any(k.startswith(("lora_unet_", "lora_te")) for k in raw):
        return None
    state, alphas = _convert_non_diffusers_lora_to_diffusers(raw)
    fixed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for old, new in _OLD_PROCESSOR_KEYS.items():
            key = key.replace(old, new)
        # PEFT names, as in the files save_lora writes (those load completely)
        key = key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        fixed[key] = value
    for key, alpha in (alphas or {}).items():
        base = key.removesuffix(".alpha")
        for old, new in _OLD_PROCESSOR_KEYS.items():
            base = base.replace(old.rstrip("."), new.rstrip("."))
        up = next((k for k in fixed
                   if k.startswith(base + ".") and "lora_B" in k), None)
        if up is not None:
            rank = fixed[up].shape[1]
            fixed[up] = fixed[up] * (float(alpha) / rank)
    return fixed


def _tuner_layers(unet) -> list:
    """The UNet's PEFT layers, found once per set of adapter names (diffusers'
    ``disable_adapters`` / ``enable_adapters`` walk every module on every call: twice a
    training step for the teacher pass)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(sorted(getattr(unet, "peft_config", None) or {}))
    cached = unet.__dict__.get("_hypersd_tuner_layers")
    if cached is None or cached[0] != key:
        layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        cached = unet.__dict__["_hypersd_tuner_layers"] = (key, layers)
    return cached[1]


@contextlib.contextmanager
def adapters_disabled(unet):
    """The teacher: the same UNet with its LoRA layers switched off (one weight copy).
    Per layer the same calls as diffusers' ``disable_adapters`` / ``enable_adapters``."""
    layers = _tuner_layers(unet)
    if not layers:  # as diffusers does: no adapters is an error, not a silent teacher
        unet.disable_adapters()
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merge_lora_files(files: list[str | Path], scales: list[float], out_dir: str | Path,
                     rank: int | None = None) -> Path:
    """Merge LoRAs into one diffusers-format LoRA: the weighted sum of their deltas,
    refactored by SVD to ``rank`` (default: the sum of the ranks, which is exact)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    deltas: dict[str, torch.Tensor] = {}
    total_rank = 0
    for file, scale in zip(files, scales):
        state = load_file(str(_weights_file(file)))
        for key, down in state.items():
            if ".lora_A." not in key and ".lora.down." not in key:
                continue
            up_key = key.replace(".lora_A.", ".lora_B.").replace(".lora.down.", ".lora.up.")
            up = state[up_key].float()
            down = down.float()
            base = key.split(".lora_A.")[0] if ".lora_A." in key else key.split(".lora.down.")[0]
            delta = up.flatten(1) @ down.flatten(1)
            deltas[base] = deltas.get(base, 0) + scale * delta
            shapes = (up.shape, down.shape)
            deltas.setdefault(f"__shape__{base}", shapes)  # type: ignore[arg-type]
        total_rank += max((v.shape[0] for k, v in state.items() if ".lora_A." in k), default=0)
    rank = rank or total_rank
    merged: dict[str, torch.Tensor] = {}
    for base, delta in deltas.items():
        if base.startswith("__shape__"):
            continue
        up_shape, down_shape = deltas[f"__shape__{base}"]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        up = (u[:, :r] * root).reshape(up_shape[0], r, *up_shape[2:])
        down = (root[:, None] * vh[:r]).reshape(r, *down_shape[1:])
        merged[f"{base}.lora_A.weight"] = down.contiguous()
        merged[f"{base}.lora_B.weight"] = up.contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet_state = {k.removeprefix("unet."): v for k, v in merged.items()}
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers={f"{k}": v for k, v in unet_state.items()},
        safe_serialization=True)
    return out_dir / WEIGHT_NAME


def load_lora_into(unet, path: str | Path, adapter_name: str) -> None:
    """Load a diffusers- or PEFT-keyed LoRA file into an existing adapter of ``unet``
    (a stage starting from the previous stage's final adapter). Ranks must match."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(check_lora_file(path)))
    state = {k.removeprefix("unet."): v for k, v in state.items()
             if not k.startswith("text_encoder")}
    state = convert_unet_state_dict_to_peft(state)
    check_lora_fits(unet, path, state)
    config = unet.peft_config[adapter_name]
    ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k}
    if ranks != {config.r}:
        raise ValueError(f"{path} has LoRA rank {sorted(ranks)}, but the stage's lora_rank is "
                         f"{config.r}; set lora_rank to match the initial adapter")
    # saved files carry alpha / r inside lora_B (see save_lora): undo it for this adapter
    scale = config.lora_alpha / config.r
    state = {k: v / scale if "lora_B" in k else v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} keys do not match this UNet "
                         f"(e.g. {unexpected[0]}); was it trained on another model?")
