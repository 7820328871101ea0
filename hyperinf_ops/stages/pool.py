"""Stage: the candidate pool (one shard per data file) and the target sets, validated into Lance.

A shard is written only when its prepared content differs from what `examples` holds (`table_digest`), so
re-running an unchanged pool writes nothing. Every set is validated before any is written.

A shard whose pool file is gone (deleted or renamed) is removed: its gradient rows, curvature sums and examples
(`drop_shard`). Its rows never block another file: the checks across shards ignore gone shards, and an ingest
first removes the gone shards that hold any of its ids (the others are removed by their own partition's run).
A renamed file is the same content under a new shard key: when the
new shard has no gradient rows yet, the ingest first moves the gone shard's rows and sums that share the most
content with it to the new key (`adopt_rows`), so the gradient step keeps them by content (a pure rename is
current at once) instead of computing them again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from collections.abc import Collection, Iterator, Mapping
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

__all__ = ["IngestSummary", "TargetsSummary", "adopt_rows", "drop_shard", "gone_shards", "ingest_shard",
           "ingest_targets", "prepare_shard", "stored_digest"]

# Tables keyed by shard, in the order a shard is removed: its examples last, so that a removal cut short still
# lists the shard as gone (it has rows but no file) and the next run finishes it.
_SHARD_TABLES = ("gradients", "example_outputs", "curvature", "examples")


@dataclass
class IngestSummary(Summary):
    shard: str
    rows: int
    written: bool  # False: the stored rows already held this content
    digest: str  # table_digest of the shard's prepared rows (its data version)
    dropped_duplicates: int  # same content twice in this file (no id column)
    dropped_in_other_shards: int  # same content already ingested from another shard
    removed_shards: list[str]  # shards whose file is gone that held ids of this one, removed before it was written
    adopted_from: str | None  # the gone shard whose gradient rows and sums this shard took over (a rename)
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


def prepare_shard(store: LanceStore, shard: str, path: str | Path, data: Any, task: str, *,
                  gone: Collection[str] = ()) -> tuple[pa.Table, int, int]:
    """The shard's rows as they would be written: (table, duplicates dropped, examples owned by other shards).

    An example whose content (no id column) was already ingested from another shard is dropped here; with an
    id column, an id used by another shard is a DataError. Rows of `gone` shards (no pool file any more) count
    as removed."""
    df = read_table(path, data.verbatim_columns, data.integer_columns)
    table = prepare_examples(df, data, task, shard, source=f"pool file {Path(path).name}")
    elsewhere = _ids_in_other_shards(store, [shard, *gone], table["sample_id"])
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
                 log: Log = print, *, files: Collection[str] | None = None) -> IngestSummary:
    """Read, validate and id one pool file; replace that shard's rows of `examples` in one commit unless
    they already hold exactly this content. `files`: the shard keys that have a pool file now; every other
    stored shard is gone, and those holding any of this shard's ids are removed first (adopted when this one is
    that file renamed: the module docstring)."""
    start = time.perf_counter()
    gone = gone_shards(store, files) if files is not None else []
    table, dropped_here, elsewhere = prepare_shard(store, shard, path, data, task, gone=gone)
    if gone and store.exists("examples"):
        ids = store.open("examples").to_table(
            columns=["shard", "sample_id"], filter=f"shard IN ({', '.join(sql_literal(g) for g in gone)})")
        gone = sorted(set(pc.filter(ids["shard"], pc.is_in(ids["sample_id"], table["sample_id"])).to_pylist()))
    adopted = adopt_rows(store, shard, table, gone) if gone else None
    for other in gone:
        drop_shard(store, other)
    digest = table_digest(table)
    written = digest != stored_digest(store, shard)
    version = store.write_examples(shard, table) if written else store.open("examples").version
    store.record_input_columns(table)  # also for unchanged rows: a store written before the types were kept
    summary = IngestSummary(shard=shard, rows=table.num_rows, written=written, digest=digest,
                            dropped_duplicates=dropped_here, dropped_in_other_shards=elsewhere, removed_shards=gone,
                            adopted_from=adopted, columns=table.column_names, examples_version=version,
                            seconds=time.perf_counter() - start)
    log(f"shard {shard}: {summary.rows} examples ({dropped_here} duplicate rows dropped, {elsewhere} already in "
        f"other shards), " + (f"written, examples v{version}" if written else "unchanged")
        + (f"; removed shards without a file {gone}" if gone else "")
        + (f"; gradient rows of {adopted} taken over" if adopted else ""))
    return summary


def gone_shards(store: LanceStore, files: Collection[str]) -> list[str]:
    """The shards some table holds rows of that have no pool file among `files` (deleted or renamed), sorted."""
    stored: set[str] = set()
    for table in _SHARD_TABLES:
        if store.exists(table):
            stored |= set(pc.unique(store.open(table).to_table(columns=["shard"])["shard"]).to_pylist())
    return sorted(stored - set(files))


def drop_shard(store: LanceStore, shard: str) -> None:
    """Remove the shard's gradient rows, curvature sums and examples (one commit each, examples last)."""
    for table in _SHARD_TABLES:
        if store.exists(table) and store.open(table).count_rows(shard_filter(shard)):
            store.replace_where(table, {"shard": shard}, [], unique=None)


def adopt_rows(store: LanceStore, shard: str, table: pa.Table, gone: Collection[str]) -> str | None:
    """Move the gradient rows (with their example outputs) and curvature sums of the gone shard sharing the most (sample_id, content_hash)
    pairs with `table` (the shard's prepared rows) to `shard`, one commit per table, when `shard` has none of its
    own; returns that shard, None when nothing moved. The gradient step then keeps the rows by content and
    updates the sums for what differs: the sums are over pairs, whatever the shard's name."""
    if not (store.exists("gradients") and store.exists("curvature")) or \
            store.open("gradients").count_rows(shard_filter(shard)) or \
            store.open("curvature").count_rows(shard_filter(shard)):
        return None
    pairs = set(zip(table["sample_id"].to_pylist(), table["content_hash"].to_pylist(), strict=True))
    stored = store.open("gradients").to_table(columns=["shard", "sample_id", "content_hash"],
                                              filter=f"shard IN ({', '.join(sql_literal(g) for g in gone)})")
    shared = collections.Counter(s for s, i, h in zip(*(stored[c].to_pylist() for c in stored.column_names),
                                                      strict=True) if (i, h) in pairs)
    if not shared:
        return None
    source = min(shared, key=lambda s: (-shared[s], s))
    for name in ("gradients", "example_outputs", "curvature"):
        if not store.exists(name):
            continue
        ds = store.open(name)
        store.replace_where(name, {"shard": shard}, _relabeled(ds, source, shard),
                            also_delete=shard_filter(source), unique=None)
    return source


def _relabeled(ds: Any, source: str, shard: str) -> Iterator[pa.RecordBatch]:
    """The dataset's rows of shard `source`, as stored, with `shard` in their shard column."""
    for batch in ds.to_batches(filter=shard_filter(source)):
        column = batch.schema.get_field_index("shard")
        yield batch.set_column(column, "shard", pa.repeat(pa.scalar(shard, pa.string()), batch.num_rows))


def _ids_in_other_shards(store: LanceStore, exclude: Collection[str], ids: pa.ChunkedArray) -> set[str]:
    """The ids in `ids` that `examples` holds for shards other than `exclude`."""
    if not store.exists("examples"):
        return set()
    others = store.open("examples").to_table(
        columns=["sample_id"], filter=f"shard NOT IN ({', '.join(sql_literal(s) for s in exclude)})")
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
