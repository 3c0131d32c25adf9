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


def kid(a: np.ndarray, b: np.ndarray, max_n: int = 2000) -> float:
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


def bootstrap_p(boots: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the difference is 0": twice the smaller share of
    replicates on either side of 0 (at least 1 / (replicates + 1))."""
    boots = np.asarray(boots)
    below, above = np.mean(boots < 0), np.mean(boots > 0)
    return float(min(1.0, max(2 * min(below, above), 1.0 / (len(boots) + 1))))


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
