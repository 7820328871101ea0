"""Typed readers and writers of hyperinf's tables: examples, targets, gradient rows, curvature sums,
prepared preconditioners, queries (scores are written by the scorer through `replace_where`)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from hyperinf_ops.core.curvature import CurvaturePartial
from hyperinf_ops.errors import DataError, GradientMismatchError, NonFiniteGradientError
from hyperinf_ops.fingerprint import Fingerprint, require_match
from hyperinf_ops.store.fingerprints import FingerprintedTables
from hyperinf_ops.store.schemas import (
    INPUT_COLUMNS_KEY,
    curvature_schema,
    example_outputs_schema,
    gradients_schema,
    json_safe,
    label_signals_schema,
    queries_schema,
    sql_literal,
    target_gradients_schema,
)
from hyperinf_ops.store.transactions import Data

__all__ = ["GradientBatch", "LanceStore", "Query"]


@dataclass
class GradientBatch:
    """Rows for the gradients table. grad: (n, width) float32 rows (every matrix's block, raw, sketched or
    whitened, sorted names), stored in the fingerprint's row format; sq_norms: (n, L) of the blocks;
    content_hashes: (n,) the examples' content hashes (None: unknown, the rows are never reused by content)."""

    sample_ids: Sequence[str]
    grad: Tensor | np.ndarray
    sq_norms: Tensor | np.ndarray
    content_hashes: Sequence[str] | None = None


@dataclass
class Query:
    """A preconditioned target vector laid out like the (decoded) rows. vector: (width,); fingerprint: digest of
    the gradient rows it fits."""

    target_set: str
    method: str
    vector: Tensor
    fingerprint: str
    diagnostics: dict[str, Any] = field(default_factory=dict)


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _fixed_list(values: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    n, width = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), width)


class LanceStore(FingerprintedTables):
    """hyperinf's tables under `<root>/lance/<name>.lance` (root: local path or object-store URI)."""

    def write_examples(self, shard: str, data: Data) -> int:
        """Pool examples of one shard: sample_id, text (or prompt/response), label, content_hash, extras."""
        return self.replace_shard("examples", shard, data)

    def record_input_columns(self, prepared: pa.Table) -> None:
        """Keep the input column names and types of a prepared shard (`schemas.input_columns`) in the schema
        metadata of `examples` (one commit, only when they changed): the export restores the label's type from
        them. Shards of one pool share their types; when they do not, the last ingested shard's are kept."""
        recorded = (prepared.schema.metadata or {}).get(INPUT_COLUMNS_KEY.encode())
        if recorded and self.exists("examples"):
            self.set_schema_metadata("examples", INPUT_COLUMNS_KEY, recorded.decode())

    def write_targets(self, target_set: str, data: Data) -> int:
        """Examples of one target set (replaces that set's rows): sample_id, text columns, label."""
        return self.replace_where("targets", {"target_set": target_set}, data)

    def write_gradients(
        self,
        shard: str,
        batches: GradientBatch | Iterable[GradientBatch],
        fingerprint: Fingerprint,
        *,
        overwrite: bool = False,
        kept: Iterable[pa.RecordBatch] = (),
    ) -> int:
        """Replace one shard's gradient rows (streamed batch by batch) in one commit. Returns the version.

        Each batch's float32 rows are stored in the fingerprint's row format (row_format.py: float16 with a
        per-row scale, int8 / int4 codes with a per-block scale). `kept`: rows of this table, as stored, carried
        into the new shard unchanged (an incremental pass keeps the rows of unchanged examples); they must carry
        this fingerprint. Refuses rows of another width, non-finite values, no rows at all, and rows of another
        fingerprint unless overwrite=True.
        """
        items = iter([batches] if isinstance(batches, GradientBatch) else batches)
        first = next(items, None)
        fmt = fingerprint.row_format
        dim, n_mat = fmt.width, len(fmt.blocks)
        if first is not None and _to_numpy(first.grad).shape[1] != dim:
            raise DataError(f"gradient rows have {_to_numpy(first.grad).shape[1]} floats, the fingerprint says {dim}")
        schema = gradients_schema(fmt)
        digest = fingerprint.digest()

        def record_batches() -> Iterator[pa.RecordBatch]:
            rows = 0
            for batch in kept:
                if batch.num_rows and not pc.all(pc.equal(batch.column("fingerprint"), digest)).as_py():
                    raise DataError(f"kept gradient rows of shard {shard!r} carry another fingerprint than {digest}")
                rows += batch.num_rows
                yield batch
            for item in itertools.chain([] if first is None else [first], items):
                sq = _to_numpy(item.sq_norms).astype(np.float32)
                n = len(item.sample_ids)
                grad = np.ascontiguousarray(_to_numpy(item.grad), dtype=np.float32)
                hashes = item.content_hashes
                if grad.shape != (n, dim) or sq.shape != (n, n_mat) or (hashes is not None and len(hashes) != n):
                    raise DataError(
                        f"batch shapes grad {grad.shape}, sq_norms {sq.shape} for {n} ids; "
                        f"expected ({n}, {dim}) and ({n}, {n_mat})"
                        + ("" if hashes is None else f", {len(hashes)} content hashes")
                    )
                try:
                    encoded = fmt.encode(grad)
                except NonFiniteGradientError as err:
                    raise NonFiniteGradientError(f"{err} in shard {shard!r}") from None
                if not np.isfinite(sq).all():
                    raise NonFiniteGradientError(f"non-finite gradient norms in shard {shard!r}")
                scales = ([_fixed_list(encoded.block_scales, pa.float32())]
                          if encoded.block_scales is not None else [])
                yield pa.record_batch(
                    [
                        pa.array(list(map(str, item.sample_ids)), pa.string()),
                        pa.repeat(pa.scalar(shard, pa.string()), n),
                        pa.array(hashes, pa.string()) if hashes is not None else pa.nulls(n, pa.string()),
                        _fixed_list(encoded.values, fmt.value_type),
                        pa.array(encoded.grad_scale, pa.float32()),
                        *scales,
                        _fixed_list(sq, pa.float32()),
                        pa.repeat(pa.scalar(digest, pa.string()), n),
                    ],
                    schema=schema,
                )
                rows += n
            if rows == 0:
                raise DataError(f"no gradient rows for shard {shard!r}")

        return self._guarded_write(
            "gradients", {"shard": shard}, record_batches(), schema, fingerprint, overwrite
        )

    def write_example_outputs(self, shard: str, data: Data, fingerprint: Fingerprint) -> int:
        """Replace one shard's example outputs (schemas.example_outputs_schema; rows of another fingerprint are
        removed in the same commit). Returns the version."""
        return self._guarded_write("example_outputs", {"shard": shard}, data, example_outputs_schema(), fingerprint,
                                   overwrite=True)

    def write_label_signal(self, signal: str, target_set: str, sample_ids: Sequence[str], values: np.ndarray, *,
                           source: str, probs: np.ndarray | None = None, issues: np.ndarray | None = None) -> int:
        """Replace the rows of one (signal, target set) of `label_signals` (schemas.label_signals_schema) in one
        commit: values (N,) higher = keep, optional probabilities (N, C) and issue flags (N,). Returns the version."""
        from datetime import UTC, datetime

        n = len(sample_ids)
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n,) or not np.isfinite(values).all():
            raise DataError(f"signal {signal!r}: need {n} finite values, got shape {values.shape}")
        table = pa.table({
            "sample_id": pa.array(list(map(str, sample_ids)), pa.string()),
            "signal": pa.repeat(pa.scalar(signal, pa.string()), n),
            "target_set": pa.repeat(pa.scalar(target_set, pa.string()), n),
            "value": pa.array(values, pa.float64()),
            "probs": pa.array(list(np.asarray(probs, dtype=np.float32)), pa.list_(pa.float32()))
            if probs is not None else pa.nulls(n, pa.list_(pa.float32())),
            "issue": pa.array(np.asarray(issues, dtype=bool)) if issues is not None else pa.nulls(n, pa.bool_()),
            "source": pa.repeat(pa.scalar(source, pa.string()), n),
            "created_at": pa.repeat(pa.scalar(datetime.now(UTC), pa.timestamp("us", tz="UTC")), n),
        }, schema=label_signals_schema())
        return self.replace_where("label_signals", {"signal": signal, "target_set": target_set}, table,
                                  schema=label_signals_schema())

    def read_label_signal(self, signal: str, target_set: str) -> pa.Table:
        """The stored rows of one (signal, target set) of `label_signals` (empty when none)."""
        if not self.exists("label_signals"):
            return label_signals_schema().empty_table()
        return self.open("label_signals").to_table(
            filter=f"signal = {sql_literal(signal)} AND target_set = {sql_literal(target_set)}")

    def write_curvature(
        self,
        shard: str,
        partials: Mapping[str, CurvaturePartial],
        fingerprint: Fingerprint,
        *,
        examples_digest: str,
        rows_digest: str | None = None,
        overwrite: bool = False,
    ) -> int:
        """Replace one shard's curvature sums (one row per LoRA matrix) in one commit; `examples_digest` is the
        `content_digest` of the examples the pass covered (non-finite ones included), `rows_digest` that of the
        gradient rows summed (None: unknown)."""
        schema = curvature_schema()
        digest = fingerprint.digest()

        def record_batches() -> Iterator[pa.RecordBatch]:
            for name in sorted(partials):
                p = partials[name]
                full = (
                    None if p.full_sum is None else [p.full_sum.detach().cpu().double().reshape(-1).numpy()]
                )
                yield pa.record_batch(
                    {
                        "shard": [shard],
                        "matrix": [name],
                        "gfim_sum": [p.gfim_sum.detach().cpu().double().reshape(-1).numpy()],
                        "sq_sum": [float(p.sq_sum)],
                        "count": [int(p.count)],
                        "numel": [int(p.numel)],
                        "d": [int(p.gfim_sum.shape[0])],
                        "full_sum": full if full is not None else pa.nulls(1, pa.list_(pa.float64())),
                        "examples_digest": [examples_digest],
                        "rows_digest": pa.array([rows_digest], pa.string()),
                        "fingerprint": [digest],
                    },
                    schema=schema,
                )

        return self._guarded_write(
            "curvature", {"shard": shard}, record_batches(), schema, fingerprint, overwrite
        )

    def read_curvature(
        self, fingerprint: Fingerprint, version: int | None = None, *, shard: str | None = None
    ) -> dict[str, CurvaturePartial]:
        """Curvature merged over every shard (or only `shard`'s sums): name -> CurvaturePartial. Refuses rows of
        other fingerprints.

        Streams a few matrices' rows at a time, in sorted shard order (so the sums are the same as a merge of
        all shards at once): memory holds the merged sums and a few (d, d) rows, whatever the number of shards
        (reading a shard's rows at once held three copies of a shard: +1.6 GB for SmolLM2's 120 matrices)."""
        self.check_fingerprint("curvature", fingerprint, version)
        ds = self.open("curvature", version)
        shards = sorted(pc.unique(ds.to_table(columns=["shard"])["shard"]).to_pylist())
        if shard is not None:
            shards = [s for s in shards if s == shard]
        if not shards:
            raise DataError("the curvature table has no rows")

        def square(values: pa.ListScalar, side: int) -> Tensor | None:
            if not values.is_valid:
                return None
            return torch.from_numpy(values.values.to_numpy(zero_copy_only=False).copy()).reshape(side, side)

        merged: dict[str, CurvaturePartial] = {}
        for index, shard in enumerate(shards):
            seen = set()
            for rows in ds.to_batches(filter=f"shard = {sql_literal(shard)}", batch_size=4):
                for i in range(rows.num_rows):
                    name = rows["matrix"][i].as_py()
                    part = CurvaturePartial(
                        gfim_sum=square(rows["gfim_sum"][i], rows["d"][i].as_py()), sq_sum=rows["sq_sum"][i].as_py(),
                        count=rows["count"][i].as_py(), numel=rows["numel"][i].as_py(),
                        full_sum=square(rows["full_sum"][i], rows["numel"][i].as_py()))
                    seen.add(name)
                    if name in merged:
                        merged[name] = merged[name].merge(part)
                    elif index == 0:  # the first shard names the matrices every other shard must have
                        merged[name] = part
            if seen != set(merged):
                missing, extra = sorted(set(merged) - seen), sorted(seen - set(merged))
                raise GradientMismatchError(f"curvature of shard {shard!r} disagrees on matrices: missing {missing}, "
                                            f"extra {extra}")
        return dict(sorted(merged.items()))

    def write_queries(self, queries: Sequence[Query]) -> int:
        """Store each query, replacing the row of its (target_set, method); one commit per query."""
        version = -1
        for q in queries:
            vec = _to_numpy(q.vector).astype(np.float32).reshape(1, -1)
            schema = queries_schema(vec.shape[1])
            batch = pa.record_batch(
                [
                    pa.array([q.target_set]),
                    pa.array([q.method]),
                    _fixed_list(vec, pa.float32()),
                    pa.array([q.fingerprint]),
                    pa.array([json.dumps(json_safe(q.diagnostics), sort_keys=True, default=float)]),
                ],
                schema=schema,
            )
            version = self.replace_where(
                "queries", {"target_set": q.target_set, "method": q.method}, batch, schema=schema, unique=None
            )
        return version

    def read_queries(
        self,
        fingerprint: Fingerprint | None = None,
        *,
        target_set: str | None = None,
        method: str | None = None,
    ) -> list[Query]:
        """Stored queries, optionally one target set / method; refuses ones made under another fingerprint."""
        ds = self.open("queries")
        preds = [f"{c} = {sql_literal(v)}" for c, v in (("target_set", target_set), ("method", method)) if v]
        rows = ds.to_table(filter=" AND ".join(preds) or None)
        out = []
        known = self.fingerprints()
        for row in rows.to_pylist():
            if fingerprint is not None and row["fingerprint"] != fingerprint.digest():
                require_match(
                    fingerprint, known.get(row["fingerprint"]), f"query {row['target_set']}/{row['method']}"
                )
            out.append(
                Query(
                    target_set=row["target_set"],
                    method=row["method"],
                    vector=torch.tensor(row["vector"], dtype=torch.float32),
                    fingerprint=row["fingerprint"],
                    diagnostics=json.loads(row["diagnostics"]),
                )
            )
        return out

    def write_preconditioner(self, prepared_rows: pa.Table, fingerprint: Fingerprint) -> int:
        """Store one method's prepared preconditioner (`preconditioners.prepared_to_table` rows of one key),
        replacing that method's earlier artifact in one commit; rows of another fingerprint are stale and go."""
        methods = set(prepared_rows.column("method").to_pylist())
        if len(methods) != 1:
            raise DataError(f"one method per preconditioner write, got {sorted(methods)}")
        rows = prepared_rows.append_column(
            "fingerprint", pa.repeat(pa.scalar(fingerprint.digest(), pa.string()), prepared_rows.num_rows))
        return self._guarded_write("preconditioners", {"method": methods.pop()}, rows, rows.schema, fingerprint,
                                   overwrite=True)

    def read_preconditioner(self, key: str) -> pa.Table | None:
        """The stored rows of the prepared preconditioner `key` (without the fingerprint), None if absent."""
        if not self.exists("preconditioners"):
            return None
        rows = self.open("preconditioners").to_table(filter=f"key = {sql_literal(key)}")
        return rows.drop_columns(["fingerprint"]) if rows.num_rows else None

    def write_target_gradient(self, target_set: str, vector: Tensor, count: int, content_digest: str,
                              fingerprint: Fingerprint) -> int:
        """Store a target set's mean raw gradient (flattened float64) in one commit."""
        schema = target_gradients_schema()
        batch = pa.record_batch([
            pa.array([target_set]), pa.array([_to_numpy(vector).astype(np.float64).reshape(-1)], pa.list_(pa.float64())),
            pa.array([int(count)], pa.int64()), pa.array([content_digest]), pa.array([fingerprint.digest()]),
        ], schema=schema)
        return self._guarded_write("target_gradients", {"target_set": target_set}, batch, schema, fingerprint,
                                   overwrite=True)

    def read_target_gradient(self, target_set: str) -> dict[str, Any] | None:
        """{vector (float64 numpy), count, content_digest, fingerprint} of a target set, None if absent."""
        if not self.exists("target_gradients"):
            return None
        rows = self.open("target_gradients").to_table(filter=f"target_set = {sql_literal(target_set)}").to_pylist()
        if not rows:
            return None
        return {**rows[0], "vector": np.asarray(rows[0]["vector"], dtype=np.float64)}
