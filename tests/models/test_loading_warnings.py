"""Loading models passes today's arguments: no deprecation warning reaches a run's log.

diffusers 0.42 renamed ``from_pretrained(torch_dtype=...)`` to ``dtype=``; the old name
prints a FutureWarning into every run's log.txt (the trainer loads the backbone there).
"""

from __future__ import annotations

import warnings

import torch


def _deprecations(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught
            if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and "dtype" in str(w.message)]


def test_backbone_unet_and_controlnet_load_without_dtype_deprecation(tiny_sd15):
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.controlnet import load_controlnet
    from hypersd_core.models.unet import load_unet

    loaded = {}
    assert _deprecations(lambda: loaded.update(
        b=load_backbone(str(tiny_sd15), dtype=torch.float16))) == []
    assert loaded["b"].pipe.unet.dtype == torch.float16  # the dtype still applies
    assert loaded["b"].pipe.text_encoder.dtype == torch.float16
    assert _deprecations(lambda: load_unet(tiny_sd15 / "unet", loaded["b"].pipe.unet)) == []
    assert _deprecations(lambda: load_controlnet("digits", dtype=torch.float16)) == []
