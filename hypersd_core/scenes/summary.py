"""Summaries of a scenes evaluation's rows: point values and cluster-bootstrap intervals
(generator sources resampled whole, never single images), paired differences between rows
that show the same scenes, and the real-vs-real floor split by source."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from hypersd_core.evaluation import distribution as dist

SPACES = ("detector", "random", "pixels")
ACC_KEYS = ("class_acc", "colour_acc", "size_acc", "position_acc", "relation_acc",
            "count_acc", "all_correct")


class Replicates:
    """The bootstrap replicates one evaluation shares across its rows: per replicate, the
    draw count of every generator source of the evaluated scenes (every row shows the same
    scenes, so one draw pairs any two rows) and the reference's replicate in each feature
    space (``protocol.stats.BootstrapReference``: resampled by source, its covariance
    square root precomputed). A row's values over the replicates are computed once, from
    per-source sums (C d^2 per replicate, not N d^2), and reused by its summary and by
    every paired difference it takes part in."""

    def __init__(self, sources: np.ndarray, ref: dict, n_boot: int, seed: int = 0):
        from hypersd_core.protocol.stats import BootstrapReference

        self.sources = np.asarray(sources)
        _, self.inverse = np.unique(self.sources, return_inverse=True)
        n_clusters = int(self.inverse.max()) + 1
        rng = np.random.default_rng(seed)
        self.counts = np.stack([np.bincount(rng.integers(0, n_clusters, n_clusters),
                                            minlength=n_clusters) for _ in range(n_boot)]
                               ).astype(np.float64)  # [B, C]
        self.weights = self.counts[:, self.inverse]  # [B, N]
        with threadpool_limits(limits=1):
            self.refs = {sp: BootstrapReference(ref[f"f_{sp}"], ref["source"], n_boot, seed + 1)
                         for sp in SPACES}
        self._rows: dict[int, tuple[dict, dict]] = {}

    def values(self, arr: dict) -> dict[str, np.ndarray]:
        """{measure: its value in every replicate [B]} of one row (accuracies in %)."""
        from hypersd_core.protocol.stats import ClusterMoments

        if id(arr) in self._rows:
            return self._rows[id(arr)][1]
        if not np.array_equal(np.asarray(arr["source"]), self.sources):
            raise ValueError("a row's scenes differ from the replicates' (rows of one table "
                             "must show the same scenes)")
        out: dict[str, np.ndarray] = {}
        for k in (k for k in ACC_KEYS if k in arr):
            x = np.asarray(arr[k], dtype=np.float64)
            ok = ~np.isnan(x)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[k] = self.weights @ np.where(ok, x, 0.0) / (self.weights @ ok) * 100
        # one BLAS thread: these are many small (d <= 192) products, which threads slow
        # down, many times over when the cores are shared with other jobs
        with threadpool_limits(limits=1):
            for sp in SPACES:
                moments = ClusterMoments(arr[f"f_{sp}"], self.inverse)
                ref = self.refs[sp]
                out[f"fd_{sp}"] = np.array([ref.fd(*moments.stats(c), r)
                                            for r, c in enumerate(self.counts)])
        self._rows[id(arr)] = (arr, out)  # the row is kept: its id stays its own
        return out


_REPLICATES: dict[tuple, Replicates] = {}


def replicates(sources: np.ndarray, ref: dict, n_boot: int, seed: int = 0) -> Replicates:
    """The shared replicates of (these scenes, this reference, n_boot, seed)."""
    key = (id(ref), n_boot, seed, hash(np.asarray(sources).tobytes()))
    if key not in _REPLICATES:
        _REPLICATES.clear()  # one evaluation at a time: a reference's replicates are large
        _REPLICATES[key] = Replicates(sources, ref, n_boot, seed)
        _REPLICATES[key].ref = ref  # keeps id(ref) from being reused while cached
    return _REPLICATES[key]


def summarize(arr: dict, ref: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """Point values and 95% cluster-bootstrap intervals of every measure of one row."""
    res: dict = {}
    for k in ACC_KEYS:
        res[k] = float(np.nanmean(arr[k]) * 100)
    for s in SPACES:
        res[f"fd_{s}"] = dist.fd(arr[f"f_{s}"], ref[f"f_{s}"])
        res[f"kid_{s}"] = dist.kid(arr[f"f_{s}"], ref[f"f_{s}"]) * 1000
    p, r = dist.precision_recall(ref["f_detector"][:2000], arr["f_detector"][:2000])
    res["precision"], res["recall"] = p * 100, r * 100
    boots = replicates(arr["source"], ref, n_boot, seed).values(arr)
    for k, v in boots.items():
        res[f"{k}_ci"] = dist.percentile_interval(v)
        if k.startswith("fd_"):  # resampling repeats images, which inflates FD: the spread
            lo, hi = res[f"{k}_ci"]  # of the draws, centred on the point value
            med = float(np.median(v))
            res[f"{k}_ci"] = [max(0.0, res[k] - (med - lo)), res[k] + (hi - med)]
    return res


def floor(ref: dict, n_splits: int = 200, seed: int = 0) -> dict:
    """Real-vs-real FD per space, the reference split in two halves by source cluster."""
    rng = np.random.default_rng(seed)
    ids = np.unique(ref["source"])
    vals: dict[str, list] = {s: [] for s in SPACES}
    for _ in range(n_splits):
        half = set(rng.permutation(ids)[:len(ids) // 2])
        a = np.array([s in half for s in ref["source"]])
        for s in SPACES:
            vals[s].append(dist.fd(ref[f"f_{s}"][a], ref[f"f_{s}"][~a]))
    return {f"fd_{s}": float(np.median(v)) for s, v in vals.items()} | \
        {f"fd_{s}_ci": dist.percentile_interval(v) for s, v in vals.items()}


def paired_difference(a: dict, b: dict, ref: dict, key: str, n_boot: int = 1000,
                      seed: int = 0, with_draws: bool = False):
    """key(a) - key(b) with a paired cluster-bootstrap interval (same prompts, seeds, and
    the same draws of sources and reference in every replicate); ``with_draws``: also the
    bootstrap differences (for a p-value)."""
    def point(arr):
        if key.startswith("fd_"):
            return dist.fd(arr[f"f_{key[3:]}"], ref[f"f_{key[3:]}"])
        return np.nanmean(arr[key]) * 100

    reps = replicates(a["source"], ref, n_boot, seed)
    diffs = reps.values(a)[key] - reps.values(b)[key]
    value = float(point(a) - point(b))
    if with_draws:
        return value, dist.percentile_interval(diffs), diffs
    return value, dist.percentile_interval(diffs)
