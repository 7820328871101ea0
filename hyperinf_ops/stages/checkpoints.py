"""Stage: HyperINF under the warm-up's earlier epoch checkpoints, the parts of `hyperinf_cp` (TracIn-CP / LESS
practice: influence summed over checkpoints of one training run, not read off its end point alone).

For each checkpoint c kept by the warm-up (adapters.py: the adapter's tensors after every epoch but the last),
with the model's LoRA and head tensors set to c:

    G_l^c   the GFIM of a seeded pilot sample of the pool (`compression.pilot_examples`, drawn as the row codec
            draws it; the whole pool when it is smaller: then exact), damped and inverted once (hyperinf)
    v^c     each target set's mean gradient
    s^c(k)  = sum_l < v_l^c (G_l^c + lambda_l I)^-1 , g_{k,l}^c >   for every pool example k (score = -I: higher =
            more helpful), from one gradient pass of the pool (no row is stored)

stored in `label_signals` as signal `hyperinf@<epoch>` per target set. stages/rankings.py sums them with the
stored end-point scores into `hyperinf_cp`. Cost per checkpoint: one gradient pass of the pool (the pilot's
gradients, a sample of it, are scored from memory while under PILOT_REUSE_BYTES) and of the target sets. Rows are reused while their source (adapter,
target sets, pool, solver options) is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc
import torch

from hyperinf_ops.adapters import AdapterStore
from hyperinf_ops.core.curvature import CurvaturePartial, curvature_partials
from hyperinf_ops.core.estimators import score_gradients
from hyperinf_ops.core.sketch import Sketch
from hyperinf_ops.data.prepare import content_digest, record_columns
from hyperinf_ops.models.lora import adapter_parameters
from hyperinf_ops.preconditioners import prepare
from hyperinf_ops.settings import EstimatorOptions, GradientSettings, ModelSpec
from hyperinf_ops.stages.common import Log, Summary, require_table, sample_filter
from hyperinf_ops.store import LanceStore, sql_literal

__all__ = ["CheckpointSummary", "checkpoint_influence", "checkpoint_signal", "checkpoint_source"]


# The pilot's gradients are kept for scoring (the pilot is a sample of the pool: no second pass over it) while
# they take at most this much memory; above it (LLM widths) they are computed again in the pool's pass.
PILOT_REUSE_BYTES = 512 * 2**20


def checkpoint_signal(epoch: int) -> str:
    """The `label_signals` signal name of the HyperINF scores under the checkpoint after `epoch`."""
    return f"hyperinf@{epoch}"


@dataclass
class CheckpointSummary(Summary):
    checkpoints: list[int]  # epochs whose checkpoint was scored (or found current)
    computed: bool
    pilot_examples: int
    source: str
    seconds: float
    converged: dict[str, bool] = field(default_factory=dict)  # "epoch<e>" -> every inverse converged


def checkpoint_source(store: LanceStore, settings: GradientSettings, options: EstimatorOptions,
                      targets: Sequence[str]) -> str:
    """What the checkpoint rows depend on: the current adapter, the pool's and the target sets' content, the
    solver options and the gradient settings (a digest)."""
    adapter = AdapterStore(store.root).require_current().adapter_hash
    pool = store.open("examples").to_table(columns=["sample_id", "content_hash"])
    sets = store.open("targets").to_table(columns=["target_set", "sample_id", "content_hash"])
    digests = {t: content_digest(*(sets.filter(pc.equal(sets["target_set"], t))[c].to_pylist()
                                   for c in ("sample_id", "content_hash"))) for t in targets}
    return hashlib.sha256(json.dumps([
        adapter, content_digest(pool["sample_id"].to_pylist(), pool["content_hash"].to_pylist()), digests,
        options.model_dump(), settings.model_dump(mode="json")]).encode()).hexdigest()[:32]


def checkpoint_influence(store: LanceStore, spec: ModelSpec, settings: GradientSettings, options: EstimatorOptions,
                         targets: Sequence[str], *, log: Log = print) -> CheckpointSummary:
    """Score the pool under every earlier checkpoint of the current adapter (module docstring)."""
    from hyperinf_ops.stages.loading import finite_rows, gradient_batches, load_current_model

    start = time.perf_counter()
    adapters = AdapterStore(store.root)
    manifest = adapters.require_current()
    checkpoints = adapters.checkpoints(manifest)
    source = checkpoint_source(store, settings, options, targets)
    if not checkpoints:
        log(f"adapter {manifest.short_hash} has no earlier checkpoints (given, or trained for one epoch): "
            "hyperinf_cp is its end-point HyperINF")
        return CheckpointSummary(checkpoints=[], computed=False, pilot_examples=0, source=source,
                                 seconds=time.perf_counter() - start)
    done = [e for e in checkpoints if all(
        set(store.read_label_signal(checkpoint_signal(e), t)["source"].to_pylist()) == {source} for t in targets)]
    if len(done) == len(checkpoints):
        log(f"checkpoint scores {source} of epochs {sorted(checkpoints)}: current, skipped")
        return CheckpointSummary(checkpoints=sorted(checkpoints), computed=False, pilot_examples=0, source=source,
                                 seconds=time.perf_counter() - start)
    examples = require_table(store, "examples", "ingest the pool first")
    pool = examples.to_table(columns=record_columns(spec.task)).to_pylist()
    pilot_filter = sample_filter(examples, settings.compression.pilot_examples, settings.compression.seed)
    pilot = examples.to_table(columns=record_columns(spec.task), filter=pilot_filter).to_pylist()
    target_records = {t: store.open("targets").to_table(
        columns=record_columns(spec.task), filter=f"target_set = {sql_literal(t)}").to_pylist() for t in targets}
    loaded, _ = load_current_model(store.root, spec)
    params = adapter_parameters(loaded.model)
    final = {k: v.detach().clone() for k, v in params.items()}
    sketch = Sketch(manifest.selected_shapes(settings.modules), settings.compression, device=loaded.device)

    def blocks(records: list, phase: str):
        for ids, grads, _ in gradient_batches(loaded, records, settings, spec.max_length, phase=phase, log=log):
            keep = finite_rows(grads)
            yield [i for i, ok in zip(ids, keep.tolist(), strict=True) if ok], \
                sketch.apply({k: g[keep] for k, g in grads.items()})

    converged = {}
    try:
        for epoch, tensors in sorted(checkpoints.items()):
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value.to(params[name].device))
            curvature: dict[str, CurvaturePartial] = {}
            kept, kept_bytes = [], 0  # the pilot's gradients, scored below instead of computed twice
            for batch_ids, b in blocks(pilot, f"checkpoint {epoch}: curvature pilot"):
                for name, part in curvature_partials(b).items():
                    curvature[name] = part if name not in curvature else curvature[name].merge(part)
                kept_bytes += sum(g.numel() * g.element_size() for g in b.values())
                if kept is not None and kept_bytes <= PILOT_REUSE_BYTES:
                    kept.append((batch_ids, b))
                else:
                    kept = None  # over the budget: the pool's pass computes them again
            prepared = prepare(curvature, options)
            converged[f"epoch{epoch}"] = all(d.converged for d in prepared.diagnostics.values())
            queries = {}
            for t, records in target_records.items():
                total, n = None, 0
                for _, b in blocks(records, f"checkpoint {epoch}: target set {t}"):
                    part = {k: g.sum(0, dtype=torch.float64) for k, g in b.items()}
                    total = part if total is None else {k: total[k] + part[k] for k in part}
                    n += len(next(iter(b.values())))
                queries[t] = prepared.apply_one({k: (g / n) for k, g in total.items()})
            ids, scores = [], {t: [] for t in targets}
            reused = {i for batch_ids, _ in kept or () for i in batch_ids}
            rest = [r for r in pool if r["sample_id"] not in reused]
            for batch_ids, b in [*(kept or ()), *blocks(rest, f"checkpoint {epoch}: pool")]:
                ids += batch_ids
                for t, q in queries.items():
                    scores[t].append(score_gradients(q, b).cpu().numpy())
            for t in targets:
                store.write_label_signal(checkpoint_signal(epoch), t, ids, np.concatenate(scores[t]), source=source)
    finally:
        with torch.no_grad():
            for name, value in final.items():
                params[name].copy_(value)
    summary = CheckpointSummary(checkpoints=sorted(checkpoints), computed=True, pilot_examples=len(pilot),
                                source=source, seconds=time.perf_counter() - start, converged=converged)
    log(f"HyperINF under checkpoints of epochs {summary.checkpoints} ({len(pilot)}-example curvature pilot, "
        f"{len(pool)} pool examples) in {summary.seconds:.0f} s")
    return summary
