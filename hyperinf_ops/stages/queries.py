"""Stage: one preconditioned query vector per (target set, method), stored in `queries`.

For each target set the mean gradient v_l over its examples (in block space: sketched like the rows when they
are) is computed once under the current adapter and stored (`target_gradients`, reused while the
target rows and the fingerprint are unchanged); each method's query is v preconditioned by its stored artifact
(preconditioners stage; no solve here), flattened like a row (whitened rows: mapped by `Whitening.to_rows`).
DataInf reads the training rows in one scan through its preconditioner. Queries of sets or methods no longer
configured are removed. With `signals.cover` every target example's gradient is kept instead of the mean alone;
`cover_queries` preconditions each for the cover rankings (the influence scan scores them, stages/scores.py).
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

__all__ = ["QueriesSummary", "TargetGradient", "build_target_queries", "cover_queries", "query_vector", "target_gradient"]


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


def _unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, int]], count: int | None = None
               ) -> dict[str, Tensor]:
    """A flat float64 vector -> name -> (r, k) blocks (sorted names); with `count`: count stacked vectors ->
    name -> (count, r, k)."""
    lead = () if count is None else (count,)
    flat = torch.from_numpy(vector.copy()).reshape(*lead, -1)
    out, start = {}, 0
    for name in sorted(shapes):
        r, d = shapes[name]
        out[name] = flat[..., start: start + r * d].reshape(*lead, r, d)
        start += r * d
    return out


@dataclass(frozen=True)
class TargetGradient:
    """A target set's gradients in block space (sketched like the rows when they are): the mean v (name -> (r, k)
    float64), the examples with a finite gradient, whether they were (re)computed with the model now, and, when
    asked for (signals.cover), every example's gradient (name -> (count, r, k) float64)."""

    mean: dict[str, Tensor]
    count: int
    recomputed: bool
    examples: dict[str, Tensor] | None = None


def target_gradient(store: LanceStore, name: str, spec: ModelSpec, settings: GradientSettings,
                    fingerprint: Fingerprint, *, per_example: bool = False, log: Log = print) -> TargetGradient:
    """A target set's TargetGradient.

    Read from `target_gradients` when stored for the same target rows and fingerprint (and, for `per_example`,
    stored per example), else computed under the current adapter (raw, then sketched like the rows: the sketch
    is linear) and stored: the mean v (width floats) or, for `per_example`, every example's gradient (count x
    width floats; v is their mean)."""
    rows = _target_rows(store, name, spec.task)
    digest = content_digest(rows["sample_id"].to_pylist(), rows["content_hash"].to_pylist())
    sketch = Sketch(AdapterStore(store.root).require_current().selected_shapes(settings.modules), settings.compression)
    stored = store.read_target_gradient(name)
    if stored is not None and stored["content_digest"] == digest and stored["fingerprint"] == fingerprint.digest():
        count = stored["count"]
        if len(stored["vector"]) == count * sketch.width:  # stored per example (for one example: the mean too)
            examples = _unflatten(stored["vector"], sketch.row_shapes, count)
            return TargetGradient({k: t.mean(0) for k, t in examples.items()}, count, False, examples)
        if not per_example:
            return TargetGradient(_unflatten(stored["vector"], sketch.row_shapes), count, False)
    from hyperinf_ops.stages.loading import (  # the model: here only
        finite_rows,
        gradient_batches,
        load_current_model,
    )

    loaded, _ = load_current_model(store.root, spec)
    sums: dict[str, Tensor] = {}
    stacks: dict[str, list[Tensor]] = {}
    n = 0
    records = rows.drop_columns(["content_hash"]).to_pylist()
    for _ids, grads, _outputs in gradient_batches(loaded, records, settings, spec.max_length,
                                        phase=f"gradients of target set {name}", log=log):
        keep = finite_rows(grads)
        if not bool(keep.all()):
            log(f"target set {name}: {int((~keep).sum())} examples with non-finite gradients left out")
        n += int(keep.sum())
        kept = {key: g[keep].cpu() for key, g in grads.items()}
        if per_example:
            for key, g in sketch.apply(kept).items():
                stacks.setdefault(key, []).append(g.cpu().to(torch.float64))
            continue
        for key, g in kept.items():
            part = g.sum(0, dtype=torch.float64)
            sums[key] = part if key not in sums else sums[key] + part
    if n == 0:
        raise DataError(f"target set {name!r}: no example has a finite gradient")
    examples = None
    if per_example:
        examples = {key: torch.cat(parts) for key, parts in sorted(stacks.items())}
        v = {key: t.mean(0) for key, t in examples.items()}
        flat = _row_layout(examples)
    else:
        v = {key: t.to(torch.float64) for key, t in sketch.apply_one({k: t / n for k, t in sums.items()}).items()}
        flat = torch.cat([v[k].reshape(-1) for k in sorted(v)])
    store.write_target_gradient(name, flat, n, digest, fingerprint)
    return TargetGradient(v, n, True, examples)


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


def cover_queries(store: LanceStore, name: str, spec: ModelSpec, settings: GradientSettings,
                  fingerprint: Fingerprint, prepared: Sequence[Prepared], whitening: Whitening | None = None
                  ) -> list[Tensor]:
    """The queries of target set `name`'s cover rankings (signals/cover.py), one (m, width) float32 tensor per
    stored inverse in `prepared` (hyperinf, tracin): every target example's gradient preconditioned by it, laid
    out like a row (whitened rows: mapped by `Whitening.to_rows`). Reads the per-example target gradients the
    queries stage kept (`per_example`) once for every inverse."""
    examples = target_gradient(store, name, spec, settings, fingerprint, per_example=True).examples
    out = []
    for inverse in prepared:
        pv = inverse.apply(examples)
        q = whitening.to_rows(pv) if whitening is not None else pv
        out.append(_row_layout(q).float())
    return out


def _row_layout(stacks: Mapping[str, Tensor]) -> Tensor:
    """name -> (n, r, k) -> (n, width): every matrix's values side by side in sorted-name order, as a row holds
    them."""
    return torch.cat([stacks[k].reshape(len(stacks[k]), -1) for k in sorted(stacks)], dim=1)


def build_target_queries(store: LanceStore, targets: Sequence[str], spec: ModelSpec, settings: GradientSettings,
                         methods: Sequence[EstimatorOptions], *, per_example: bool = False,
                         log: Log = print) -> QueriesSummary:
    """Every (target set, method) query from the stored preconditioners (see the module docstring);
    `per_example` (signals.cover): the target gradients are kept per example for the cover rankings."""
    start = time.perf_counter()
    fp = checked_fingerprint(store, settings)
    whitening = current_whitening(store, settings)
    queries, sizes, recomputed = [], {}, []
    for name in targets:
        target = target_gradient(store, name, spec, settings, fp, per_example=per_example, log=log)
        sizes[name] = target.count
        if target.recomputed:
            recomputed.append(name)
        for options in methods:
            vector, diagnostics = query_vector(store, target.mean, load_preconditioner(store, fp, options), whitening)
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
