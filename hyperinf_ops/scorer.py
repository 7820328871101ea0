"""Streaming scorer: every query, and the self-influence of every row, in one bounded-memory scan.

A query is a preconditioned target vector laid out like a decoded row (each LoRA matrix's (r, k) block: raw,
sketched, or whitened with the query mapped by `Whitening.to_rows`), so the score of row k is one dot product:
`score_k = <q, row_k>` (= -I(k), higher = more helpful). Self-influence reads the row's blocks as the per-matrix
gradients (whitening undone): `sum_l <b_l M_l, b_l>_F` from a stored inverse M_l (`Prepared`), written as target
set SELF_TARGET with `score = -self-influence` (the most negative = the most suspicious).

The rows stream through `store.vectors.iter_fixed_rows` (Lance's page bytes mapped read-only where the layout
allows, Lance's scanner otherwise: memory independent of the table size), in the rows' storage format
(row_format.py). On CPU each batch is converted (float rows) to the matmul dtype a cache-sized chunk at a time
and multiplied as `queries @ chunk.T`, or multiplied as integer codes without decoding (code_product.py), with
torch on one thread; on CUDA the batch
goes to the device as stored and is decoded there. Self-influence takes each batch's blocks in float64. Only the
n x (queries + self-influence) values stay in memory. Ranks and percentiles need the whole column, so they are
computed after the scan; each (target_set, method) is then written to the `scores` table in its own atomic
commit.
"""

from __future__ import annotations

import math
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from hyperinf_ops.core.code_product import IntegerCodeProduct
from hyperinf_ops.core.row_format import RowFormat
from hyperinf_ops.core.whitening import Whitening
from hyperinf_ops.devices import resolve_device
from hyperinf_ops.errors import (
    DataError,
    FingerprintMismatchError,
    GradientMismatchError,
    NonFiniteGradientError,
)
from hyperinf_ops.fingerprint import Fingerprint, require_match
from hyperinf_ops.memory import release_memory
from hyperinf_ops.preconditioners import Prepared
from hyperinf_ops.progress import ProgressCallback, ProgressMeter, tenths
from hyperinf_ops.ranking_table import ranking_table, write_ranking
from hyperinf_ops.settings import SELF_TARGET
from hyperinf_ops.store import LanceStore, Query
from hyperinf_ops.store.vectors import MAX_READ_BYTES, iter_fixed_rows

__all__ = [
    "SELF_TARGET",
    "QueryGroup",
    "ScoreSummary",
    "raw_gradient_batches",
    "score_store",
]

# Rows per read. Measured on 200k x 8192 fp16 rows (2 loaded CPU cores): 256-4096 all within noise of each
# other once the rows are read straight from the pages; 1024 is Lance's fastest batch when it decodes.
BATCH_ROWS = 1024
# CPU: rows converted to the matmul dtype and multiplied at a time, sized to stay in cache (128 rows of 8192
# float32). Converting a whole batch first writes and rereads 32 MB per 1024 rows: 2-3x slower.
_CHUNK_BYTES = 4 << 20
# Self-influence: rows decoded, unwhitened and preconditioned (float64 copies) at a time. A whole batch at once
# made ~300 MB of temporaries per 256 MiniLM rows, and glibc's heaps grew with the number of batches (RSS
# +0.5 GB at 20k rows); 16 MB of decoded rows keeps the temporaries under ~100 MB whatever the batch size.
_SELF_CHUNK_BYTES = 16 << 20
# The freed temporaries still fragment glibc's heaps a little each batch (~4 MB per 256 MiniLM rows): the
# free pages go back to the kernel every few batches (memory.py; every batch costs ~10% more scan time).
_TRIM_EVERY = 8
# Batches Lance decodes ahead of the consumer (raw_gradient_batches over a filter).
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


@dataclass(frozen=True)
class QueryGroup:
    """Queries scored in the same scan and reduced to one ranking (target_set, method): its scores are
    `reduce(sample_ids, influence)` with influence (n, m) = <vectors_j, row_k> (signals/cover.py's cover)."""

    target_set: str
    method: str
    vectors: Tensor  # (m, width), laid out like the queries
    reduce: Callable[[pa.Array, np.ndarray], np.ndarray]


def _fixed_rows(batch: pa.RecordBatch, column: str) -> Tensor:
    """A fixed_size_list column as a (b, width) CPU tensor sharing the Arrow buffer (no copy)."""
    col = batch.column(column)
    return _tensor(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size))


def _column(batch: pa.RecordBatch, column: str) -> Tensor:
    return _tensor(batch.column(column).to_numpy())


def _tensor(values: np.ndarray) -> Tensor:
    with warnings.catch_warnings():
        # Arrow buffers and the scan's read buffer are read-only; every caller converts (copies) before any write.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(values)


@contextmanager
def _one_cpu_thread(dev: torch.device) -> Iterator[None]:
    """Torch's CPU math on one thread while the scan runs (restored after). The chunks are small: with the
    default 2 threads on 2 shared cores every chunk waits for both, measured 3-40x slower than one thread."""
    if dev.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rows_fingerprint(store: LanceStore, version: int | None) -> Fingerprint:
    """The one fingerprint of the gradient rows at `version` (DataError when there are none)."""
    fp = store.fingerprint("gradients", version)
    if fp is None:
        raise DataError("the gradients table has no rows to score")
    return fp


def _check_whitening(fp: Fingerprint, whitening: Whitening | None) -> None:
    """GradientMismatchError unless `whitening` is the one the rows are stored under (None for none)."""
    given = whitening.digest() if whitening is not None else ""
    if given != fp.whitening:
        raise GradientMismatchError(
            f"the gradient rows are stored under whitening {fp.whitening or 'none'}, "
            f"the reader was given {given or 'none'}")


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


def _check_blocks(shapes: Mapping[str, tuple[int, int]], fmt: RowFormat) -> None:
    """GradientMismatchError unless the rows are exactly the matrices' (r, k) blocks, in sorted name order."""
    blocks = tuple(r * d for _, (r, d) in sorted(shapes.items()))
    if blocks != fmt.blocks:
        raise GradientMismatchError(f"rows of {sum(blocks)} floats expected (the blocks {dict(sorted(shapes.items()))}); "
                                    f"the stored rows have {fmt.width} in blocks of {sorted(set(fmt.blocks))}")


def _meta_columns(fmt: RowFormat) -> list[str]:
    return ["sample_id", "grad_scale", *(["block_scales"] if fmt.integer else [])]


def _decode(fmt: RowFormat, values: Tensor, meta: pa.RecordBatch, out: Tensor | None = None) -> Tensor:
    """A batch's stored values (any device) -> (b, width) float32 rows (into `out` when given)."""
    scales = _fixed_rows(meta, "block_scales").to(values.device) if fmt.integer else None
    return fmt.decode(values, _column(meta, "grad_scale").to(values.device), scales, out=out)


def _blocks(fmt: RowFormat, values: Tensor, meta: pa.RecordBatch, shapes: Mapping[str, tuple[int, int]],
            whitening: Whitening | None) -> dict[str, Tensor]:
    """A batch's stored rows -> name -> (b, r, k) float32 blocks (whitened rows: undone), sorted name order
    (consumers cast a block at a time where they need float64)."""
    x = _decode(fmt, values, meta)
    out, start = {}, 0
    for name in sorted(shapes):
        r, d = shapes[name]
        out[name] = x[:, start: start + r * d].reshape(-1, r, d)
        start += r * d
    return whitening.undo(out) if whitening is not None else out


def _query_scores(fmt: RowFormat, rows: Tensor, meta: pa.RecordBatch, q: Tensor,
                  converted: Tensor | None, codes: IntegerCodeProduct | None) -> np.ndarray:
    """(b, stored width) rows as stored (CPU, read-only) against (Q, width) queries: (b, Q) float64.

    converted: a (chunk, width) CPU buffer of the queries' dtype (CPU math), None on CUDA. On CPU the rows are
    converted (float rows) or decoded (integer codes) a chunk at a time into that cache-resident buffer (rows
    already of the queries' dtype are used in place), or, for integer codes, multiplied as codes by `codes`
    (code_product.py: no decoding); on CUDA the batch moves to the device as stored and is converted there.
    Float rows are multiplied by their grad_scale after the product (one value a row).
    """
    if codes is not None:
        steps = _fixed_rows(meta, "block_scales")
        parts = [codes(rows[i: i + codes.chunk_rows], steps[i: i + codes.chunk_rows])
                 for i in range(0, len(rows), codes.chunk_rows)]
        return torch.cat(parts).double().numpy() if parts else np.zeros((0, len(q)))
    out = torch.empty((len(q), len(rows)), dtype=q.dtype, device=q.device)
    if converted is None:
        x = rows.to(q.device)
        x = _decode(fmt, x, meta) if fmt.integer else x
        out[:] = q @ x.to(q.dtype).T
    else:
        for i in range(0, len(rows), len(converted)):
            x = rows[i: i + len(converted)]
            if fmt.integer:
                x = _decode(fmt, x, meta.slice(i, len(x)), out=converted)
            elif x.dtype != q.dtype:
                x = converted[: len(x)].copy_(x)
            # queries @ rows.T, not rows @ queries.T: MKL streams the rows 1.5-2x faster this way.
            out[:, i: i + len(x)] = q @ x.T
    if not fmt.integer:
        out *= _column(meta, "grad_scale").to(q.device, q.dtype)[None, :]
    return out.T.double().cpu().numpy()


def score_store(
    store: LanceStore,
    queries: Sequence[Query],
    *,
    self_influence: Sequence[Prepared] = (),
    groups: Sequence[QueryGroup] = (),
    batch_rows: int = BATCH_ROWS,
    device: torch.device | str | None = None,
    whitening: Whitening | None = None,
    run_id: str | None = None,
    version: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: ProgressCallback | None = None,
) -> ScoreSummary:
    """Score every gradient row against every query, and its self-influence under every prepared inverse, in
    one scan; write `scores` (one commit per (target_set, method)).

    queries: vectors (width,) laid out like the decoded rows (whitened rows: `Whitening.to_rows` of the
    preconditioned vector), one per (target_set, method); they must carry the gradient rows' fingerprint
    (FingerprintMismatchError otherwise, nothing written). self_influence: prepared inverses (hyperinf, exact,
    exact_full, tracin) of the rows' blocks (GradientMismatchError for inverses of other shapes, nothing
    written); each writes target set SELF_TARGET, method = its method, score = -sum_l <b_l M_l, b_l>_F.
    groups: query groups (QueryGroup) scored with the queries and written as one ranking each (n x m values of a
    group stay in memory until it is reduced).
    whitening: the one the rows are stored under (their fingerprint names it; GradientMismatchError for any
    other), undone before self-influence. version: the gradients table version to scan (default latest;
    recorded as `gradients_version`). dtype: matmul dtype of the queries. progress: rows scanned, with rate and
    ETA, about ten times over the scan.
    """
    if not queries and not self_influence and not groups:
        raise DataError("nothing to score: no queries, no query groups and no self-influence")
    reserved = [q.method for q in queries if q.target_set == SELF_TARGET]
    if reserved:
        raise DataError(f"target set {SELF_TARGET!r} is reserved for self-influence scores (queries {reserved})")
    keys = ([(q.target_set, q.method) for q in queries] + [(g.target_set, g.method) for g in groups]
            + [(SELF_TARGET, p.method) for p in self_influence])
    if len(set(keys)) != len(keys):
        raise DataError(f"duplicate (target_set, method) among queries and self-influence: {keys}")
    for prepared in self_influence:
        prepared.require_self_influence()
    start = time.perf_counter()
    dev = resolve_device(device)
    ds = store.open("gradients", version)
    gradients_version = ds.version
    fp = _rows_fingerprint(store, gradients_version)
    digest, fmt = fp.digest(), fp.row_format
    _check_query_fingerprints(store, queries, digest)
    _check_whitening(fp, whitening)
    dim = fmt.width
    for prepared in self_influence:
        _check_blocks(prepared.shapes, fmt)
    vectors = [torch.as_tensor(query.vector).reshape(1, -1) for query in queries] + [g.vectors for g in groups]
    for vector in vectors:
        if vector.ndim != 2 or vector.shape[1] != dim:
            raise GradientMismatchError(f"queries have {vector.shape[-1]} dims, gradient rows {dim}")
    q = (torch.cat(vectors) if vectors else torch.zeros((0, dim))).to(dev, dtype)
    inverses = [p.to(dev) for p in self_influence]

    id_chunks: list[pa.Array] = []
    score_chunks: list[np.ndarray] = []
    self_chunks: list[np.ndarray] = []
    chunk_rows = max(1, _CHUNK_BYTES // (dim * torch.finfo(dtype).bits // 8))
    self_rows = max(1, _SELF_CHUNK_BYTES // (dim * 4))
    codes = (IntegerCodeProduct(fmt, q, chunk_rows) if len(q) and dev.type == "cpu" and dtype == torch.float32
             and IntegerCodeProduct.supports(fmt) else None)
    converted = torch.empty((chunk_rows, dim), dtype=dtype) if dev.type == "cpu" and codes is None else None
    total = ds.count_rows()
    meter = ProgressMeter("scoring", total, progress, unit="rows", every=1, step=tenths(total))
    with _one_cpu_thread(dev):
        for batch, (meta, values) in enumerate(iter_fixed_rows(ds, "grad", _meta_columns(fmt), batch_rows), 1):
            rows = _tensor(values)
            if len(q):
                score_chunks.append(_query_scores(fmt, rows, meta, q, converted, codes))
            for i in range(0, len(rows) if inverses else 0, self_rows):
                blocks = _blocks(fmt, rows[i: i + self_rows].to(dev), meta.slice(i, self_rows), inverses[0].shapes,
                                 whitening)
                selfs = [inverse.self_influence(blocks) for inverse in inverses]
                self_chunks.append(torch.stack(selfs, 1).cpu().numpy())
            # A copy: the ids must not keep the batch's (or a fragment's) other buffers alive.
            id_chunks.append(pa.concat_arrays([meta.column("sample_id")]))
            meter.update(len(rows))
            if batch % _TRIM_EVERY == 0:
                release_memory()
    meter.finish()
    scores = np.concatenate(score_chunks) if score_chunks else np.zeros((0, len(q)))
    if not np.isfinite(scores).all():
        raise NonFiniteGradientError("non-finite scores: a query or a gradient row holds NaN/inf")
    selfs_all = np.concatenate(self_chunks) if self_chunks else np.zeros((0, len(inverses)))
    if not np.isfinite(selfs_all).all():
        raise NonFiniteGradientError("non-finite self-influence: a gradient row holds NaN/inf")
    sample_ids = pa.concat_arrays(id_chunks) if id_chunks else pa.array([], pa.string())
    n = len(sample_ids)
    columns = [scores[:, j] for j in range(len(queries))]
    start_col = len(queries)
    for group in groups:
        columns.append(group.reduce(sample_ids, scores[:, start_col: start_col + len(group.vectors)]))
        start_col += len(group.vectors)
    columns += [-selfs_all[:, k] for k in range(len(inverses))]

    run_id = run_id or uuid.uuid4().hex
    created = datetime.now(UTC)
    versions: dict[str, int] = {}
    for (target_set, method), values in zip(keys, columns, strict=True):
        table = ranking_table(sample_ids, target_set, method, values, fingerprint=digest,
                              gradients_version=gradients_version, run_id=run_id, created_at=created)
        versions[f"{target_set}/{method}"] = write_ranking(store, table)
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
    whitening: Whitening | None = None,
    batch_rows: int = BATCH_ROWS,
    version: int | None = None,
    filter: str | None = None,
) -> Iterator[tuple[list[str], dict[str, Tensor]]]:
    """Stored rows as per-example gradients: (sample_ids, name -> (b, r, k) float32), batch by batch.

    shapes: name -> (r, k) of every stored block (sorted names give the row layout; k = d for raw rows, the
    sketch width for compressed ones); GradientMismatchError when the rows have other blocks. whitening: the
    one the rows are stored under (their fingerprint names it), undone: the blocks come back in block space.
    Each batch holds at most MAX_READ_BYTES of decoded float32 blocks (int4 rows decode to 8x their stored
    bytes), whatever `batch_rows` says; consumers cast per matrix where they need float64. `filter` (a Lance
    predicate, e.g. a sample) reads through Lance's scanner, the whole table through `iter_fixed_rows`.
    """
    fp = _rows_fingerprint(store, version)
    fmt = fp.row_format
    _check_blocks(shapes, fmt)
    _check_whitening(fp, whitening)
    ds = store.open("gradients", version)
    rows = max(1, min(batch_rows, MAX_READ_BYTES // (4 * fmt.width)))
    if filter is None:
        batches = iter_fixed_rows(ds, "grad", _meta_columns(fmt), rows)
    else:
        batches = ((b, _fixed_rows(b, "grad").numpy()) for b in ds.to_batches(
            columns=[*_meta_columns(fmt), "grad"], batch_size=rows, filter=filter,
            batch_readahead=_READAHEAD, fragment_readahead=1))
    for meta, values in batches:
        yield meta.column("sample_id").to_pylist(), _blocks(fmt, _tensor(values), meta, shapes, whitening)
