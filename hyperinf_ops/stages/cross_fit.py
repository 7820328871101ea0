"""Stage: the label-quality signals that come from models which never saw the label they judge, stored in
`label_signals` (target set `self`) with cleanlab's label quality as the value (higher = keep), the out-of-fold
probabilities and cleanlab's label-issue flag per example:

    probe      a logistic regression on the base model's frozen mean-pooled embeddings, 5-fold out-of-fold
               (signals/probe.py): one forward pass of the pool and seconds of fitting (`signals.probe`)
    confident  `signals.folds` warm-ups with the warm-up's recipe, each on (folds - 1) / folds of the pool,
               predicting the fold it did not see (signals/cross_fit.py): `folds` warm-ups of cost

Each is reused while its source (model, labels, recipe, folds and the pool's content) is unchanged; a changed
pool computes it again. Classification only (a causal LM has no label to judge). Beside them, for any task:

    similarity the cosine of each example's frozen base-model embedding to each target set's mean embedding
               (signals/similarity.py), one row per (target set, example): the baseline a user tries before
               gradients (`signals.similarity`); one forward pass of the pool and the target sets
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hyperinf_ops.data.prepare import content_digest, record_columns
from hyperinf_ops.settings import SELF_TARGET, LoraSettings, ModelSpec, SignalSettings, TrainSettings
from hyperinf_ops.signals.label_quality import assess_labels
from hyperinf_ops.signals.similarity import EMBEDDING_VERSION
from hyperinf_ops.stages.adapter import adapter_recipe, pool_labels
from hyperinf_ops.stages.common import Log, Summary, require_table
from hyperinf_ops.store import LanceStore
from hyperinf_ops.tasks import get_task

__all__ = ["CrossFitSummary", "cross_fit_labels", "cross_fit_sources"]

PROBE_FOLDS = 5


@dataclass
class CrossFitSummary(Summary):
    computed: list[str]  # signals computed now (the others were current, off or not applicable)
    examples: int
    issues: dict[str, int]  # signal -> examples cleanlab marks as likely mislabeled
    sources: dict[str, str]
    notes: list[str]
    seconds: float
    seconds_per_signal: dict[str, float] = field(default_factory=dict)


def cross_fit_sources(store: LanceStore, spec: ModelSpec, lora: LoraSettings, train: TrainSettings,
                      signals: SignalSettings) -> dict[str, str]:
    """signal -> what its rows depend on (a digest), for the signals these settings compute: the model and labels
    (probe: and max_length; confident: the warm-up recipe and the folds; similarity: the model, max_length and
    the target sets' content), and the pool's content. probe and confident need classes."""
    classes = get_task(spec.task).has_classes
    if not (classes or signals.similarity):
        return {}
    examples = require_table(store, "examples", "ingest the pool first").to_table(
        columns=["sample_id", "content_hash"])
    pool = content_digest(examples["sample_id"].to_pylist(), examples["content_hash"].to_pylist())
    recipe = adapter_recipe(pool_labels(store, spec.task), spec, lora, train, None) if classes else None
    parts = {"probe": [recipe, "probe", PROBE_FOLDS, pool] if classes and signals.probe else None,
             "confident": [recipe, signals.folds, pool] if classes and signals.folds else None,
             "similarity": [spec.name, spec.max_length, pool, _targets_digest(store), EMBEDDING_VERSION]
             if signals.similarity else None}
    return {name: hashlib.sha256(json.dumps(part).encode()).hexdigest()[:32] for name, part in parts.items()
            if part is not None}


def _targets_digest(store: LanceStore) -> str:
    sets = require_table(store, "targets", "ingest the target sets first").to_table(
        columns=["target_set", "sample_id", "content_hash"])
    return content_digest([f"{t}/{i}" for t, i in zip(sets["target_set"].to_pylist(), sets["sample_id"].to_pylist(),
                                                       strict=True)], sets["content_hash"].to_pylist())


def _similarity_current(store: LanceStore, source: str, log: Log) -> bool:
    """Whether every target set's stored `similarity` rows carry `source` (then they are kept)."""
    sets = set(store.open("targets").to_table(columns=["target_set"])["target_set"].to_pylist())
    if all(set(store.read_label_signal("similarity", t)["source"].to_pylist()) == {source} for t in sets):
        log(f"similarity {source}: current for {len(sets)} target sets: skipped")
        return True
    return False


def _similarity(store: LanceStore, records: list[dict], targets: list[dict], embedded: np.ndarray, source: str,
                log: Log) -> None:
    """Write `similarity` for every target set (signals/similarity.py) from `embedded`: the pool's embeddings,
    then the target sets' examples'."""
    from hyperinf_ops.signals.similarity import target_similarity

    pool, target_rows = embedded[: len(records)], embedded[len(records):]
    sets = np.array([t["target_set"] for t in targets], dtype=object)
    for name in sorted(set(sets)):
        values = target_similarity(pool, target_rows[sets == name])
        store.write_label_signal("similarity", name, [r["sample_id"] for r in records], values, source=source)
        log(f"similarity/{name}: cosine of {len(records)} pool embeddings to the mean of {int((sets == name).sum())} "
            "target ones")


def cross_fit_labels(store: LanceStore, spec: ModelSpec, lora: LoraSettings, train: TrainSettings,
                     signals: SignalSettings, *, log: Log = print) -> CrossFitSummary:
    """Compute (or keep) the signals of the module docstring."""
    from hyperinf_ops.models import resolve_model
    from hyperinf_ops.signals.cross_fit import out_of_fold_probabilities
    from hyperinf_ops.signals.probe import out_of_fold_probe
    from hyperinf_ops.signals.similarity import embed_records

    start = time.perf_counter()
    sources = cross_fit_sources(store, spec, lora, train, signals)
    label_sources = {name: source for name, source in sources.items() if name != "similarity"}
    notes = [] if label_sources else [f"task {spec.task} has no classes: no probe, no cross-fit" if not
                                      get_task(spec.task).has_classes else "signals.probe and signals.folds are off"]
    classes = pool_labels(store, spec.task) if label_sources else []
    # sorted by sample id: the folds and the warm-ups' shuffles must not depend on the order rows are stored in
    records = sorted(store.open("examples").to_table(columns=record_columns(spec.task)).to_pylist(),
                     key=lambda r: r["sample_id"]) if sources else []
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r["label"]] for r in records] if label_sources else [], dtype=np.int64)
    similarity_due = "similarity" in sources and not _similarity_current(store, sources["similarity"], log)
    targets = store.open("targets").to_table(columns=["target_set", *record_columns(spec.task)]).to_pylist() \
        if similarity_due else []

    @functools.cache
    def embedded() -> np.ndarray:
        """(N + M, h) frozen embeddings of the pool, then of the target sets' examples when similarity is due: one
        forward pass (one model load) for the probe and similarity both."""
        log(f"embedding {len(records)} pool and {len(targets)} target examples with the base model {spec.name}")
        return embed_records(resolve_model(spec.name), [*records, *targets], spec.task, spec.max_length,
                             progress=lambda event: log(str(event)))

    fits: dict[str, Callable[[], np.ndarray]] = {
        "probe": lambda: out_of_fold_probe(embedded()[: len(records)], [r["label"] for r in records], classes,
                                           folds=PROBE_FOLDS, seed=train.seed),
        "confident": lambda: out_of_fold_probabilities(spec, lora, train, classes, records, signals.folds, log=log),
    }
    computed, issues, timing = [], {}, {}
    if similarity_due:
        started = time.perf_counter()
        _similarity(store, records, targets, embedded(), sources["similarity"], log)
        computed.append("similarity")
        timing["similarity"] = time.perf_counter() - started
    for name, source in label_sources.items():
        stored = store.read_label_signal(name, SELF_TARGET)
        if stored.num_rows and set(stored["source"].to_pylist()) == {source}:
            issues[name] = int(np.asarray(stored["issue"].to_pylist(), dtype=bool).sum())
            log(f"{name} {source}: current ({stored.num_rows} examples, {issues[name]} label issues): skipped")
            continue
        started = time.perf_counter()
        log(f"{name}: " + ("5-fold logistic regression on the base model's frozen embeddings of "
                           f"{len(records)} examples" if name == "probe" else
                           f"{signals.folds} warm-ups on {signals.folds - 1}/{signals.folds} of {len(records)} "
                           "examples each (the warm-up's recipe), each predicting the fold it did not see"))
        try:
            probs = fits[name]()
        except ValueError as err:  # e.g. a class with one example cannot be split into folds
            notes.append(f"{name}: not computed ({err})")
            continue
        quality = assess_labels(labels, probs)
        store.write_label_signal(name, SELF_TARGET, [r["sample_id"] for r in records], quality.quality,
                                 source=source, probs=probs, issues=quality.issues)
        computed.append(name)
        issues[name] = int(quality.issues.sum())
        timing[name] = time.perf_counter() - started
        log(f"{name}: {issues[name]} of {len(records)} labels marked as issues by cleanlab ({timing[name]:.0f} s)")
    for note in notes:
        log(note)
    return CrossFitSummary(computed=computed, examples=len(records), issues=issues, sources=sources, notes=notes,
                           seconds=time.perf_counter() - start, seconds_per_signal=timing)
