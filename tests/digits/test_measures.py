"""The independent views of digits quality (measures.py): no net shared with the rewards."""

import numpy as np
import torch

from hypersd_core.digits.measures import edge_width, hue_error, pixel_features, stray_ink
from hypersd_core.rewards.digits_train import blur
from hypersd_core.worlds import digits as world


def _stroke(rgb=(1.0, 0.0, 0.0)) -> torch.Tensor:
    x = torch.zeros(1, 3, 32, 32)
    x[0, :, 6:26, 13:19] = torch.tensor(rgb).view(3, 1, 1)
    return x


def test_hue_error_against_the_prompted_colour():
    red, magenta, orange = _stroke((1, 0, 0)), _stroke((1, 0, 1)), _stroke((1, 0.5, 0))
    x = torch.cat([red, magenta, orange, red, torch.zeros(1, 3, 32, 32)])
    err = hue_error(x, ["red", "red", "red", "white", "red"])
    assert err[0] < 1e-3 and abs(err[1] - 60) < 1e-3 and abs(err[2] - 30) < 1
    assert np.isnan(err[3]) and np.isnan(err[4])  # white has no hue; no ink


def test_edge_width_grows_with_blur_and_stray_ink_with_speckle():
    x = _stroke().repeat(4, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    soft = blur(x, g)
    assert (edge_width(soft) > edge_width(x) + 0.5).all()
    speckle = x.clone()
    speckle[:, :, ::3, ::3] += 0.4 * torch.rand(4, 3, 11, 11, generator=g)
    # a ninth of the pixels at 0.2 on average: about 0.02 over the background
    assert (stray_ink(speckle) > stray_ink(x) + 0.015).all() and stray_ink(x).max() == 0


def test_real_digits_are_crisp_and_on_hue():
    data = world.DigitsDataset("heldout").tensors()
    x = (data["images"][:64] + 1) / 2
    names = [world.COLOUR_NAMES[int(c)] for c in data["colours"][:64]]
    assert np.nanmax(hue_error(x, names)) < 1.0
    assert stray_ink(x).mean() < 0.02 and 1.0 < edge_width(x).mean() < 2.5
    assert pixel_features(x).shape == (64, 192)


def test_disjoint_split_shares_no_shape_with_any_training_split():
    from hypersd_core.digits.evalnets import disjoint_split

    train, held = world.split_indices()
    first, second = disjoint_split()
    assert not set(first) & set(second) and not (set(first) | set(second)) & set(train)
    assert set(first) | set(second) == set(held)
