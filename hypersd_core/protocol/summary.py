"""Rows of a comparison summarised with bootstrap intervals, for any world.

A world describes its measures with a ``Measures`` value: feature spaces (FD to each
reference set; KID in some), per-image rates (accuracies, higher is better) and per-image
means (errors, lower is better; NaN entries ignored), and optionally a per-image measure
judged by its gap to the real set's mean. Reference sets are resampled by source cluster
(``BootstrapReference``); the rows' own images by image (each is an independent draw).
Replicates are shared: every row meets the same reference replicates, and both rows of
a paired difference draw the same image indices (image i of each row has the same
prompt and seed), so what they share cancels in the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hypersd_core.protocol.stats import (
    BootstrapReference,
    bootstrap_p,
    image_weights,
    kid_kernels,
    kid_weighted,
    percentile_interval,
    weighted_stats,
)


@dataclass(frozen=True)
class Measures:
    """spaces: {array key: key suffix} (FD vs every reference: ``fd_{ref}{suffix}``);
    kid_spaces: spaces that also get ``kid_{ref}{suffix}``; clusters: {space: the real
    set's cluster-id key} (default ``"cluster"``); rates: {array key: output name} in %;
    means: per-image values, lower is better; gaps: per-image values judged by the
    distance of their mean to the real set's mean (``{name}_gap``)."""

    spaces: dict[str, str]
    kid_spaces: tuple[str, ...] = ()
    clusters: dict[str, str] = field(default_factory=dict)
    rates: dict[str, str] = field(default_factory=dict)
    means: tuple[str, ...] = ()
    gaps: tuple[str, ...] = ()


class References:
    """The reference sets (e.g. real and the teacher's) of every space, each with its
    ``n_boot`` replicates, built once for a whole report."""

    def __init__(self, sets: dict[str, dict], measures: Measures, n_boot: int = 1000,
                 seed: int = 0):
        self.sets, self.measures, self.n_boot = sets, measures, n_boot
        self.boot: dict[tuple[str, str], BootstrapReference] = {}
        self.kbb: dict[tuple[str, str], np.ndarray] = {}
        self.kid_weights: dict[tuple[str, str], list[np.ndarray]] = {}
        for k, (name, ref) in enumerate(sets.items()):
            for j, space in enumerate(measures.spaces):
                if space not in ref:
                    continue
                clusters = ref.get(measures.clusters.get(space, "cluster"))
                b = BootstrapReference(ref[space], clusters, n_boot, seed + 100 * k + j)
                self.boot[name, space] = b
                if space in measures.kid_spaces:
                    self.kbb[name, space] = kid_kernels(ref[space], ref[space][:1])[0]
                    self.kid_weights[name, space] = b.weights

    def gap_target(self, name: str) -> float | None:
        real = self.sets.get("real", {})
        return float(np.nanmean(real[name])) if name in real else None


def _wmean(v: np.ndarray, w: np.ndarray) -> float:
    ok = ~np.isnan(v)
    return float((v[ok] * w[ok]).sum() / max(w[ok].sum(), 1e-12))


def _scalars(arrays: dict, refs: References, w: np.ndarray, r: int | None,
             kernels: dict) -> dict[str, float]:
    """Every summary number of one row under image weights ``w`` and reference replicate
    ``r`` (None: the point estimate)."""
    m, out = refs.measures, {}
    for space, sfx in m.spaces.items():
        if space not in arrays:
            continue
        mu, cov = weighted_stats(arrays[space].astype(np.float64), w)
        for name in refs.sets:
            if (name, space) in refs.boot:
                out[f"fd_{name}{sfx}"] = refs.boot[name, space].fd(mu, cov, r)
            if (name, space) in kernels:
                kaa, kab = kernels[name, space]
                wb = (np.ones(len(kab[0])) if r is None else refs.kid_weights[name, space][r])
                out[f"kid_{name}{sfx}"] = kid_weighted(kaa, refs.kbb[name, space], kab, w, wb)
    for key, name in m.rates.items():
        if key in arrays:
            out[name] = 100 * _wmean(arrays[key].astype(np.float64), w)
    for key in m.means:
        if key in arrays:
            out[key] = _wmean(arrays[key].astype(np.float64), w)
    for key in m.gaps:
        target = refs.gap_target(key)
        if key in arrays and target is not None:
            out[key + "_gap"] = abs(_wmean(arrays[key].astype(np.float64), w) - target)
    return out


def _kernels(arrays: dict, refs: References) -> dict:
    return {(name, space): kid_kernels(arrays[space], refs.sets[name][space])
            for (name, space) in refs.kbb if space in arrays}


def summarize_row(arrays: dict, refs: References, seed: int = 0) -> dict:
    """Point estimates and bootstrap 95% intervals (``*_ci``) of one row. FD's intervals
    are shifted back by the replicates' mean bias (a resample holds duplicates, which
    raises FD by more than its spread at a few hundred images)."""
    n = len(next(iter(arrays.values())))
    kernels = _kernels(arrays, refs)
    point = _scalars(arrays, refs, np.ones(n), None, kernels)
    if refs.n_boot == 0:
        return {**point, "n": n}
    rng = np.random.default_rng(seed)
    boots = [_scalars(arrays, refs, image_weights(n, rng), r, kernels)
             for r in range(refs.n_boot)]
    out = dict(point)
    for key, value in point.items():
        vals = np.array([b[key] for b in boots])
        lo, hi = percentile_interval(vals)
        bias = float(vals.mean()) - value if key.startswith("fd_") else 0.0
        out[key + "_ci"] = [max(0.0, lo - bias), hi - bias]
    out["n"] = n
    out["n_boot"] = refs.n_boot
    return out


def paired_differences(a: dict, b: dict, refs: References, seed: int = 0) -> dict[str, dict]:
    """a minus b for every summary number (lower is better for every one of them except
    the rates, which are returned as b minus a so that negative always means ``a`` is
    better): {"diff", "ci", "a_better", "p"} with a paired bootstrap."""
    n = len(next(iter(a.values())))
    if len(next(iter(b.values()))) != n:
        raise ValueError(f"paired rows need the same images: {n} vs {len(next(iter(b.values())))}")
    ka, kb = _kernels(a, refs), _kernels(b, refs)
    rates = set(refs.measures.rates.values())

    def diff(w, r):
        sa, sb = _scalars(a, refs, w, r, ka), _scalars(b, refs, w, r, kb)
        return {k: (sb[k] - sa[k]) if k in rates else (sa[k] - sb[k]) for k in sa if k in sb}

    point = diff(np.ones(n), None)
    rng = np.random.default_rng(seed)
    boots = [diff(image_weights(n, rng), r) for r in range(refs.n_boot)]
    out = {}
    for key, value in point.items():
        vals = np.array([bt[key] for bt in boots])
        bias = float(vals.mean()) - value
        centred = vals - bias
        lo, hi = percentile_interval(centred)
        out[key] = {"diff": value, "ci": [lo, hi], "a_better": float(np.mean(centred < 0)),
                    "p": bootstrap_p(centred, value)}
    return out
