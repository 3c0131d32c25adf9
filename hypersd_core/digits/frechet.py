"""Frechet distance between Gaussians fitted to feature sets (FD / FID formula); the
formula lives with the protocol's statistics (``protocol/stats.py``)."""

from hypersd_core.protocol.stats import fd, fd_from_stats, gaussian_stats

__all__ = ["fd", "fd_from_stats", "gaussian_stats"]
