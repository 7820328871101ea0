"""What every pipeline stage shares: its log callable, its summary base, and table helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lance
import numpy as np

from hyperinf_ops.errors import DataError
from hyperinf_ops.store import LanceStore, sql_literal

__all__ = ["Log", "Summary", "drop_stale", "require_table", "sample_filter", "shard_filter"]

# `print`, a logger's `info`, Dagster's `context.log.info`: the core never prints by itself.
Log = Callable[[str], Any]


@dataclass
class Summary:
    """Base of every stage summary: plain data a person wants to see (counts, versions, timings), never
    tensors (the assets turn the fields into Dagster metadata)."""


def require_table(store: LanceStore, table: str, hint: str) -> lance.LanceDataset:
    """The table, or a DataError saying which step makes it."""
    if not store.exists(table):
        raise DataError(f"table {table!r} does not exist yet: {hint}")
    return store.open(table)


def shard_filter(shard: str) -> str:
    return f"shard = {sql_literal(shard)}"


def sample_filter(dataset: lance.LanceDataset, size: int, seed: int) -> str:
    """A filter selecting a seeded sample of `size` of the dataset's sample ids (all when fewer), drawn from the
    sorted ids so that the order of the rows does not matter."""
    ids = sorted(dataset.to_table(columns=["sample_id"])["sample_id"].to_pylist())
    chosen = sorted(np.random.default_rng(seed).choice(ids, size=min(size, len(ids)), replace=False))
    return f"sample_id IN ({', '.join(sql_literal(str(i)) for i in chosen)})"


def drop_stale(store: LanceStore, table: str, columns: list[str], keep: set[tuple[str, ...]], *,
               among: Callable[[tuple[str, ...]], bool] | None = None) -> list[str]:
    """Remove rows whose key (values of `columns`) is not in `keep`, one commit per key; returns the keys. `among`:
    only keys it accepts are considered (another stage owns the rest)."""
    if not store.exists(table):
        return []
    present = store.open(table).to_table(columns=columns).to_pandas().drop_duplicates()
    stale = [tuple(map(str, row)) for row in present.itertuples(index=False)
             if tuple(map(str, row)) not in keep and (among is None or among(tuple(map(str, row))))]
    for key in stale:
        store.replace_where(table, dict(zip(columns, key, strict=True)), [], unique=None)
    return ["/".join(key) for key in stale]
