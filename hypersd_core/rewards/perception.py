"""Perceptual loss by instance segmentation (Hyper-SD section 3.2, after UniFL).

The denoised estimate x0' of a noised real image is segmented by a frozen detector
and scored against the image's ground-truth instances: the detector's own training
losses, per sample. Lower is better. Detector weights are frozen; gradients reach
the images.

Backends:
  * ``maskrcnn`` (default): torchvision Mask R-CNN; in train mode it returns its
    losses given targets. Batch-norm layers stay in eval mode (running statistics),
    so each sample's loss does not depend on the rest of the batch.
  * ``solo``: mmdet SOLO, the paper's choice, only where mmdet imports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hypersd_core.rewards.base import (
    ImagesLike,
    PromptsLike,
    Reward,
    load_state_dict_file,
    resolve_file,
    to_image_tensor,
)

Target = dict[str, torch.Tensor]  # boxes [N,4] xyxy pixels, labels [N] int64, masks [N,H,W] uint8
MASKRCNN_FILE = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
MASKRCNN_URL = "https://download.pytorch.org/models/" + MASKRCNN_FILE
MMDET_MISSING = (
    "the 'solo' perception backend needs mmdet, which cannot be installed on this torch: "
    "mmdet 3.x requires mmcv<2.2, and mmcv 2.1 does not compile against torch 2.14 (it needs "
    "C++20). Use backend='maskrcnn' (torchvision), or an environment with an older torch.")


def mask_to_target(mask: torch.Tensor, label: int) -> Target:
    """One instance as a detection target.

    Args:
        mask: [H,W] bool/0-1 mask of the instance.
        label: its class id (>= 1; 0 is background for torchvision detectors).
    Returns:
        {"boxes": [1,4] float (x0,y0,x1,y1, tight around the mask), "labels": [1] int64,
         "masks": [1,H,W] uint8}.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H,W], got shape {list(mask.shape)}")
    if label < 1:
        raise ValueError(f"label must be >= 1 (0 is background), got {label}")
    m = mask.bool()
    ys, xs = torch.nonzero(m, as_tuple=True)
    if ys.numel() == 0:
        raise ValueError("mask is empty: an instance needs at least one pixel")
    box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
    return {"boxes": box[None], "labels": torch.tensor([int(label)]), "masks": m[None].to(torch.uint8)}


def check_targets(targets: Sequence[Target], images: torch.Tensor) -> None:
    """Raise ValueError unless there is one well-formed target dict per image."""
    b, _, h, w = images.shape
    if len(targets) != b:
        raise ValueError(f"got {len(targets)} targets for {b} images")
    for i, t in enumerate(targets):
        missing = {"boxes", "labels", "masks"} - set(t)
        if missing:
            raise ValueError(f"target {i} lacks {sorted(missing)} (use mask_to_target)")
        n = t["labels"].shape[0]
        if t["boxes"].shape != (n, 4) or t["masks"].shape != (n, h, w):
            raise ValueError(
                f"target {i}: boxes must be [N,4] and masks [N,{h},{w}] for N={n} labels, got "
                f"boxes {list(t['boxes'].shape)} masks {list(t['masks'].shape)}")


def build_maskrcnn(num_classes: int = 91, min_size: int = 800, max_size: int = 1333,
                   weights: str | Path | None = None, backbone: str = "resnet50",
                   **detector_kw: Any) -> nn.Module:
    """torchvision Mask R-CNN with a ResNet FPN backbone.

    ``backbone="resnet50"`` is torchvision's ``maskrcnn_resnet50_fpn`` (the COCO weights'
    layout); smaller ResNets ("resnet18") make fast test detectors. ``weights``: a local
    state dict, or None for random weights. ``detector_kw`` go to torchvision's ``MaskRCNN``
    (e.g. ``box_batch_size_per_image``).
    """
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    if backbone == "resnet50":
        net = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                    min_size=min_size, max_size=max_size, **detector_kw)
    else:
        body = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=5)
        net = MaskRCNN(body, num_classes=num_classes, min_size=min_size, max_size=max_size,
                       **detector_kw)
    if weights is not None:
        net.load_state_dict(load_state_dict_file(weights), strict=True)
    return net


class PerceptualLoss(Reward):
    """Instance-segmentation loss of a frozen detector against ground truth; lower is better."""

    name = "perception"
    range = None
    higher_is_better = False
    differentiable = True

    def __init__(self, detector: nn.Module, loss_weights: dict[str, float] | None = None,
                 seed: int | None = None):
        super().__init__()
        self.detector = detector
        self.loss_weights = loss_weights or {}
        self.seed = seed  # the RPN/ROI samplers draw from the global RNG; pin it when set

    @contextlib.contextmanager
    def _loss_mode(self) -> Iterator[None]:
        was = self.detector.training
        self.detector.train()
        for m in self.detector.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        fork = torch.random.fork_rng(devices=[]) if self.seed is not None else contextlib.nullcontext()
        try:
            with fork:
                if self.seed is not None:
                    torch.manual_seed(self.seed)
                yield
        finally:
            self.detector.train(was)

    def loss(self, images: ImagesLike, targets: Sequence[Target]) -> torch.Tensor:
        """Per-sample instance-segmentation loss.

        Args:
            images: x0' [B,3,H,W] in [0,1] (or B RGB PIL images).
            targets: B dicts (see :func:`mask_to_target`), pixel coordinates of the images.
        Returns:
            [B] sum of the detector's (weighted) losses for each image.
        """
        x = to_image_tensor(images, device=self.device)
        check_targets(targets, x)
        out = []
        with self._loss_mode():
            for i in range(x.shape[0]):
                t = {k: v.to(x.device) for k, v in targets[i].items()}
                losses = self.detector([x[i]], [t])
                out.append(sum(self.loss_weights.get(k, 1.0) * v for k, v in losses.items()))
        return torch.stack(out)

    def score(self, images: ImagesLike, prompts: PromptsLike | None = None,
              targets: Sequence[Target] | None = None) -> torch.Tensor:
        """The loss as a (lower-is-better) reward; ``targets`` are required."""
        if targets is None:
            raise ValueError("the perception reward needs ground-truth targets: "
                             "score(images, prompts, targets=...) or loss(images, targets)")
        return self.loss(images, targets)


class SoloPerceptualLoss(PerceptualLoss):
    """mmdet SOLO backend: ``detector`` is an mmdet model, losses via ``detector.loss``."""

    def loss(self, images: ImagesLike, targets: Sequence[Target]) -> torch.Tensor:
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        x = to_image_tensor(images, device=self.device)
        check_targets(targets, x)
        out = []
        with self._loss_mode():
            for i in range(x.shape[0]):
                sample = DetDataSample(metainfo={"img_shape": tuple(x.shape[-2:]),
                                                 "pad_shape": tuple(x.shape[-2:]),
                                                 "ori_shape": tuple(x.shape[-2:])})
                from mmdet.structures.mask import BitmapMasks

                t = targets[i]
                sample.gt_instances = InstanceData(
                    bboxes=t["boxes"].to(x.device), labels=(t["labels"] - 1).to(x.device),
                    masks=BitmapMasks(t["masks"].cpu().numpy(), *x.shape[-2:]))
                batch = self.detector.data_preprocessor({"inputs": [x[i] * 255.0],
                                                         "data_samples": [sample]}, training=True)
                losses = self.detector.loss(batch["inputs"], batch["data_samples"])
                out.append(sum(self.loss_weights.get(k, 1.0) * v for k, v in losses.items()
                               if "loss" in k))
        return torch.stack(out)


def make_perception(path: str | Path | None = None, device: str | torch.device = "cpu",
                    backend: str = "maskrcnn", num_classes: int = 91, min_size: int = 800,
                    max_size: int = 1333, random_weights: bool = False, config: str | None = None,
                    backbone: str = "resnet50", detector_kw: dict[str, Any] | None = None,
                    **kw: Any) -> PerceptualLoss:
    """Registry factory.

    Args:
        path: detector weights. maskrcnn: torchvision's COCO state dict (``maskrcnn_resnet50_fpn_coco``)
            or None for the torch hub cache; solo: the mmdet checkpoint.
        backend: "maskrcnn" or "solo".
        random_weights: build a random detector (tests only).
        backbone: ResNet depth of the maskrcnn backend ("resnet50" for the COCO weights).
        detector_kw: extra torchvision ``MaskRCNN`` arguments.
        config: mmdet config file (solo only).
        **kw: ``loss_weights``, ``seed``.
    """
    if backend == "maskrcnn":
        weights = None
        if not random_weights:
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            weights = resolve_file("Mask R-CNN", path or (cache if cache.is_dir() else cache / MASKRCNN_FILE),
                                   None, MASKRCNN_FILE,
                                   hint=f"Download {MASKRCNN_URL} into {cache} or pass its path.")
        net = build_maskrcnn(num_classes, min_size, max_size, weights, backbone, **(detector_kw or {}))
        return PerceptualLoss(net, **kw).to(device)
    if backend == "solo":
        try:
            from mmdet.apis import init_detector
        except ImportError:
            raise ImportError(MMDET_MISSING) from None
        if config is None or path is None:
            raise ValueError("backend='solo' needs config= (an mmdet SOLO config) and path= (its checkpoint)")
        return SoloPerceptualLoss(init_detector(config, str(path), device=str(device)), **kw)
    raise ValueError(f"unknown perception backend {backend!r}; choose 'maskrcnn' or 'solo'")
