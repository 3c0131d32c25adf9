"""Davidson Bradley-Terry with a position (left/right) term, fitted by batched Newton.

For a pair shown with item ``a`` on the left and ``b`` on the right (log-strengths
``s``, position term ``h``, tie parameter ``log_nu``)::

    P(left wins)  = exp(s_a + h/2) / D
    P(right wins) = exp(s_b - h/2) / D
    P(tie)        = exp(log_nu + (s_a + s_b)/2) / D        (Davidson 1970)

``D`` normalises. ``h > 0`` means voters favour the left image. A small ridge
(``ridge * |theta|^2 / 2``, a weak Gaussian prior) keeps every estimate finite when an
item wins or loses all its games and, because the likelihood ignores a common shift of
``s``, makes the fitted strengths sum to zero. The log-likelihood is concave (a
multinomial logit, linear in the parameters), so Newton's method converges; the fit is
vectorised over a leading batch axis so that one call fits every bootstrap replicate.
Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEFT, RIGHT, TIE = 0, 1, 2
DEFAULT_RIDGE = 0.01


@dataclass(frozen=True)
class DavidsonFit:
    """Fitted parameters; batch-shaped arrays when the counts had a batch axis."""

    strength: np.ndarray   # (..., k) log-strengths, sum zero
    position: np.ndarray   # (...,) h: log-odds advantage of the left image
    log_tie: np.ndarray    # (...,) log nu
    converged: np.ndarray  # (...,) bool
    iterations: int


def design(k: int) -> np.ndarray:
    """Design tensor X (k*k pairs, 3 outcomes, k+2 params): eta = X @ theta."""
    x = np.zeros((k, k, 3, k + 2))
    for a in range(k):
        for b in range(k):
            x[a, b, LEFT, a] += 1.0
            x[a, b, LEFT, k] = 0.5
            x[a, b, RIGHT, b] += 1.0
            x[a, b, RIGHT, k] = -0.5
            x[a, b, TIE, a] += 0.5
            x[a, b, TIE, b] += 0.5
            x[a, b, TIE, k + 1] = 1.0
    return x.reshape(k * k, 3, k + 2)


def counts_tensor(left: np.ndarray, right: np.ndarray, outcome: np.ndarray, k: int,
                  groups: np.ndarray | None = None, n_groups: int = 1) -> np.ndarray:
    """Vote counts as an array (n_groups, k, k, 3) (or (k, k, 3) without ``groups``).

    Args:
        left, right: item index of the left / right image of each vote.
        outcome: LEFT, RIGHT or TIE per vote.
        groups: cluster index per vote (voter, prompt), for the cluster bootstrap.
    """
    g = np.zeros(len(left), dtype=int) if groups is None else np.asarray(groups, dtype=int)
    out = np.zeros((max(n_groups, 1), k, k, 3))
    np.add.at(out, (g, np.asarray(left, int), np.asarray(right, int), np.asarray(outcome, int)), 1.0)
    return out if groups is not None else out[0]


def probabilities(theta: np.ndarray, k: int) -> np.ndarray:
    """Outcome probabilities (..., k*k, 3) for parameters theta (..., k+2)."""
    x = design(k)
    eta = (theta @ x.reshape(-1, k + 2).T).reshape(*theta.shape[:-1], k * k, 3)
    eta -= eta.max(axis=-1, keepdims=True)
    e = np.exp(eta)
    return e / e.sum(axis=-1, keepdims=True)


def fit_davidson(counts: np.ndarray, ridge: float = DEFAULT_RIDGE, tol: float = 1e-9,
                 max_iter: int = 200, max_step: float = 3.0) -> DavidsonFit:
    """Maximum (penalised) likelihood fit of the Davidson model with a position term.

    Args:
        counts: (..., k, k, 3) counts [left item, right item, outcome]; may be fractional
            (expected counts, bootstrap weights).
        ridge: prior precision on every parameter (> 0 keeps estimates finite).
        tol: convergence when the largest Newton step is below ``tol``.
        max_step: largest change of any parameter in one Newton step (safeguard).
    Returns:
        A DavidsonFit; ``converged`` is False where ``max_iter`` was reached.
    """
    counts = np.asarray(counts, dtype=float)
    if counts.ndim < 3 or counts.shape[-1] != 3 or counts.shape[-2] != counts.shape[-3]:
        raise ValueError(f"counts must have shape (..., k, k, 3), got {counts.shape}")
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0 (it keeps estimates finite), got {ridge}")
    k = counts.shape[-2]
    batch = counts.shape[:-3]
    n_obs = counts.reshape(-1, k * k, 3)
    b = n_obs.shape[0]
    x = design(k)
    xf = x.reshape(-1, k + 2)                               # (m*3, p)
    p = k + 2
    n = n_obs.sum(axis=-1)  # (b, m)
    theta = np.zeros((b, p))
    converged = np.zeros(b, dtype=bool)
    eye = np.eye(p)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (reported as iterations)
        act = ~converged
        th = theta[act]
        prob = probabilities(th, k)                       # (a, m, 3)
        na = n[act]
        resid = n_obs[act] - na[..., None] * prob
        grad = resid.reshape(len(th), -1) @ xf - ridge * th
        xbar = (prob[..., None, :] @ x)[..., 0, :]  # (a, m, p): sum_o prob * x
        w = (na[..., None] * prob).reshape(len(th), -1)   # (a, m*3)
        info = ((w[..., None] * xf).transpose(0, 2, 1) @ xf
                - (na[..., None] * xbar).transpose(0, 2, 1) @ xbar) + ridge * eye
        try:
            step = np.linalg.solve(info, grad[..., None])[..., 0]
        except np.linalg.LinAlgError:  # a ridge below float precision of a huge count:
            step = (np.linalg.pinv(info) @ grad[..., None])[..., 0]  # the minimum-norm step
        big = np.abs(step).max(axis=-1, keepdims=True)
        step = step * np.minimum(1.0, max_step / np.maximum(big, 1e-300))
        theta[act] = th + step
        done = np.abs(step).max(axis=-1) < tol
        idx = np.flatnonzero(act)
        converged[idx[done]] = True
        if converged.all():
            break
    theta = theta.reshape(*batch, p)
    s = theta[..., :k]
    return DavidsonFit(strength=s - s.mean(axis=-1, keepdims=True), position=theta[..., k],
                       log_tie=theta[..., k + 1], converged=converged.reshape(batch),
                       iterations=it)


def log_likelihood(counts: np.ndarray, strength: np.ndarray, position: float,
                   log_tie: float) -> float:
    """Log-likelihood of (k, k, 3) counts under the given parameters (no ridge)."""
    k = counts.shape[-2]
    theta = np.concatenate([np.asarray(strength, float), [position, log_tie]])
    prob = probabilities(theta, k)
    c = counts.reshape(k * k, 3)
    return float((c * np.log(np.maximum(prob, 1e-300))).sum())
