"""Stage: the candidate pool (one shard per data file) and the target sets, validated into Lance.

A shard is written only when its prepared content differs from what `examples` holds (`table_digest`), so
re-running an unchanged pool writes nothing. Every set is validated before any is written.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from hyperinf_ops.data.io import read_table
from hyperinf_ops.data.prepare import prepare_examples, prepare_targets, table_digest
from hyperinf_ops.errors import DataError
from hyperinf_ops.stages.common import Log, Summary, drop_stale, require_table, shard_filter
from hyperinf_ops.store import LanceStore, sql_literal

__all__ = ["IngestSummary", "TargetsSummary", "ingest_shard", "ingest_targets", "prepare_shard",
           "stored_digest"]


@dataclass
class IngestSummary(Summary):
    shard: str
    rows: int
    written: bool  # False: the stored rows already held this content
    digest: str  # table_digest of the shard's prepared rows (its data version)
    dropped_duplicates: int  # same content twice in this file (no id column)
    dropped_in_other_shards: int  # same content already ingested from another shard
    columns: list[str]
    examples_version: int
    seconds: float


@dataclass
class TargetsSummary(Summary):
    rows: dict[str, int]  # target set -> examples
    written: list[str]  # sets whose rows changed
    removed_sets: list[str]  # sets of an earlier config, no longer configured
    digest: str  # over every set's table_digest
    targets_version: int
    seconds: float


def prepare_shard(store: LanceStore, shard: str, path: str | Path, data: Any, task: str) -> tuple[pa.Table, int, int]:
    """The shard's rows as they would be written: (table, duplicates dropped, examples owned by other shards).

    An example whose content (no id column) was already ingested from another shard is dropped here; with an
    id column, an id used by another shard is a DataError."""
    df = read_table(path)
    table = prepare_examples(df, data, task, shard, source=f"pool file {Path(path).name}")
    elsewhere = _ids_in_other_shards(store, shard, table["sample_id"])
    if elsewhere and data.id_column is not None:
        raise DataError(f"shard {shard!r}: ids also used by other shards: {sorted(elsewhere)[:5]} "
                        f"({len(elsewhere)} in all); ids must be unique across the pool")
    if elsewhere:
        table = table.filter(pc.invert(pc.is_in(table["sample_id"], pa.array(sorted(elsewhere)))))
        if table.num_rows == 0:
            raise DataError(f"shard {shard!r}: every example was already ingested from another shard")
    return table, len(df) - table.num_rows - len(elsewhere), len(elsewhere)


def stored_digest(store: LanceStore, shard: str) -> str | None:
    """table_digest of the rows `examples` holds for the shard, None when it holds none."""
    if not store.exists("examples"):
        return None
    rows = store.open("examples").to_table(filter=shard_filter(shard))
    return table_digest(rows) if rows.num_rows else None


def ingest_shard(store: LanceStore, shard: str, path: str | Path, data: Any, task: str,
                 log: Log = print) -> IngestSummary:
    """Read, validate and id one pool file; replace that shard's rows of `examples` in one commit unless
    they already hold exactly this content."""
    start = time.perf_counter()
    table, dropped_here, elsewhere = prepare_shard(store, shard, path, data, task)
    digest = table_digest(table)
    written = digest != stored_digest(store, shard)
    version = store.write_examples(shard, table) if written else store.open("examples").version
    summary = IngestSummary(shard=shard, rows=table.num_rows, written=written, digest=digest,
                            dropped_duplicates=dropped_here, dropped_in_other_shards=elsewhere,
                            columns=table.column_names, examples_version=version,
                            seconds=time.perf_counter() - start)
    log(f"shard {shard}: {summary.rows} examples ({dropped_here} duplicate rows dropped, {elsewhere} already in "
        f"other shards), " + (f"written, examples v{version}" if written else "unchanged"))
    return summary


def _ids_in_other_shards(store: LanceStore, shard: str, ids: pa.ChunkedArray) -> set[str]:
    if not store.exists("examples"):
        return set()
    others = store.open("examples").to_table(columns=["sample_id"], filter=f"shard != {sql_literal(shard)}")
    return set(pc.filter(ids, pc.is_in(ids, others["sample_id"])).to_pylist())


def ingest_targets(store: LanceStore, targets: Mapping[str, Any], data: Any, task: str,
                   log: Log = print) -> TargetsSummary:
    """Validate every configured target set against the ingested pool, then write each that changed (one
    commit per set). Target sets of an earlier config that are no longer configured are removed."""
    start = time.perf_counter()
    pool = require_table(store, "examples", "ingest the pool first").to_table()
    prepared = prepare_targets(targets, data, task, pool)  # every set validated before any is written
    written = []
    for name, table in prepared.items():
        current = store.open("targets").to_table(filter=f"target_set = {sql_literal(name)}") \
            if store.exists("targets") else None
        if current is None or current.num_rows == 0 or table_digest(current) != table_digest(table):
            store.write_targets(name, table)
            written.append(name)
    removed = drop_stale(store, "targets", ["target_set"], {(name,) for name in prepared})
    digests = {name: table_digest(table) for name, table in prepared.items()}
    summary = TargetsSummary(rows={n: t.num_rows for n, t in prepared.items()}, written=written, removed_sets=removed,
                             digest=hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest(),
                             targets_version=store.open("targets").version, seconds=time.perf_counter() - start)
    log(f"target sets {summary.rows}: " + (f"written {written}" if written else "unchanged")
        + (f"; removed {removed}" if removed else "") + f", targets v{summary.targets_version}")
    return summary
