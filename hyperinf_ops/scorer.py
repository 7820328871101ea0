"""Streaming scorer: every query against every stored gradient row in one bounded-memory scan.

A query is a preconditioned target vector already projected with the rows' projection, so the score of row
k is one dot product: `score_k = <q, Phi g_k>` (= -I(k), higher = more helpful). The gradients table is read
with `to_batches` (a few batches in flight, whatever the table size), each batch is scored against all
queries with one `(b, D) @ (D, q)` matmul on CUDA when available, and only the `n x q` scores stay in
memory. Ranks and percentiles need the whole column, so they are computed after the scan; each
(target_set, method) is then written to the `scores` table in its own atomic commit.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from hyperinf_ops.curvature import CurvaturePartial
from hyperinf_ops.errors import (
    DataError,
    FingerprintMismatchError,
    GradientMismatchError,
    InverseNotConvergedError,
    NonFiniteGradientError,
)
from hyperinf_ops.estimators import EstimatorOptions, precondition, schulz_with_options
from hyperinf_ops.fingerprint import Fingerprint, require_match
from hyperinf_ops.projection import BlockProjector
from hyperinf_ops.store import LanceStore, Query, scores_schema

__all__ = [
    "SELF_INFLUENCE_METHODS",
    "ScoreSummary",
    "build_queries",
    "datainf_projected_query",
    "default_device",
    "score_store",
    "self_influence_store",
]

# Estimators self_influence_store supports: the GFIM inverse by Schulz (hyperinf) or an fp64 solve (exact),
# and tracin (no curvature: the squared gradient norm).
SELF_INFLUENCE_METHODS = ("hyperinf", "exact", "tracin")

# Rows per scanned batch: Lance's row-group size. Measured on 100k x 8192 fp16 rows (2 loaded CPU cores):
# 13.3k rows/s at 1024, 12.4k at 2048, 8.9k at 4096 (larger batches decode slower and fault in more pages).
BATCH_ROWS = 1024
# Batches Lance decodes ahead of the consumer; bounds the scan's memory independently of table size.
_READAHEAD = 2


def default_device(device: torch.device | str | None = None) -> torch.device:
    """`device` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    dev = default_device(device)
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


def datainf_projected_query(
    store: LanceStore,
    v: Mapping[str, Tensor],
    projector: BlockProjector,
    *,
    fingerprint: Fingerprint,
    damping: Mapping[str, float] | None = None,
    damping_ratio: float = 0.1,
    batch_rows: int = BATCH_ROWS,
    device: torch.device | str | None = None,
    version: int | None = None,
) -> tuple[Tensor, dict[str, dict[str, Any]]]:
    """DataInf's preconditioned target vector computed from the stored rows, in projected space.

    v: name -> (r, d) mean target gradient (raw). Per matrix l, with Pv_l = Phi_l vec(v_l) and the stored
    Pg_il = Phi_l vec(g_il), |g_il|^2 from `sq_norms` (exact):

        pv_l = (1/(n lambda_l)) (n Pv_l - sum_i c_il Pg_il),   c_il = <Pv_l, Pg_il> / (lambda_l + |g_il|^2)

    which is DataInf's closed form with inner products taken in projected space (exact when dim = 0).
    damping: lambda_l per matrix (e.g. from the curvature table); None computes DataInf's own rule
    damping_ratio * mean(g_l^2) from `sq_norms` in a first pass. Returns ((dim,) float32, diagnostics).
    """
    dev = default_device(device)
    gradients_version = store.open("gradients", version).version
    store.check_fingerprint("gradients", fingerprint, gradients_version)
    pv = projector.project_vector(v).to(dev, torch.float64)
    names = projector.names
    if damping is None:
        total, n_rows = torch.zeros(len(names), dtype=torch.float64), 0
        for batch in _scan(store, gradients_version, ["sq_norms"], batch_rows):
            total += _fixed_rows(batch, "sq_norms").double().sum(0)
            n_rows += batch.num_rows
        if n_rows == 0:
            raise DataError("the gradients table has no rows")
        numel = torch.tensor([r * d for r, d in (projector.shapes[n] for n in names)], dtype=torch.float64)
        damping = dict(zip(names, (damping_ratio * total / (n_rows * numel)).tolist(), strict=True))
    lam = torch.tensor([damping[name] for name in names], dtype=torch.float64, device=dev)

    acc = torch.zeros_like(pv)
    n = 0
    for batch in _scan(store, gradients_version, ["grad", "grad_scale", "sq_norms"], batch_rows):
        x = _fixed_rows(batch, "grad").to(dev).double()
        x *= _column(batch, "grad_scale").to(dev).double()[:, None]
        sq = _fixed_rows(batch, "sq_norms").to(dev).double()
        if x.shape[1] != projector.out_dim or sq.shape[1] != len(names):
            raise GradientMismatchError(
                f"rows have {x.shape[1]} dims / {sq.shape[1]} matrices, projector {projector.out_dim} / {len(names)}"
            )
        for l_idx, name in enumerate(names):
            sl = projector.slices[name]
            block = x[:, sl]
            coef = (block @ pv[sl]) / (lam[l_idx] + sq[:, l_idx])
            acc[sl] += coef @ block
        n += batch.num_rows
    if n == 0:
        raise DataError("the gradients table has no rows")
    out = torch.empty_like(pv)
    diagnostics: dict[str, dict[str, Any]] = {}
    for l_idx, name in enumerate(names):
        sl = projector.slices[name]
        out[sl] = (pv[sl] - acc[sl] / n) / lam[l_idx]
        diagnostics[name] = {
            "damping": float(lam[l_idx]),
            "iterations": 0,
            "residual": math.nan,
            "converged": True,
            "projected": not projector.spec.raw,
            "rows": n,
            "gradients_version": gradients_version,
        }
    return out.float().cpu(), diagnostics


def build_queries(
    target_mean_grads: Mapping[str, Tensor],
    curvature: Mapping[str, CurvaturePartial] | None,
    methods: Sequence[str],
    projector: BlockProjector,
    options: EstimatorOptions,
    *,
    target_set: str,
    fingerprint: Fingerprint,
    train_grads: Mapping[str, Tensor] | None = None,
    store: LanceStore | None = None,
) -> list[Query]:
    """One query per method: precondition v exactly in raw space (estimators.precondition), then project.

    target_mean_grads: name -> (r, d). `options` supplies everything but the method. DataInf needs the
    training gradients: `train_grads` (raw, small pools), or `store` for the projected two-pass over the
    stored rows (damping from `curvature`, so every method uses the same lambda).
    """
    out = []
    for method in methods:
        if method == "datainf" and train_grads is None:
            if store is None:
                raise ValueError("datainf needs train_grads or a store to run its projected two-pass")
            damp = (
                None
                if curvature is None
                else {k: p.damping(options.damping_ratio) for k, p in curvature.items()}
            )
            vector, diagnostics = datainf_projected_query(
                store,
                target_mean_grads,
                projector,
                fingerprint=fingerprint,
                damping=damp,
                damping_ratio=options.damping_ratio,
            )
        else:
            pre = precondition(
                target_mean_grads,
                curvature,
                dataclasses.replace(options, method=method),
                train_grads=train_grads,
            )
            vector, diagnostics = projector.project_vector(pre.vectors).cpu(), pre.diagnostics
        out.append(Query(target_set, method, vector, fingerprint.digest(), diagnostics))
    return out


def _self_influence_inverses(curvature: Mapping[str, CurvaturePartial], options: EstimatorOptions,
                             device: torch.device) -> dict[str, Tensor | None]:
    """(G_l + lambda_l I)^-1 per matrix, float64 on `device`, computed once for the whole scan.

    Same damping and solver as `estimators.precondition` (hyperinf: Schulz with the options' settings, exact:
    fp64 inverse; tracin: None = identity). A matrix with zero damping has only zero gradients: None too."""
    out: dict[str, Tensor | None] = {}
    for name in sorted(curvature):
        part = curvature[name]
        lam = part.damping(options.damping_ratio)
        if options.method == "tracin" or lam <= 0:
            out[name] = None
            continue
        dtype = torch.float64 if options.method == "exact" else options.dtype
        eye = torch.eye(part.gfim_sum.shape[0], dtype=dtype, device=device)
        a = part.gfim().to(device=device, dtype=dtype) + lam * eye
        if options.method == "exact":
            out[name] = torch.linalg.inv(a)
            continue
        result = schulz_with_options(a, options)
        if not result.converged and not options.allow_unconverged:
            raise InverseNotConvergedError(
                f"Schulz inverse of {name!r} stopped at relative residual {float(result.residual):.3g} after "
                f"{result.iterations} iterations; use dtype=torch.float64 or a larger damping_ratio")
        out[name] = result.inverse.to(torch.float64)
    return out


def self_influence_store(
    store: LanceStore,
    curvature: Mapping[str, CurvaturePartial],
    shapes: Mapping[str, tuple[int, int]],
    options: EstimatorOptions,
    *,
    batch_rows: int = BATCH_ROWS,
    device: torch.device | str | None = None,
    version: int | None = None,
) -> tuple[list[str], np.ndarray]:
    """Self-influence `sum_l <g_{k,l} (G_l + lambda_l I)^-1, g_{k,l}>_F` of every stored gradient row.

    The classic mislabel detector (no target set): an example the rest of the pool does not explain has a
    large gradient in low-curvature directions. Equals `estimators.self_influence(grads, method)` on the same
    gradients, with the pool's merged curvature. Needs raw rows (projection dim 0): a projected row cannot be
    preconditioned by a d x d inverse; GradientMismatchError otherwise. Streams the table `batch_rows` at a
    time; returns (sample_ids, (n,) float64 self-influence), higher = more suspicious.
    """
    if options.method not in SELF_INFLUENCE_METHODS:
        raise ValueError(f"self-influence supports {SELF_INFLUENCE_METHODS}, not {options.method!r}")
    names = sorted(shapes)
    if sorted(curvature) != names:
        raise GradientMismatchError(f"curvature matrices {sorted(curvature)} vs gradient matrices {names}")
    widths = [shapes[n][0] * shapes[n][1] for n in names]
    dev = default_device(device)
    inverses = _self_influence_inverses(curvature, options, dev)
    gradients_version = store.open("gradients", version).version
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    for batch in _scan(store, gradients_version, ["sample_id", "grad", "grad_scale"], batch_rows):
        rows = _fixed_rows(batch, "grad")
        if rows.shape[1] != sum(widths):
            raise GradientMismatchError(
                f"self-influence needs raw gradient rows ({sum(widths)} dims); the stored rows have "
                f"{rows.shape[1]} (projected): set projection_dim 0")
        x = rows.to(dev, torch.float64) * _column(batch, "grad_scale").to(dev, torch.float64)[:, None]
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=dev)
        start = 0
        for name, width in zip(names, widths, strict=True):
            g = x[:, start: start + width].reshape(-1, *shapes[name])
            start += width
            inv = inverses[name]
            total += (g * g).sum((1, 2)) if inv is None else ((g @ inv) * g).sum((1, 2))
        chunks.append(total.cpu().numpy())
        ids += batch.column("sample_id").to_pylist()
    values = np.concatenate(chunks) if chunks else np.zeros(0)
    if not np.isfinite(values).all():
        raise NonFiniteGradientError("non-finite self-influence: a gradient row holds NaN/inf")
    return ids, values
