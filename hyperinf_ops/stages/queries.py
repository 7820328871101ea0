"""Stage: one preconditioned query vector per (target set, method), stored in `queries`.

For each target set the mean gradient v_l over its examples (in block space: sketched like the rows when they
are) is computed once under the current adapter and stored (`target_gradients`, reused while the
target rows and the fingerprint are unchanged); each method's query is v preconditioned by its stored artifact
(preconditioners stage; no solve here), flattened like a row (whitened rows: mapped by `Whitening.to_rows`).
DataInf reads the training rows in one scan through its preconditioner. Queries of sets or methods no longer
configured are removed.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hyperinf_ops.adapters import AdapterStore
from hyperinf_ops.core.sketch import Sketch
from hyperinf_ops.core.whitening import Whitening
from hyperinf_ops.data.prepare import content_digest, record_columns
from hyperinf_ops.errors import DataError
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.preconditioners import Prepared
from hyperinf_ops.scorer import raw_gradient_batches
from hyperinf_ops.settings import EstimatorOptions, GradientSettings, ModelSpec
from hyperinf_ops.stages.codec import current_whitening
from hyperinf_ops.stages.common import Log, Summary, drop_stale, require_table
from hyperinf_ops.stages.preconditioners import checked_fingerprint, load_preconditioner
from hyperinf_ops.store import LanceStore, Query, sql_literal

__all__ = ["QueriesSummary", "build_target_queries", "query_vector", "target_gradient"]


@dataclass
class QueriesSummary(Summary):
    target_examples: dict[str, int]  # examples with a finite gradient, per target set
    recomputed_gradients: list[str]  # target sets whose mean gradient was (re)computed with the model
    methods: list[str]
    all_converged: bool
    diagnostics: dict[str, dict[str, Any]]  # "target/method" -> worst residual, iterations, converged
    digest: str  # over every query vector: equal queries, equal digest
    queries_version: int
    seconds: float


def _target_rows(store: LanceStore, name: str, task: str):
    table = require_table(store, "targets", "materialize target_sets first").to_table(
        columns=[*record_columns(task), "content_hash"], filter=f"target_set = {sql_literal(name)}")
    if table.num_rows == 0:
        raise DataError(f"target set {name!r} has no stored examples: materialize target_sets first")
    return table


def _unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, int]]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name in sorted(shapes):
        r, d = shapes[name]
        out[name] = torch.from_numpy(vector[start: start + r * d].copy()).reshape(r, d)
        start += r * d
    return out


def target_gradient(store: LanceStore, name: str, spec: ModelSpec, settings: GradientSettings,
                    fingerprint: Fingerprint, *, log: Log = print) -> tuple[dict[str, Tensor], int, bool]:
    """(v: name -> (r, k) float64 mean gradient over the set's finite examples in block space, their number,
    recomputed?).

    Read from `target_gradients` when stored for the same target rows and fingerprint, else computed under the
    current adapter (raw, then sketched like the rows: the sketch is linear) and stored."""
    rows = _target_rows(store, name, spec.task)
    digest = content_digest(rows["sample_id"].to_pylist(), rows["content_hash"].to_pylist())
    sketch = Sketch(AdapterStore(store.root).require_current().selected_shapes(settings.modules), settings.compression)
    stored = store.read_target_gradient(name)
    if stored is not None and stored["content_digest"] == digest and stored["fingerprint"] == fingerprint.digest():
        return _unflatten(stored["vector"], sketch.row_shapes), stored["count"], False
    from hyperinf_ops.stages.loading import (  # the model: here only
        finite_rows,
        gradient_batches,
        load_current_model,
    )

    loaded, _ = load_current_model(store.root, spec)
    total: dict[str, Tensor] = {}
    n = 0
    records = rows.drop_columns(["content_hash"]).to_pylist()
    for _ids, grads, _outputs in gradient_batches(loaded, records, settings, spec.max_length,
                                        phase=f"gradients of target set {name}", log=log):
        keep = finite_rows(grads)
        if not bool(keep.all()):
            log(f"target set {name}: {int((~keep).sum())} examples with non-finite gradients left out")
        for key, g in grads.items():
            part = g[keep].sum(0, dtype=torch.float64)
            total[key] = part if key not in total else total[key] + part
        n += int(keep.sum())
    if n == 0:
        raise DataError(f"target set {name!r}: no example has a finite gradient")
    v = {key: t.to(torch.float64) for key, t in sketch.apply_one({k: (t / n).cpu() for k, t in total.items()}).items()}
    store.write_target_gradient(name, torch.cat([v[k].reshape(-1) for k in sorted(v)]), n, digest, fingerprint)
    return v, n, True


def _worst(diagnostics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One line of solver health over a query's matrices."""
    residuals = [d["residual"] for d in diagnostics.values() if not math.isnan(d.get("residual", math.nan))]
    return {"converged": all(d.get("converged", True) for d in diagnostics.values()),
            "max_residual": max(residuals) if residuals else None,
            "max_iterations": max((d.get("iterations", 0) for d in diagnostics.values()), default=0)}


def query_vector(store: LanceStore, v: Mapping[str, Tensor], prepared: Prepared,
                 whitening: Whitening | None = None) -> tuple[Tensor, dict[str, Any]]:
    """(the query: a row-shaped (width,) float32 vector, per-matrix diagnostics) of one prepared method for v:
    name -> (r, k) in block space; whitened rows (`whitening`): the preconditioned vector mapped to row space.
    DataInf reads the stored rows (as blocks) in one scan."""
    rows = None
    if prepared.method == "datainf":
        rows = (grads for _, grads in raw_gradient_batches(store, prepared.shapes, whitening=whitening))
    pv = prepared.apply_one(v, train_batches=rows)
    measured = prepared.measure({k: t[None] for k, t in v.items()}, {k: t[None] for k, t in pv.items()})
    q = whitening.to_rows(pv) if whitening is not None else pv
    vector = torch.cat([q[name].reshape(-1) for name in sorted(q)]).float()
    return vector, {k: d.to_dict() for k, d in measured.items()}


def build_target_queries(store: LanceStore, targets: Sequence[str], spec: ModelSpec, settings: GradientSettings,
                         methods: Sequence[EstimatorOptions], *, log: Log = print) -> QueriesSummary:
    """Every (target set, method) query from the stored preconditioners (see the module docstring)."""
    start = time.perf_counter()
    fp = checked_fingerprint(store, settings)
    whitening = current_whitening(store, settings)
    queries, sizes, recomputed = [], {}, []
    for name in targets:
        v, sizes[name], fresh = target_gradient(store, name, spec, settings, fp, log=log)
        if fresh:
            recomputed.append(name)
        for options in methods:
            vector, diagnostics = query_vector(store, v, load_preconditioner(store, fp, options), whitening)
            queries.append(Query(name, options.method, vector, fp.digest(), diagnostics))
    store.write_queries(queries)
    drop_stale(store, "queries", ["target_set", "method"], {(t, o.method) for t in targets for o in methods})
    drop_stale(store, "target_gradients", ["target_set"], {(t,) for t in targets})
    health = {f"{q.target_set}/{q.method}": _worst(q.diagnostics) for q in queries}
    digest = hashlib.sha256()
    for q in sorted(queries, key=lambda q: (q.target_set, q.method)):
        digest.update(f"{q.target_set}|{q.method}|".encode() + q.vector.numpy().tobytes())
    summary = QueriesSummary(target_examples=sizes, recomputed_gradients=recomputed,
                             methods=[o.method for o in methods],
                             all_converged=all(h["converged"] for h in health.values()), diagnostics=health,
                             digest=digest.hexdigest()[:32],
                             queries_version=store.open("queries").version, seconds=time.perf_counter() - start)
    log(f"{len(queries)} queries ({', '.join(health)}) written, queries v{summary.queries_version}; target "
        f"gradients recomputed for {recomputed or 'no set'}")
    return summary
