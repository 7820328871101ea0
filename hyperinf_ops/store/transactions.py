"""Exactly-once writes to Lance tables: every write replaces one *key* in ONE commit.

The new rows are written as fragments first (nothing visible yet), then a single `Update` transaction removes
the key's old rows (whole fragments or deletion vectors) and adds the new fragments. Readers see the old key
or the new key, never a missing or doubled one; an exception while the data streams in commits nothing;
writers of different keys land concurrently (Lance rebases them), writers of the same key conflict and
retry.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterable, Iterator, Mapping

import lance
import pyarrow as pa
import pyarrow.compute as pc
from lance import LanceOperation
from lance.commit import CommitConflictError
from lance.fragment import FragmentMetadata, write_fragments

from hyperinf_ops.errors import DataError
from hyperinf_ops.location import is_object_store, lance_storage_options
from hyperinf_ops.store.schemas import TABLES, sql_literal

__all__ = ["Data", "LanceTables"]

MAX_ATTEMPTS = 64

Data = pa.Table | pa.RecordBatch | pa.RecordBatchReader | Iterable[pa.RecordBatch]


def _key_predicate(key: Mapping[str, str]) -> str:
    return " AND ".join(f"{col} = {sql_literal(val)}" for col, val in key.items())


def _same_fields(a: pa.Schema, b: pa.Schema) -> bool:
    return a.remove_metadata().equals(b.remove_metadata())


def _filterable(schema: pa.Schema) -> pa.Schema:
    """`schema` with `large_string` fields as `string`: DuckDB pushes a WHERE on a registered Lance dataset down
    as Substrait, which Lance cannot convert for large strings ("not yet supported by Substrait conversion"), and
    pandas 3 hands every text column over as large_string. Batches are cast to the stored schema on write."""
    return pa.schema([f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f for f in schema],
                     metadata=schema.metadata)


class _Guarded:
    """Wraps a batch stream: conforms each batch to the table schema and remembers the first error.

    Lance re-raises a Python exception from inside the reader as a generic OSError; keeping the original
    lets the caller see the real cause (and its type) after the write was abandoned.
    """

    def __init__(
        self, batches: Iterator[pa.RecordBatch], schema: pa.Schema, key: Mapping[str, str], unique: str | None
    ):
        self.batches, self.schema, self.key, self.unique = batches, schema, dict(key), unique
        self.error: BaseException | None = None
        self.rows = 0
        self._seen: set[str] = set()

    def _conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        names = set(batch.schema.names)
        for col, val in self.key.items():
            if col not in names:
                batch = batch.append_column(col, pa.repeat(pa.scalar(val, pa.string()), batch.num_rows))
            elif batch.num_rows and not pc.all(pc.equal(batch.column(col), val)).as_py():
                raise DataError(f"rows with {col} != {val!r} in a write of {col} = {val!r}")
        want = self.schema.names
        missing, extra = (
            sorted(set(want) - set(batch.schema.names)),
            sorted(set(batch.schema.names) - set(want)),
        )
        if missing or extra:
            raise DataError(f"columns differ from the table: missing {missing}, extra {extra}")
        batch = batch.select(want)
        if not _same_fields(batch.schema, self.schema):
            batch = batch.cast(self.schema)
        if self.unique is not None:
            dup = []
            for value in batch.column(self.unique).to_pylist():
                if value in self._seen:
                    dup.append(value)
                self._seen.add(value)
            if dup:
                raise DataError(f"duplicate {self.unique} in one write: {sorted(set(dup))[:5]}")
        return batch

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            for batch in self.batches:
                batch = self._conform(batch)
                self.rows += batch.num_rows
                yield batch
        except BaseException as err:
            self.error = err
            raise


def _iter_batches(data: Data) -> Iterator[pa.RecordBatch]:
    if isinstance(data, pa.Table):
        yield from data.to_batches()
    elif isinstance(data, pa.RecordBatch):
        yield data
    else:
        yield from data


class LanceTables:
    """Lance tables under `<root>/lance/<name>.lance` (root: local path or `s3://bucket/prefix`).

    `storage_options` default to the S3 settings of the environment for an object-store root
    (`location.lance_storage_options`)."""

    def __init__(self, root: str, storage_options: dict[str, str] | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.storage_options = storage_options if storage_options is not None else lance_storage_options(self.root)

    @property
    def remote(self) -> bool:
        """Whether the tables live on an object store (no local files: no DuckDB copy, no mapped reads)."""
        return is_object_store(self.root)

    # ------------------------------------------------------------------ tables and versions
    def uri(self, table: str) -> str:
        return f"{self.root}/lance/{table}.lance"

    def exists(self, table: str) -> bool:
        try:
            self.open(table)
        except ValueError:  # lance: "Dataset at path ... was not found"
            return False
        return True

    def open(self, table: str, version: int | None = None) -> lance.LanceDataset:
        """The Lance dataset of `table`, at `version` (time travel) or the latest."""
        return lance.dataset(self.uri(table), version=version, storage_options=self.storage_options)

    def versions(self) -> dict[str, int]:
        """Latest Lance version of every existing table."""
        return {t: self.open(t).version for t in TABLES if self.exists(t)}

    def _ensure_table(self, table: str, schema: pa.Schema) -> lance.LanceDataset:
        """Open `table`, creating it empty with `schema` first (large strings stored as strings, see
        `_filterable`); concurrent first writers all succeed."""
        if not self.exists(table):
            schema = _filterable(schema)
            try:
                lance.write_dataset(
                    schema.empty_table(),
                    self.uri(table),
                    schema=schema,
                    mode="create",
                    storage_options=self.storage_options,
                )
            except OSError:
                # Another writer created it first ("already exists", or a retryable commit conflict when
                # both creations reached the commit together): fine, use theirs. Anything else re-raises.
                if not self.exists(table):
                    raise
        ds = self.open(table)
        if not _same_fields(ds.schema, schema):
            have = {f.name: str(f.type) for f in ds.schema}
            want = {f.name: str(f.type) for f in schema}
            diff = {
                n: (have.get(n), want.get(n))
                for n in sorted(set(have) | set(want))
                if have.get(n) != want.get(n)
            }
            raise DataError(f"table {table!r} exists with another schema; column: (table, new rows) = {diff}")
        return ds

    # ------------------------------------------------------------------ exactly-once replace
    def replace_shard(self, table: str, shard: str, data: Data, *, schema: pa.Schema | None = None) -> int:
        """Replace every row of `shard` in `table` by `data` in one commit. Returns the new table version.

        `data` (Table, RecordBatch, RecordBatchReader or iterable of batches) may omit the `shard` column.
        `schema` is needed only when the table does not exist yet (default: the first batch's schema).
        """
        return self.replace_where(table, {"shard": shard}, data, schema=schema)

    def replace_where(
        self,
        table: str,
        predicate: Mapping[str, str],
        data: Data,
        *,
        schema: pa.Schema | None = None,
        also_delete: str | None = None,
        unique: str | None = "sample_id",
    ) -> int:
        """Replace the rows where every `column = value` of `predicate` holds by `data`, in ONE commit.

        The predicate is a mapping (e.g. {"target_set": "sst2", "method": "hyperinf"}), never free SQL, so the
        new rows can be checked to fall under it (missing key columns are filled in). `also_delete`: an extra
        Lance filter of rows removed in the same commit. `unique`: a column that must not repeat in `data`.
        Returns the new table version; on any exception nothing is committed.
        """
        batches = _iter_batches(data)
        first = next(batches, None)
        if schema is None:
            if self.exists(table):
                schema = self.open(table).schema
            elif first is None:
                raise DataError(f"no rows and no schema to create table {table!r}")
            else:
                schema = first.schema
                for col in predicate:
                    if col not in schema.names:
                        schema = schema.append(pa.field(col, pa.string(), nullable=False))
        ds = self._ensure_table(table, schema)
        stream = itertools.chain([] if first is None else [first], batches)
        guarded = _Guarded(stream, ds.schema, predicate, unique if unique in ds.schema.names else None)
        reader = pa.RecordBatchReader.from_batches(ds.schema, iter(guarded))
        try:
            frags = write_fragments(
                reader, self.uri(table), schema=ds.schema, storage_options=self.storage_options
            )
        except BaseException:
            if guarded.error is not None:
                raise guarded.error from None
            raise
        key_pred = _key_predicate(predicate)
        delete_pred = key_pred if also_delete is None else f"({key_pred}) OR ({also_delete})"
        version = self._commit_update(table, delete_pred, frags, only=None)
        self._drop_concurrent_duplicates(table, key_pred, frags, version, guarded.rows)
        return version

    def _matching_fragments(self, ds: lance.LanceDataset, predicate: str) -> list[int]:
        hits = ds.scanner(columns=[], filter=predicate, with_row_address=True).to_table()
        # A row address is (fragment id << 32) | offset.
        return sorted(set(pc.shift_right(hits["_rowaddr"], 32).to_pylist()))

    def _commit_update(
        self, table: str, predicate: str, new: list[FragmentMetadata], only: set[int] | None
    ) -> int:
        """Commit Update(delete `predicate` rows [in fragments `only`], add `new`), retrying on conflicts."""
        for attempt in range(MAX_ATTEMPTS):
            ds = self.open(table)
            removed, updated = [], []
            for fid in self._matching_fragments(ds, predicate):
                if only is not None and fid not in only:
                    continue
                frag = ds.get_fragment(fid).delete(predicate)
                if frag is None:
                    removed.append(fid)
                else:
                    updated.append(frag)
            if not (removed or updated or new):
                return ds.version
            op = LanceOperation.Update(
                removed_fragment_ids=removed, updated_fragments=updated, new_fragments=new
            )
            try:
                return lance.LanceDataset.commit(
                    self.uri(table), op, read_version=ds.version, storage_options=self.storage_options
                ).version
            except CommitConflictError:
                # Another writer touched the same fragments (same key, or a compaction): redo on its version.
                time.sleep(min(1.0, 0.01 * 2 ** min(attempt, 6)) * random.random())
        raise CommitConflictError(
            f"gave up replacing rows of {table!r} after {MAX_ATTEMPTS} commit conflicts"
        )

    def _drop_concurrent_duplicates(
        self, table: str, key_pred: str, mine: list[FragmentMetadata], version: int, rows: int
    ) -> None:
        """Two writers of the same *new* key both only append, so Lance sees no conflict and both land.

        At our commit version every other row of the key was committed after our read (ours deleted the
        rest): drop those, so the last committer wins. A later committer will drop ours the same way.
        """
        at = self.open(table, version)
        if at.count_rows(filter=key_pred) == rows:
            return
        my_files = {f.path for frag in mine for f in frag.files}
        others = {
            frag.fragment_id
            for frag in at.get_fragments()
            if not my_files.intersection(f.path for f in frag.metadata.files)
        }
        self._commit_update(table, key_pred, [], only=others)
