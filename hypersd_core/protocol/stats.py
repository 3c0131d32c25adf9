"""Statistics of the protocol: Frechet distance, KID, cluster bootstraps, Holm.

Every function takes arrays and returns numbers; randomness comes from the ``rng``
passed in. Reference sets are resampled by *source cluster*: images that share a source
(digits: the 8 colourings of one handwritten shape) are drawn together, so an interval
does not treat them as independent evidence.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = f.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def fd_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """|mu_a - mu_b|^2 + tr(A + B - 2 (AB)^1/2), with tr (AB)^1/2 the sum of the square
    roots of AB's eigenvalues (real and >= 0 for covariances; a few times faster than
    scipy's sqrtm, which the bootstrap calls hundreds of times)."""
    eig = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(eig).sum())


def fd(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to [N,D] and [M,D]."""
    return fd_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def kid(a: np.ndarray, b: np.ndarray, max_n: int = 5000) -> float:
    """Kernel inception distance (Binkowski et al. 2018): the unbiased MMD^2 between [N,D]
    and [M,D] with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3. Unbiased at
    small n (its expectation is 0 for one distribution), so it can be negative."""
    a, b = a[:max_n].astype(np.float64), b[:max_n].astype(np.float64)
    d = a.shape[1]
    kaa, kbb, kab = ((a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3)
    n, m = len(a), len(b)
    return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1))
                 + (kbb.sum() - np.trace(kbb)) / (m * (m - 1)) - 2 * kab.mean())


def cluster_resample(clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a cluster bootstrap: draw as many clusters as there are, with
    replacement, and take every member of each drawn cluster. [N] ids -> indices."""
    ids, inverse = np.unique(clusters, return_inverse=True)
    members = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(inverse))]
    drawn = rng.integers(0, len(ids), len(ids))
    return np.concatenate([members[starts[c]:starts[c + 1]] for c in drawn])


def cluster_split(clusters: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of a set that share no cluster (the floor: real vs real by source)."""
    ids = np.unique(clusters)
    first = set(rng.permutation(ids)[: len(ids) // 2].tolist())
    mask = np.array([c in first for c in clusters])
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def percentile_interval(values, alpha: float = 0.05) -> list[float]:
    return [float(np.percentile(values, 100 * alpha / 2)),
            float(np.percentile(values, 100 * (1 - alpha / 2)))]


def bootstrap_p(boots: np.ndarray, estimate: float | None = None) -> float:
    """Two-sided p-value of "the difference is 0" from bootstrap replicates: the normal
    approximation with the replicates' standard error, 2 Phi(-|estimate| / se) (the
    estimate defaults to the replicates' mean). Not limited to 1 / replicates, which a
    counted share would be: Holm over a hundred tests needs p below 1e-3."""
    import math

    boots = np.asarray(boots, dtype=np.float64)
    est = float(boots.mean()) if estimate is None else float(estimate)
    se = float(boots.std(ddof=1)) if len(boots) > 1 else 0.0
    if se == 0.0:
        return 1.0 if est == 0.0 else 0.0
    return float(math.erfc(abs(est) / se / math.sqrt(2.0)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control): sorted p_(i) times
    (m - i), made monotone, capped at 1; returned in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj.tolist()


# ---------------------------------------------------------------- fast bootstraps
#
# A bootstrap replicate is a weight vector (how often each image, or each cluster's
# images, was drawn), so a resample's Gaussian statistics are weighted sums: no copied
# arrays. A reference set's replicates are computed once and shared by every row (and
# by both rows of a paired difference), with the square root of each replicate's
# covariance, so the Frechet distance needs one symmetric eigensolve:
# tr (A B)^1/2 = tr (B^1/2 A B^1/2)^1/2.


def weighted_stats(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N,D] rows drawn ``w`` [N] times each."""
    n = float(w.sum())
    mu = w @ x / n
    xc = x - mu
    return mu, (xc.T * w) @ xc / max(n - 1.0, 1.0)


def _sqrtm_psd(cov: np.ndarray) -> np.ndarray:
    lam, vec = np.linalg.eigh(cov)
    return (vec * np.sqrt(lam.clip(min=0))) @ vec.T


def fd_to_sqrt(mu_a, cov_a, mu_b, cov_b, sqrt_b) -> float:
    """FD with the reference's covariance square root given (symmetric eigensolve, in
    the precision of ``sqrt_b``: float32 for replicates, float64 for point estimates)."""
    m = sqrt_b @ cov_a.astype(sqrt_b.dtype) @ sqrt_b
    eig = np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(eig).sum())


def image_weights(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw counts of an ordinary bootstrap over ``n`` independent images."""
    return np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)


def cluster_weights(clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw counts per image of a cluster bootstrap (every member of a drawn cluster
    counts as often as its cluster was drawn)."""
    ids, inverse = np.unique(clusters, return_inverse=True)
    drawn = np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))
    return drawn[inverse].astype(np.float64)


class ClusterMoments:
    """A feature set [N,D]'s sums per cluster about its mean, so the Gaussian statistics of
    any cluster-bootstrap replicate cost C d^2 instead of N d^2. ``inverse``: each row's
    cluster index (0..C-1)."""

    def __init__(self, x: np.ndarray, inverse: np.ndarray):
        x = np.asarray(x, dtype=np.float64)
        self.mu = x.mean(0)
        xc = x - self.mu
        n_clusters = int(inverse.max()) + 1
        self.sizes = np.bincount(inverse, minlength=n_clusters).astype(np.float64)
        self.sums = np.zeros((n_clusters, x.shape[1]))
        np.add.at(self.sums, inverse, xc)
        order = np.argsort(inverse, kind="stable")
        bounds = np.r_[0, np.cumsum(self.sizes.astype(np.int64))]
        self.outers = np.stack([xc[order[bounds[c]:bounds[c + 1]]].T
                                @ xc[order[bounds[c]:bounds[c + 1]]]
                                for c in range(n_clusters)])

    def stats(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance of the replicate that drew cluster c ``counts[c]``
        times."""
        n = float(counts @ self.sizes)
        d_mu = counts @ self.sums / n  # the mean's offset from the whole set's
        second = np.tensordot(counts, self.outers, 1) / n
        cov = (second - np.outer(d_mu, d_mu)) * n / max(n - 1.0, 1.0)
        return self.mu + d_mu, cov


class BootstrapReference:
    """A reference feature set [M,D] and its statistics under ``n_boot`` replicates,
    resampled by ``clusters`` (None: by image). ``fd(mu, cov, r)``: the FD of a row's
    statistics to replicate ``r`` (None: to the whole set)."""

    def __init__(self, feats: np.ndarray, clusters: np.ndarray | None, n_boot: int, seed: int):
        x = np.asarray(feats, dtype=np.float64)
        self.x = x
        mu, cov = weighted_stats(x, np.ones(len(x)))
        self.point = (mu, cov, _sqrtm_psd(cov))
        rng = np.random.default_rng(seed)
        self.weights = [cluster_weights(clusters, rng) if clusters is not None
                        else image_weights(len(x), rng) for _ in range(n_boot)]
        self._moments = None
        if clusters is not None and n_boot:  # per-cluster sums: a replicate costs C d^2, not N d^2
            _, inverse = np.unique(clusters, return_inverse=True)
            self._inverse = inverse
            self._moments = ClusterMoments(x, inverse)
        self.reps = [self._stats(w) for w in self.weights]
        self._moments = None  # only needed while the replicates are built

    def _stats(self, w: np.ndarray):
        if self._moments is not None:
            mu, cov = self._moments.stats(np.bincount(self._inverse, weights=w)
                                          / np.bincount(self._inverse))
        else:
            mu, cov = weighted_stats(self.x, w)
        # float32 keeps a thousand replicates of a 200-d space near 300 MB
        return mu, cov.astype(np.float32), _sqrtm_psd(cov).astype(np.float32)

    def fd(self, mu: np.ndarray, cov: np.ndarray, r: int | None = None) -> float:
        if r is None:
            mu_b, cov_b, sqrt_b = self.point
            return fd_to_sqrt(mu, cov, mu_b, cov_b.astype(np.float64), sqrt_b.astype(np.float64))
        return fd_to_sqrt(mu, cov, *self.reps[r])


def kid_kernels(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cubic polynomial kernel matrices k(a, a) [N,N] and k(a, b) [N,M]."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = a.shape[1]
    return (a @ a.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3


def kid_weighted(kaa: np.ndarray, kbb: np.ndarray, kab: np.ndarray, wa: np.ndarray,
                 wb: np.ndarray) -> float:
    """The unbiased MMD^2 of a resample given by draw counts (pairs of distinct draws of
    one image count k(x, x), as the U-statistic of the resample itself does)."""
    n, m = wa.sum(), wb.sum()
    aa = (wa @ kaa @ wa - (wa * np.diag(kaa)).sum()) / (n * (n - 1))
    bb = (wb @ kbb @ wb - (wb * np.diag(kbb)).sum()) / (m * (m - 1))
    return float(aa + bb - 2 * (wa @ kab @ wb) / (n * m))
