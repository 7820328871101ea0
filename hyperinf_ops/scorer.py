"""Streaming scorer: every query against every stored gradient row in one bounded-memory scan.

A query is a preconditioned target vector laid out like a row (each LoRA matrix's block, raw or sketched), so
the score of row k is one dot product: `score_k = <q, g_k>` (= -I(k), higher = more helpful). The gradients table is read
with `to_batches` (a few batches in flight, whatever the table size), each batch is scored against all
queries with one `(b, D) @ (D, q)` matmul on CUDA when available, and only the `n x q` scores stay in
memory. Ranks and percentiles need the whole column, so they are computed after the scan; each
(target_set, method) is then written to the `scores` table in its own atomic commit.
"""

from __future__ import annotations

import math
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from hyperinf_ops.devices import resolve_device
from hyperinf_ops.errors import (
    DataError,
    FingerprintMismatchError,
    GradientMismatchError,
    NonFiniteGradientError,
)
from hyperinf_ops.fingerprint import require_match
from hyperinf_ops.preconditioners import Prepared
from hyperinf_ops.store import LanceStore, Query, scores_schema

__all__ = [
    "ScoreSummary",
    "raw_gradient_batches",
    "score_store",
    "self_influence_store",
]


# Rows per scanned batch: Lance's row-group size. Measured on 100k x 8192 fp16 rows (2 loaded CPU cores):
# 13.3k rows/s at 1024, 12.4k at 2048, 8.9k at 4096 (larger batches decode slower and fault in more pages).
BATCH_ROWS = 1024
# Batches Lance decodes ahead of the consumer; bounds the scan's memory independently of table size.
_READAHEAD = 2


@dataclass
class ScoreSummary:
    """What a scoring run did. score_versions: "target_set/method" -> scores table version of its commit."""

    run_id: str
    rows: int
    gradients_version: int
    fingerprint: str
    score_versions: dict[str, int]
    device: str
    seconds: float
    rows_per_second: float


def _fixed_rows(batch: pa.RecordBatch, column: str) -> Tensor:
    """A fixed_size_list column as a (b, width) CPU tensor sharing the Arrow buffer (no copy)."""
    col = batch.column(column)
    values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    with warnings.catch_warnings():
        # Arrow buffers are read-only; every caller converts (copies) before any write.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(values)


def _column(batch: pa.RecordBatch, column: str) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(batch.column(column).to_numpy())


def _scan(store: LanceStore, version: int, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    ds = store.open("gradients", version)
    yield from ds.to_batches(
        columns=columns, batch_size=batch_rows, batch_readahead=_READAHEAD, fragment_readahead=1
    )


def _rows_fingerprint(store: LanceStore, version: int) -> str:
    digests = store.row_fingerprints("gradients", version)
    if not digests:
        raise DataError("the gradients table has no rows to score")
    if len(digests) > 1:
        raise FingerprintMismatchError(f"gradients table mixes rows of fingerprints {digests}")
    return digests[0]


def _check_query_fingerprints(store: LanceStore, queries: Sequence[Query], rows_digest: str) -> None:
    known = store.fingerprints()
    for q in queries:
        if q.fingerprint == rows_digest:
            continue
        expected = known.get(q.fingerprint)
        if expected is None:
            raise FingerprintMismatchError(
                f"query {q.target_set}/{q.method} was built for fingerprint {q.fingerprint}, "
                f"the gradient rows carry {rows_digest}"
            )
        require_match(expected, known.get(rows_digest), f"query {q.target_set}/{q.method} vs gradient rows")


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


def score_store(
    store: LanceStore,
    queries: Sequence[Query],
    *,
    batch_rows: int = BATCH_ROWS,
    device: torch.device | str | None = None,
    run_id: str | None = None,
    version: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> ScoreSummary:
    """Score every gradient row against every query in one scan; write `scores` (one commit per query).

    queries: vectors (dim,) in the gradients' projected space, one per (target_set, method); they must carry
    the gradient rows' fingerprint (FingerprintMismatchError otherwise, nothing written). version: the
    gradients table version to scan (default latest; recorded as `gradients_version`). dtype: matmul dtype.
    """
    if not queries:
        raise DataError("no queries to score")
    keys = [(q.target_set, q.method) for q in queries]
    if len(set(keys)) != len(keys):
        raise DataError(f"duplicate (target_set, method) among queries: {keys}")
    start = time.perf_counter()
    dev = resolve_device(device)
    gradients_version = store.open("gradients", version).version
    digest = _rows_fingerprint(store, gradients_version)
    _check_query_fingerprints(store, queries, digest)
    q = torch.stack([torch.as_tensor(x.vector).reshape(-1) for x in queries]).to(dev, dtype)

    id_chunks: list[pa.Array] = []
    score_chunks: list[np.ndarray] = []
    buf = torch.empty((0, q.shape[1]), dtype=dtype, device=dev)
    for batch in _scan(store, gradients_version, ["sample_id", "grad", "grad_scale"], batch_rows):
        rows = _fixed_rows(batch, "grad")
        if rows.shape[1] != q.shape[1]:
            raise GradientMismatchError(f"queries have {q.shape[1]} dims, gradient rows {rows.shape[1]}")
        if rows.shape[0] > buf.shape[0]:
            buf = torch.empty((rows.shape[0], q.shape[1]), dtype=dtype, device=dev)
        # Converting into a reused buffer: a fresh 100+ MB tensor per batch costs more in page faults
        # than the conversion itself.
        x = buf[: rows.shape[0]].copy_(rows)
        scale = _column(batch, "grad_scale").to(dev, dtype)
        score_chunks.append(((x @ q.T) * scale[:, None]).double().cpu().numpy())
        # A copy: a slice of the batch's ids would keep the whole decoded batch (vectors too) alive.
        id_chunks.append(pa.concat_arrays([batch.column("sample_id")]))
    scores = np.concatenate(score_chunks) if score_chunks else np.zeros((0, len(queries)))
    if not np.isfinite(scores).all():
        raise NonFiniteGradientError("non-finite scores: a query or a gradient row holds NaN/inf")
    sample_ids = pa.concat_arrays(id_chunks) if id_chunks else pa.array([], pa.string())
    n = len(sample_ids)

    run_id = run_id or uuid.uuid4().hex
    created = pa.scalar(datetime.now(UTC), pa.timestamp("us", tz="UTC"))
    versions: dict[str, int] = {}
    for j, query in enumerate(queries):
        rank, percentile = _ranks(sample_ids, scores[:, j])
        table = pa.table(
            {
                "sample_id": sample_ids,
                "target_set": pa.repeat(pa.scalar(query.target_set, pa.string()), n),
                "method": pa.repeat(pa.scalar(query.method, pa.string()), n),
                "score": scores[:, j],
                "rank": rank,
                "percentile": percentile,
                "fingerprint": pa.repeat(pa.scalar(digest, pa.string()), n),
                "gradients_version": pa.repeat(pa.scalar(gradients_version, pa.int64()), n),
                "run_id": pa.repeat(pa.scalar(run_id, pa.string()), n),
                "created_at": pa.repeat(created, n),
            },
            schema=scores_schema(),
        )
        key = {"target_set": query.target_set, "method": query.method}
        versions[f"{query.target_set}/{query.method}"] = store.replace_where("scores", key, table)
    seconds = time.perf_counter() - start
    return ScoreSummary(
        run_id=run_id,
        rows=n,
        gradients_version=gradients_version,
        fingerprint=digest,
        score_versions=versions,
        device=str(dev),
        seconds=seconds,
        rows_per_second=n / seconds if seconds > 0 else math.inf,
    )


def raw_gradient_batches(
    store: LanceStore,
    shapes: Mapping[str, tuple[int, int]],
    *,
    batch_rows: int = BATCH_ROWS,
    device: torch.device | str | None = None,
    version: int | None = None,
    filter: str | None = None,
) -> Iterator[tuple[list[str], dict[str, Tensor]]]:
    """Stored rows as per-example gradients: (sample_ids, name -> (b, r, k) float64), `batch_rows` at a time.

    shapes: name -> (r, k) of every stored block (sorted names give the row layout; k = d for raw rows, the
    sketch width for compressed ones). GradientMismatchError when the rows do not have that width.
    """
    names = sorted(shapes)
    widths = [shapes[n][0] * shapes[n][1] for n in names]
    dev = resolve_device(device)
    ds = store.open("gradients", version)
    for batch in ds.to_batches(columns=["sample_id", "grad", "grad_scale"], batch_size=batch_rows, filter=filter,
                               batch_readahead=_READAHEAD, fragment_readahead=1):
        rows = _fixed_rows(batch, "grad")
        if rows.shape[1] != sum(widths):
            raise GradientMismatchError(
                f"rows of {sum(widths)} floats expected (blocks {dict(zip(names, widths, strict=True))}); the "
                f"stored rows have {rows.shape[1]}")
        x = rows.to(dev, torch.float64) * _column(batch, "grad_scale").to(dev, torch.float64)[:, None]
        out, start = {}, 0
        for name, width in zip(names, widths, strict=True):
            out[name] = x[:, start: start + width].reshape(-1, *shapes[name])
            start += width
        yield batch.column("sample_id").to_pylist(), out


def self_influence_store(
    store: LanceStore,
    prepared: Prepared,
    *,
    batch_rows: int = BATCH_ROWS,
    device: torch.device | str | None = None,
    version: int | None = None,
) -> tuple[list[str], np.ndarray]:
    """Self-influence `sum_l <g_{k,l} M_l, g_{k,l}>_F` of every stored raw gradient row, M_l the stored inverse
    (`Prepared.self_influence`: hyperinf, exact; the identity for tracin). No solve happens here.

    The classic mislabel detector (no target set): an example the rest of the pool does not explain has a
    large gradient in low-curvature directions. Returns (sample_ids, (n,) float64), higher = more suspicious.
    """
    dev = resolve_device(device)
    on_device = prepared.to(dev)
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    for batch_ids, grads in raw_gradient_batches(store, prepared.shapes, batch_rows=batch_rows, device=dev,
                                                 version=version):
        chunks.append(on_device.self_influence(grads).cpu().numpy())
        ids += batch_ids
    values = np.concatenate(chunks) if chunks else np.zeros(0)
    if not np.isfinite(values).all():
        raise NonFiniteGradientError("non-finite self-influence: a gradient row holds NaN/inf")
    return ids, values
