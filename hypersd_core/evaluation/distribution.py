"""Distances between feature sets, world-agnostic: Frechet distance, KID, precision / recall,
and cluster bootstrap draws.

- FD: Frechet distance of Gaussians fitted to the two sets (the FID formula).
- KID: unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018), averaged
  over subsets; unbiased at small n, unlike FD.
- Precision / recall of generative models (Kynkaanniemi et al. 2019): the fraction of
  generated samples inside the real manifold (k-NN balls of real samples) and the fraction
  of real samples inside the generated manifold.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = f.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def fd_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """|mu_a - mu_b|^2 + tr(A + B - 2 (AB)^1/2), tr (AB)^1/2 from AB's eigenvalues."""
    eig = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(eig).sum())


def fd(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to [N, D] and [M, D]."""
    return fd_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 20, subset_size: int = 500,
        seed: int = 0) -> float:
    """Kernel Inception Distance (x1000 is the usual scale; this returns the raw MMD^2)."""
    rng = np.random.default_rng(seed)
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                    + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals))


def _sqdist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None] - 2 * x @ y.T).clip(min=0)


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    d = _sqdist(x, x)
    return np.sqrt(np.sort(d, axis=1)[:, k])  # column 0 is the point itself


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) with k-NN manifolds (Kynkaanniemi et al. 2019)."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    r_real, r_fake = _radii(real, k), _radii(fake, k)
    d = np.sqrt(_sqdist(fake, real))  # [F, R]
    precision = float((d <= r_real[None]).any(1).mean())
    recall = float((d.T <= r_fake[None]).any(1).mean())
    return precision, recall


def cluster_draw(clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of one cluster bootstrap draw: whole clusters resampled with replacement."""
    ids, inverse = np.unique(clusters, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(ids))]
    picked = rng.integers(0, len(ids), len(ids))
    return np.concatenate([members[i] for i in picked])


def percentile_interval(values, level: float = 0.95) -> list[float]:
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64),
                           [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p)
    adj = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(p) - rank) * p[i])
        adj[i] = min(1.0, running)
    return adj.tolist()
