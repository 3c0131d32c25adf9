"""ImageReward (Xu et al. 2023, THUDM/ImageReward) with a differentiable tensor path.

The ``image-reward`` package's BLIP code targets transformers 4 and fairscale, and its
package ``__init__`` imports its ReFL trainer (``datasets``, diffusers, ...). We
therefore (1) install a small compatibility shim into ``transformers.modeling_utils``,
(2) provide ``fairscale``'s ``checkpoint_wrapper`` when fairscale is absent, and
(3) import only the model modules we need (BLIP ViT, BLIP's BERT "med", the MLP)
without executing the package ``__init__``. The model is then assembled with the
same attribute names as ``ImageReward.ImageReward`` so its checkpoint loads as is.

Score (the package's ``score_gard`` path): BLIP ViT image tokens -> BERT text encoder
cross-attending to them -> [CLS] feature -> MLP -> (r - mean) / std.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hypersd_core.rewards.base import (
    CLIP_MEAN,
    CLIP_STD,
    Reward,
    RewardWeightsMissing,
    clip_preprocess,
    hub_offline,
    load_state_dict_file,
    resolve_file,
)

HUB_REPO = "THUDM/ImageReward"
TOKENIZER_REPO = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426  # from ImageReward.ImageReward.__init__
REWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35


# ---------------------------------------------------------------- compatibility shim

def find_pruneable_heads_and_indices(heads: list[int], n_heads: int, head_size: int,
                                     already_pruned_heads: set[int]) -> tuple[set[int], torch.LongTensor]:
    """Heads still to prune and the flat indices of the kept weights (transformers 4 semantics)."""
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        # shift the index down by the number of heads pruned before this one
        head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
        mask[head] = 0
    mask = mask.view(-1).contiguous().eq(1)
    index: torch.LongTensor = torch.arange(len(mask))[mask].long()
    return heads, index


def prune_linear_layer(layer: nn.Linear, index: torch.LongTensor, dim: int = 0) -> nn.Linear:
    """A new Linear keeping only ``index`` along ``dim`` (0: outputs, 1: inputs); trainable."""
    index = index.to(layer.weight.device)
    w = layer.weight.index_select(dim, index).detach().clone()
    b = None
    if layer.bias is not None:
        b = layer.bias.detach().clone() if dim == 1 else layer.bias[index].detach().clone()
    size = list(layer.weight.size())
    size[dim] = len(index)
    new = nn.Linear(size[1], size[0], bias=b is not None).to(layer.weight.device, layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(w.contiguous())
        if b is not None:
            new.bias.copy_(b.contiguous())
    return new


def install_compat_shim() -> None:
    """Make ``image-reward``'s BLIP modules importable on transformers 5 without fairscale."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name, fallback in (("apply_chunking_to_forward", None),
                           ("find_pruneable_heads_and_indices", find_pruneable_heads_and_indices),
                           ("prune_linear_layer", prune_linear_layer)):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name, None) or fallback)
    if mu.apply_chunking_to_forward is None:
        raise ImportError("transformers has no apply_chunking_to_forward; ImageReward cannot load")
    if "fairscale" not in sys.modules and importlib.util.find_spec("fairscale") is None:
        from torch.utils.checkpoint import checkpoint

        class _CheckpointWrapper(nn.Module):
            def __init__(self, module: nn.Module):
                super().__init__()
                self.module = module

            def forward(self, *args: Any) -> Any:
                return checkpoint(self.module, *args, use_reentrant=False)

        names = ["fairscale", "fairscale.nn", "fairscale.nn.checkpoint",
                 "fairscale.nn.checkpoint.checkpoint_activations"]
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        sys.modules[names[-1]].checkpoint_wrapper = _CheckpointWrapper


@functools.lru_cache(maxsize=1)
def _import_imagereward_modules() -> tuple[Any, Any, Any]:
    """(VisionTransformer, med.BertModel, MLP) from the installed package, skipping its __init__."""
    install_compat_shim()
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'image-reward' package is not installed: pip install image-reward --no-deps")
    root = Path(list(spec.submodule_search_locations)[0])
    for pkg, folder in (("ImageReward", root), ("ImageReward.models", root / "models")):
        if pkg not in sys.modules:  # a bare package: its __init__ would import ReFL/datasets
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(folder)]
            sys.modules[pkg] = mod
    vit = importlib.import_module("ImageReward.models.BLIP.vit")
    med = importlib.import_module("ImageReward.models.BLIP.med")
    ir = importlib.import_module("ImageReward.ImageReward")

    class BertModel(med.BertModel):
        """med.BertModel whose weight init goes through transformers 5's ``post_init``."""

        def init_weights(self) -> None:
            # med calls init_weights() where transformers 5 needs post_init(), which in
            # turn calls init_weights(): route the first call through post_init once.
            if self.__dict__.get("_in_post_init"):
                super().init_weights()
                return
            self.__dict__["_in_post_init"] = True
            try:
                self.post_init()
            finally:
                self.__dict__.pop("_in_post_init")

        def invert_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
            """1/0 keep mask [B,S] or [B,S,S] -> additive mask (removed from PreTrainedModel in v5)."""
            ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
            ext = ext.to(dtype=self.dtype)
            return (1.0 - ext) * torch.finfo(self.dtype).min

        def get_head_mask(self, head_mask: torch.Tensor | None, num_layers: int) -> list[Any]:
            """Per-layer head masks, transformers 4 semantics (removed in v5)."""
            if head_mask is None:
                return [None] * num_layers
            if head_mask.dim() == 1:
                head_mask = head_mask[None, None, :, None, None].expand(num_layers, -1, -1, -1, -1)
            elif head_mask.dim() == 2:
                head_mask = head_mask[:, None, :, None, None]
            return head_mask.to(dtype=self.dtype)

    return vit.VisionTransformer, BertModel, ir.MLP


# ---------------------------------------------------------------- model

def _vision_config(sd: dict[str, torch.Tensor], num_heads: int | None) -> dict[str, Any]:
    """BLIP ViT hyper-parameters read off the checkpoint's shapes."""
    p = "blip.visual_encoder."
    try:
        embed_dim = sd[p + "cls_token"].shape[-1]
        patch = sd[p + "patch_embed.proj.weight"].shape[-1]
        n_patches = sd[p + "pos_embed"].shape[1] - 1
        hidden = sd[p + "blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an ImageReward checkpoint: missing {e.args[0]}") from None
    depth = 1 + max(int(k[len(p + "blocks."):].split(".")[0]) for k in sd if k.startswith(p + "blocks."))
    side = math.isqrt(n_patches)
    return dict(img_size=side * patch, patch_size=patch, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads or max(1, embed_dim // 64), mlp_ratio=hidden / embed_dim)


class _Blip(nn.Module):
    """The parts of BLIP_Pretrain ImageReward uses, under the same attribute names."""

    def __init__(self, visual_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 256):
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(visual_encoder.embed_dim, embed_dim)
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, embed_dim)


class ImageRewardModel(Reward):
    """ImageReward: BLIP ViT + cross-attending BERT + MLP; unbounded, ~N(0,1) on its data."""

    name = "imagereward"
    range = None
    higher_is_better = True
    differentiable = True

    def __init__(self, blip: _Blip, mlp: nn.Module, tokenizer: Any, image_size: int):
        super().__init__()
        self.blip = blip
        self.mlp = mlp
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean, self.std = REWARD_MEAN, REWARD_STD

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> rewards [B]."""
        x = clip_preprocess(images, self.image_size, CLIP_MEAN, CLIP_STD)  # the package's _transform
        text = self.tokenizer(prompts, padding="max_length", truncation=True,
                              max_length=MAX_TEXT_TOKENS, return_tensors="pt").to(images.device)
        image_embeds = self.blip.visual_encoder(x)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=images.device)
        out = self.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                     encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=image_atts, return_dict=True)
        r = self.mlp(out.last_hidden_state[:, 0, :].float())[:, 0]
        return (r - self.mean) / self.std


def load_blip_tokenizer(tokenizer_dir: str | Path) -> Any:
    """BERT tokenizer with BLIP's added tokens (as ``ImageReward...blip.init_tokenizer``)."""
    from transformers import BertTokenizer

    try:
        tok = BertTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=hub_offline()
                                            or Path(tokenizer_dir).is_dir())
    except Exception as e:
        raise RewardWeightsMissing(
            f"ImageReward needs the BERT tokenizer {TOKENIZER_REPO!r}: not found at {tokenizer_dir} "
            f"({type(e).__name__}). Download https://huggingface.co/{TOKENIZER_REPO} (vocab.txt, "
            "tokenizer_config.json) into a folder and pass tokenizer_dir=that folder.") from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    return tok


def load_imagereward(checkpoint_path: str | Path, med_config_path: str | Path,
                     tokenizer_dir: str | Path, device: str | torch.device = "cpu",
                     num_heads: int | None = None) -> ImageRewardModel:
    """Build ImageReward from local files (real or tiny test weights alike).

    Args:
        checkpoint_path: ``ImageReward.pt`` (loaded with weights_only) or a .safetensors file
            with the package's key layout (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
            ``mlp.layers.*``).
        med_config_path: the BLIP BERT config JSON (``med_config.json``).
        tokenizer_dir: a local ``bert-base-uncased`` tokenizer folder.
        num_heads: ViT heads (default: embed_dim // 64, which is BLIP's 16 for ViT-L).
    Returns:
        the frozen reward in eval mode.
    """
    for what, p in (("checkpoint", checkpoint_path), ("med_config", med_config_path)):
        if not Path(p).is_file():
            raise RewardWeightsMissing(
                f"ImageReward {what} not found at {p}; download ImageReward.pt and med_config.json "
                f"from https://huggingface.co/{HUB_REPO} and pass their paths")
    VisionTransformer, BertModel, MLP = _import_imagereward_modules()
    from transformers.models.bert.configuration_bert import BertConfig

    sd = load_state_dict_file(checkpoint_path)
    vcfg = _vision_config(sd, num_heads)
    cfg_dict = json.loads(Path(med_config_path).read_text())
    config = BertConfig(**cfg_dict)
    config.encoder_width = vcfg["embed_dim"]
    text_encoder = BertModel(config=config, add_pooling_layer=False)
    visual = VisionTransformer(**vcfg)
    mlp = MLP(config.hidden_size)
    model = ImageRewardModel(_Blip(visual, text_encoder), mlp, load_blip_tokenizer(tokenizer_dir),
                             image_size=vcfg["img_size"])
    missing, _unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"ImageReward checkpoint {checkpoint_path} lacks {len(missing)} weights, "
                         f"e.g. {missing[:5]}")
    if len(model.tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(model.tokenizer)} tokens but med_config vocab_size "
                         f"is {config.vocab_size}")
    return model.to(device).freeze()


def make_imagereward(path: str | Path | None = None, device: str | torch.device = "cpu",
                     med_config: str | Path | None = None, tokenizer_dir: str | Path | None = None,
                     **kw: Any) -> ImageRewardModel:
    """Registry factory: ``path`` is ImageReward.pt or a folder holding it and med_config.json."""
    hint = "Also needs med_config.json (same repo) and a bert-base-uncased tokenizer folder."
    ckpt = resolve_file("ImageReward", path, HUB_REPO, "ImageReward.pt", hint)
    if med_config is None:
        local = ckpt.parent / "med_config.json"
        med_config = local if local.is_file() else resolve_file(
            "ImageReward med_config", None, HUB_REPO, "med_config.json", hint)
    if tokenizer_dir is None:
        local = ckpt.parent / "tokenizer"
        tokenizer_dir = local if local.is_dir() else TOKENIZER_REPO
    return load_imagereward(ckpt, med_config, tokenizer_dir, device=device, **kw)
