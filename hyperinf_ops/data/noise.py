"""Planted label noise for the bundled datasets: exactly round(fraction * n) labels changed, each to one of the
other classes uniformly, with the truth kept (`flipped`, `true_label`) so a ranking's detection and a relabelled
export's corrections can be scored."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["flip_labels"]


def flip_labels(pool: pd.DataFrame, classes: Sequence[str], fraction: float, rng: np.random.Generator, *,
                column: str = "label", flag: str = "flipped", truth: str = "true_label") -> pd.DataFrame:
    """`pool` with round(fraction * n) seeded values of `column` moved to another of `classes` (uniformly), the
    given value kept as `truth` and `flag` marking the changed rows."""
    n = len(pool)
    flip = np.zeros(n, dtype=bool)
    flip[rng.choice(n, size=round(fraction * n), replace=False)] = True
    given = pool[column].to_numpy(dtype=object)
    values = given.copy()
    for i in np.flatnonzero(flip):
        others = [c for c in classes if c != values[i]]
        values[i] = others[int(rng.integers(len(others)))]
    return pool.assign(**{column: values, flag: flip, truth: given})


def true_labels(given: Sequence[object], flipped: Sequence[object], true_label: Sequence[object] | None,
                classes: Sequence[str]) -> list[str] | None:
    """The truth behind each given label of a pool with planted flips: its `true_label` column when there is one,
    else, with two classes, the other class for a flipped example and the given one otherwise; None when it cannot
    be known (several classes, no `true_label`)."""
    if true_label is not None:
        return [str(t) for t in true_label]
    if len(classes) != 2:
        return None
    other = {classes[0]: classes[1], classes[1]: classes[0]}
    return [other[str(g)] if f else str(g) for g, f in zip(given, flipped, strict=True)]
