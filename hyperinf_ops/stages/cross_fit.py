"""Stage: the `confident` signal, cleanlab's label quality of out-of-fold probabilities (signals/cross_fit.py,
signals/label_quality.py), stored in `label_signals` (signal `confident`, target set `self`): the quality score
as the value (higher = keep), the probabilities and cleanlab's label-issue flag per example.

Cost: `folds` warm-ups with the warm-up's recipe, each on (folds - 1) / folds of the pool, and one forward pass
of the pool. The rows are reused while their source (model, labels, LoRA and training settings, folds and the
pool's content) is unchanged; a changed pool computes them again. Classification only.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np

from hyperinf_ops.data.prepare import content_digest, record_columns
from hyperinf_ops.settings import SELF_TARGET, LoraSettings, ModelSpec, TrainSettings
from hyperinf_ops.signals.cross_fit import out_of_fold_probabilities
from hyperinf_ops.signals.label_quality import assess_labels
from hyperinf_ops.stages.adapter import adapter_recipe, pool_labels
from hyperinf_ops.stages.common import Log, Summary, require_table
from hyperinf_ops.store import LanceStore
from hyperinf_ops.tasks import get_task

__all__ = ["CrossFitSummary", "cross_fit_labels", "cross_fit_source"]

SIGNAL = "confident"


@dataclass
class CrossFitSummary(Summary):
    computed: bool  # False: skipped (off, a task without classes) or the stored rows were current
    folds: int
    examples: int
    issues: int  # examples cleanlab marks as likely mislabeled
    source: str
    note: str
    seconds: float


def cross_fit_source(store: LanceStore, spec: ModelSpec, lora: LoraSettings, train: TrainSettings,
                     folds: int) -> str:
    """What the `confident` rows depend on: the warm-up recipe, the folds and the pool's content (a digest)."""
    examples = require_table(store, "examples", "ingest the pool first").to_table(
        columns=["sample_id", "content_hash"])
    recipe = adapter_recipe(pool_labels(store, spec.task), spec, lora, train, None)
    pool = content_digest(examples["sample_id"].to_pylist(), examples["content_hash"].to_pylist())
    return hashlib.sha256(json.dumps([recipe, folds, pool]).encode()).hexdigest()[:32]


def cross_fit_labels(store: LanceStore, spec: ModelSpec, lora: LoraSettings, train: TrainSettings, folds: int, *,
                     log: Log = print) -> CrossFitSummary:
    """Compute (or keep) the `confident` rows of the module docstring."""
    start = time.perf_counter()
    if folds == 0 or not get_task(spec.task).has_classes:
        note = ("signals.folds is 0: no cross-fit" if folds == 0
                else f"task {spec.task} has no classes: no cross-fit")
        log(note)
        return CrossFitSummary(computed=False, folds=folds, examples=0, issues=0, source="", note=note,
                               seconds=time.perf_counter() - start)
    source = cross_fit_source(store, spec, lora, train, folds)
    stored = store.read_label_signal(SIGNAL, SELF_TARGET)
    if stored.num_rows and set(stored["source"].to_pylist()) == {source}:
        issues = int(np.asarray(stored["issue"].to_pylist(), dtype=bool).sum())
        log(f"cross-fit {source}: current ({stored.num_rows} examples, {issues} label issues): skipped")
        return CrossFitSummary(computed=False, folds=folds, examples=stored.num_rows, issues=issues, source=source,
                               note="current", seconds=time.perf_counter() - start)
    classes = pool_labels(store, spec.task)
    records = store.open("examples").to_table(columns=record_columns(spec.task)).to_pylist()
    log(f"cross-fit: {folds} warm-ups on {folds - 1}/{folds} of {len(records)} examples each (the warm-up's recipe), "
        "each predicting the fold it did not see")
    probs = out_of_fold_probabilities(spec, lora, train, classes, records, folds, log=log)
    index = {c: i for i, c in enumerate(classes)}
    quality = assess_labels(np.array([index[r["label"]] for r in records]), probs)
    store.write_label_signal(SIGNAL, SELF_TARGET, [r["sample_id"] for r in records], quality.quality, source=source,
                             probs=probs, issues=quality.issues)
    summary = CrossFitSummary(computed=True, folds=folds, examples=len(records), issues=int(quality.issues.sum()),
                              source=source, note="computed", seconds=time.perf_counter() - start)
    log(f"cross-fit: {summary.issues} of {len(records)} labels marked as issues by cleanlab "
        f"({summary.seconds:.0f} s)")
    return summary
