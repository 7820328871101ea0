"""Coverage of a target set's examples: each target example's most influential pool examples first.

The mean-target query (`score(k) = <v (G + lambda I)^-1, g_k>` with v the mean target gradient) ranks the pool
by what moves the target set's *average* loss, which the few directions where the warm-up is worst dominate: on
the LLM demo (docs/results.md section 8) HyperINF's 5% answered every target headline with politics, sports or
tech and none with business, and trained on it the model was worse than a random 5%. LESS (Xia et al. 2024)
scores each training example by its best match among the target set's subtasks; here every target example is
its own subtask:

    u_jk   = < q_j , row_k > / |row_k|     q_j: target example j's preconditioned gradient, |row_k| the stored
                                           row's norm (LESS's unit normalisation: a large gradient, such as a
                                           wrong answer, does not by itself make an example influential)
    p_jk   = the percentile of u_jk among the pool for target example j (1 = its most influential example)
    cover(k) = max_j p_jk + mean_j p_jk / (n + 1)

Sorting by `cover` is a round robin over the target examples: every target example's top-ranked pool example,
then every one's second, ...; a pool example is placed by the target example it serves best, and the mean
percentile only breaks ties inside a round (it is < 1 / n, one round's step). Percentiles, not raw values, so
that a target example with large gradients does not take every pick.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cover_scores"]


def cover_scores(influence: np.ndarray, row_norms: np.ndarray) -> np.ndarray:
    """influence: (n, m) <q_j, row_k> of n pool rows against m target examples' queries; row_norms: (n,) > 0.
    Returns (n,) float64 cover(k) of the module docstring: higher = placed earlier.

    One target example (column) at a time, so the memory beyond `influence` is a few (n,) vectors: the scan
    already holds n x m scores, and a 1M-row pool against 50 target examples is 400 MB of them in float64."""
    influence = np.asarray(influence)
    n, m = influence.shape
    if m == 0:
        raise ValueError("cover needs at least one target example")
    row_norms = np.asarray(row_norms, dtype=np.float64)
    if row_norms.shape != (n,) or not (row_norms > 0).all():
        raise ValueError(f"row_norms must be {n} positive values, got shape {row_norms.shape}")
    steps = np.arange(1, n + 1, dtype=np.float64) / n
    best, total, percentile = np.zeros(n), np.zeros(n), np.empty(n)
    for j in range(m):
        # percentile in the column: the lowest 1/n, the highest 1; ties get distinct ranks by row order
        percentile[np.argsort(influence[:, j] / row_norms, kind="stable")] = steps
        np.maximum(best, percentile, out=best)
        total += percentile
    return best + total / m / (n + 1)
