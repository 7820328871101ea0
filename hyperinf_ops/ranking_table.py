"""The `scores` table's rows of one ranking: a score per example, its rank and percentile, written in one commit.

Every ranking the product stores (influence from the scan, the signals, fusion) goes through here, so rank 1 is
always the highest score (higher = keep: for influence `score = -I(k)`, more helpful), ties go to the smaller
sample_id, and a (target_set, method) is replaced whole or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hyperinf_ops.errors import NonFiniteGradientError
from hyperinf_ops.store import LanceStore, scores_schema

__all__ = ["ranking_table", "write_ranking"]


def _ranks(sample_ids: pa.Array, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rank 1 = highest score (ties: smaller sample_id first); percentile = (n - rank + 1) / n."""
    order = pc.sort_indices(
        pa.table({"score": scores, "sample_id": sample_ids}),
        sort_keys=[("score", "descending"), ("sample_id", "ascending")],
    ).to_numpy()
    n = len(scores)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    return rank, (n - rank + 1) / n


def ranking_table(sample_ids: pa.Array | Sequence[str], target_set: str, method: str, values: np.ndarray, *,
                  fingerprint: str, gradients_version: int, run_id: str, created_at: datetime) -> pa.Table:
    """One (target_set, method)'s `scores` rows: `values` (N,) as the score (higher = keep), with rank 1 = the
    highest (ties: smaller sample_id first) and percentile (n - rank + 1) / n."""
    sample_ids = pa.array(sample_ids, pa.string()) if not isinstance(sample_ids, pa.Array) else sample_ids
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(sample_ids) or not np.isfinite(values).all():
        raise NonFiniteGradientError(f"{target_set}/{method}: need {len(sample_ids)} finite scores")
    n = len(sample_ids)
    rank, percentile = _ranks(sample_ids, values)
    return pa.table(
        {
            "sample_id": sample_ids,
            "target_set": pa.repeat(pa.scalar(target_set, pa.string()), n),
            "method": pa.repeat(pa.scalar(method, pa.string()), n),
            "score": values,
            "rank": rank,
            "percentile": percentile,
            "fingerprint": pa.repeat(pa.scalar(fingerprint, pa.string()), n),
            "gradients_version": pa.repeat(pa.scalar(gradients_version, pa.int64()), n),
            "run_id": pa.repeat(pa.scalar(run_id, pa.string()), n),
            "created_at": pa.repeat(pa.scalar(created_at, pa.timestamp("us", tz="UTC")), n),
        },
        schema=scores_schema(),
    )


def write_ranking(store: LanceStore, table: pa.Table) -> int:
    """Replace one (target_set, method)'s rows of `scores` by `table` (a `ranking_table`) in one commit."""
    key = {"target_set": table["target_set"][0].as_py(), "method": table["method"][0].as_py()}
    return store.replace_where("scores", key, table)
