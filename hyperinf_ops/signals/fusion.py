"""Rank fusion: one ranking from several, each counted by its rank rather than its scale.

For rankings s_1 .. s_M of the same N examples (every one oriented higher = keep), the fused score is the mean
rank percentile

    fused_k = (1/M) sum_m p_m(k),   p_m(k) = (average rank of s_m(k) among s_m, 1 = lowest) / N  in (0, 1]

so a loss (a few large values), a probability (in [0, 1]) and an influence (tiny, signed) weigh the same, and an
example every signal marks as harmful ends at the bottom. Ties share their average rank.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

__all__ = ["percentile_ranks", "rank_fusion"]


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """(N,) average rank / N of each value (1/N for the lowest, 1.0 for the highest; ties averaged)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or not len(values):
        raise ValueError(f"need a non-empty 1-d array, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("cannot rank non-finite values")
    return pd.Series(values).rank(method="average").to_numpy() / len(values)


def rank_fusion(rankings: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N,) mean of `percentile_ranks` over the rankings (name -> (N,) scores, same example order)."""
    if not rankings:
        raise ValueError("rank fusion needs at least one ranking")
    sizes = {name: len(np.asarray(v)) for name, v in rankings.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"rankings of different lengths: {sizes}")
    return np.mean([percentile_ranks(v) for v in rankings.values()], axis=0)
