"""Frechet distance between Gaussians fitted to feature sets (FD / FID formula)."""

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
