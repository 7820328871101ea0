"""Stage: the rankings beside influence, written into `scores` with the one sign convention (score: higher =
keep; rank 1 = the example to keep first), so every `sql/` query, the mislabel report and the evaluation read
them like an estimator's:

    loss         target set `self`: -(the warm-up adapter's loss on the example's own label) (example_outputs:
                 from the gradient pass's own forward, no extra pass)
    margin       target set `self`: z_y - max_{c != y} z_c under the warm-up adapter (classification)
    aum          target set `self`: the mean margin over the warm-up's training steps (label_signals; an example
                 added after the warm-up has none, and its end-point margin stands in)
    probe        target set `self`: cleanlab's label quality of out-of-fold probabilities of a logistic regression
                 on the base model's frozen embeddings (stages/cross_fit.py)
    confident    target set `self`: cleanlab's label quality of out-of-fold probabilities of `folds` warm-ups
    similarity   every target set: the cosine of the example's frozen base-model embedding to the target set's
                 mean embedding (signals/similarity.py; `signals.similarity`, any task)
    *_unit       every target set, hyperinf and tracin (`signals.unit`): the estimator's stored score over the
                 example's stored gradient norm sqrt(sum_l |b_l|^2) (the rows' `sq_norms`): LESS's unit-normalised
                 gradients, so a large gradient (a wrong answer, a rarely predicted token) does not by itself
                 make an example influential
    *_cover      every target set, hyperinf and tracin (`signals.cover`): written by the influence scan itself
                 (stages/scores.py, signals/cover.py), listed here because `fused` may read them
    hyperinf_cp  every target set: HyperINF summed over the warm-up's checkpoints, each epoch's scores divided by
                 their standard deviation first (stages/checkpoints.py; the end point is the stored `hyperinf`;
                 an adapter without earlier checkpoints, given or trained one epoch, has its end point only)
    fused        every target set: the mean rank percentile (signals/fusion.py) of `fuse` members, each member
                 read for that target set (influence, hyperinf_cp) or for `self` (the target-free signals;
                 `self_influence` = self/hyperinf)

and `label_suggestions` (tasks with classes): per example the label the evidence suggests and whether cleanlab
marks the given one as an issue, from the out-of-fold probabilities when the cross-fit ran, else from the warm-up
adapter's own probabilities (in-sample: cleanlab's issues are then only the confidently predicted other labels).
Every ranking covers exactly the examples with a gradient row (example_outputs mirrors them). Causal LM: loss,
hyperinf_cp and fused; margin, aum, probe, confident and the suggestions need classes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from hyperinf_ops.adapters import AdapterStore
from hyperinf_ops.config.sections import DROP_ISSUES_MAX_FRACTION
from hyperinf_ops.errors import DataError
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.ranking_table import ranking_table, write_ranking
from hyperinf_ops.settings import (
    COVER_RANKINGS,
    SELF_SIGNALS,
    SELF_TARGET,
    SIGNALS,
    UNIT_RANKINGS,
    SignalSettings,
)
from hyperinf_ops.signals.fusion import rank_fusion
from hyperinf_ops.signals.label_quality import assess_labels
from hyperinf_ops.stages.checkpoints import checkpoint_signal
from hyperinf_ops.stages.common import Log, Summary, drop_stale, require_table
from hyperinf_ops.stages.scores import read_scores, row_norms
from hyperinf_ops.store import LanceStore, label_suggestions_schema, sql_literal

__all__ = ["RankingsSummary", "fusion_member", "write_rankings"]


@dataclass
class RankingsSummary(Summary):
    pairs: list[str]  # "target_set/method" written
    notes: list[str]  # what was left out and why
    suggestions: int  # rows of label_suggestions (0 for tasks without classes)
    issues: int  # of them marked as label issues
    suggestion_source: str  # "cross_fit", "warmup" or ""
    seconds: float
    fused_members: dict[str, list[str]] = field(default_factory=dict)  # target set -> the members fused


def fusion_member(member: str, target_set: str, estimators: Sequence[str]) -> tuple[str, str] | None:
    """The (target set, method) of `scores` a `signals.fuse` member reads for `target_set`, None if unknown."""
    if member in estimators or member in ("hyperinf_cp", "similarity", *UNIT_RANKINGS, *COVER_RANKINGS):
        return target_set, member
    if member == "self_influence":
        return SELF_TARGET, "hyperinf"
    if member in SELF_SIGNALS:
        return SELF_TARGET, member
    return None


def write_rankings(store: LanceStore, fingerprint: Fingerprint, gradients_version: int, run_id: str,
                   targets: Sequence[str], estimators: Sequence[str], signals: SignalSettings, fuse: Sequence[str],
                   *, sources: dict[str, str] | None = None, checkpoint_source: str | None = None,
                   log: Log = print) -> RankingsSummary:
    """Write the rankings of the module docstring for the gradient rows of `fingerprint` (scanned at
    `gradients_version` by run `run_id`). `sources` (signal -> source: stages.cross_fit.cross_fit_sources) /
    `checkpoint_source`: the sources the stored cross-fit and checkpoint rows must carry (stale rows are left
    out, with a note)."""
    start = time.perf_counter()
    outputs = _outputs(store, fingerprint)
    ids = outputs["sample_id"]
    n = len(ids)
    created = datetime.now(UTC)
    written: dict[tuple[str, str], np.ndarray] = {}
    notes: list[str] = []

    def put(target_set: str, method: str, values: np.ndarray) -> None:
        write_ranking(store, ranking_table(ids, target_set, method, values, fingerprint=fingerprint.digest(),
                                           gradients_version=gradients_version, run_id=run_id,
                                           created_at=created))
        written[(target_set, method)] = values

    put(SELF_TARGET, "loss", -outputs["loss"].to_numpy())
    classes = outputs["margin"].null_count == 0 and n > 0
    if classes:
        margin = outputs["margin"].to_numpy()
        put(SELF_TARGET, "margin", margin)
        aum = _aligned(store.read_label_signal("aum", SELF_TARGET), ids,
                       AdapterStore(store.root).require_current().adapter_hash)
        if aum is None:
            notes.append("aum: the warm-up recorded no margins (a given adapter): left out")
        else:
            missing = np.isnan(aum)
            if missing.any():
                notes.append(f"aum: {int(missing.sum())} examples added after the warm-up have their end-point "
                             "margin instead")
            put(SELF_TARGET, "aum", np.where(missing, margin, aum))
    cross_fitted = {}
    sources = dict(sources or {})
    similarity_source = sources.pop("similarity", None)
    for t in targets if similarity_source else ():
        values = _aligned(store.read_label_signal("similarity", t), ids, similarity_source)
        if values is None or np.isnan(values).any():
            notes.append(f"similarity/{t}: no current rows for these examples (materialize cross_fit): left out")
            continue
        put(t, "similarity", values)
    units = [m for m in ("hyperinf", "tracin") if m in estimators] if signals.unit else []
    norms = row_norms(store, fingerprint) if units else None
    for t in targets:
        for m in units:
            put(t, f"{m}_unit", _scores(store, t, m, ids) / norms.reindex(ids.to_pylist()).to_numpy())
    for name, source in sources.items() if classes else ():
        values = _aligned(store.read_label_signal(name, SELF_TARGET), ids, source)
        if values is None or np.isnan(values).any():
            notes.append(f"{name}: no current rows for these examples (materialize cross_fit): left out")
            continue
        cross_fitted[name] = values
        put(SELF_TARGET, name, values)
    if signals.checkpoints and "hyperinf" in estimators:
        epochs = AdapterStore(store.root).require_current().checkpoints
        for t in targets:
            end = _scores(store, t, "hyperinf", ids)
            cp = _checkpoint_sum(store, t, ids, epochs, checkpoint_source)
            if cp is None:
                notes.append(f"hyperinf_cp/{t}: no current checkpoint scores (materialize checkpoint_scores): "
                             "left out")
                continue
            put(t, "hyperinf_cp", cp + end / _spread(end))
        if not epochs:
            notes.append("hyperinf_cp: the adapter has no earlier checkpoints (given, or one epoch): its end-point "
                         "hyperinf")
    fused_members = {}
    for t in targets:
        members = {}
        for member in fuse:
            key = fusion_member(member, t, estimators)
            values = written.get(key) if key else None
            stored = key is not None and (key[1] in (*estimators, *COVER_RANKINGS) or key == (SELF_TARGET, "hyperinf"))
            if values is None and stored:
                values = _scores(store, *key, ids)
            if values is None:
                notes.append(f"fused/{t}: member {member!r} is not available: left out")
                continue
            members[member] = values
        if not members:
            raise DataError(f"fused/{t}: none of {list(fuse)} is available")
        fused_members[t] = list(members)
        put(t, "fused", rank_fusion(members))
    drop_stale(store, "scores", ["target_set", "method"], set(written),
               among=lambda key: key[1] in SIGNALS)
    suggestions, issues, source = _write_suggestions(store, outputs, classes,
                                                     store.read_label_signal("confident", SELF_TARGET)
                                                     if "confident" in cross_fitted else None)
    for note in notes:
        log(note)
    summary = RankingsSummary(pairs=[f"{t}/{m}" for t, m in sorted(written)], notes=notes, suggestions=suggestions,
                              issues=issues, suggestion_source=source, seconds=time.perf_counter() - start,
                              fused_members=fused_members)
    log(f"rankings {', '.join(summary.pairs)} written"
        + (f"; {issues} of {suggestions} labels marked as issues ({source})" if suggestions else ""))
    if suggestions and issues > DROP_ISSUES_MAX_FRACTION * suggestions:
        log(f"warning: {issues / suggestions:.0%} of the labels marked as issues: drop_issues drops at most "
            f"{DROP_ISSUES_MAX_FRACTION:.0%} by default (its max_fraction); a warm-up that has not learned the task "
            "counts its own mistakes as wrong labels (see its held-out accuracy)")
    return summary


def _outputs(store: LanceStore, fingerprint: Fingerprint) -> pa.Table:
    """The example outputs of the rows of `fingerprint`, sorted by sample id."""
    table = require_table(store, "example_outputs", "materialize lora_gradients first").to_table(
        columns=["sample_id", "loss", "margin", "probs"],
        filter=f"fingerprint = {sql_literal(fingerprint.digest())}")
    if table.num_rows == 0:
        raise DataError("no example outputs of the current gradient rows: materialize lora_gradients first")
    return table.sort_by("sample_id")


def _aligned(rows: pa.Table, ids: pa.ChunkedArray, source: str | None) -> np.ndarray | None:
    """The rows' values in the order of `ids` (NaN where an id has none); None when no row carries `source`
    (any source when None)."""
    if source is not None:
        rows = rows.filter(pa.compute.equal(rows["source"], source))
    if rows.num_rows == 0:
        return None
    by_id = dict(zip(rows["sample_id"].to_pylist(), rows["value"].to_pylist(), strict=True))
    return np.array([by_id.get(i, np.nan) for i in ids.to_pylist()], dtype=np.float64)


def _scores(store: LanceStore, target_set: str, method: str, ids: pa.ChunkedArray) -> np.ndarray:
    """The stored scores of one (target set, method) in the order of `ids`; DataError when some are missing."""
    s = read_scores(store, target_set, method).set_index("sample_id")["score"]
    values = s.reindex(ids.to_pylist()).to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        raise DataError(f"{target_set}/{method} has no score for {int(np.isnan(values).sum())} examples: "
                        "materialize influence_scores first")
    return values


def _spread(values: np.ndarray) -> float:
    std = float(np.std(values))
    return std if std > 0 else 1.0


def _checkpoint_sum(store: LanceStore, target_set: str, ids: pa.ChunkedArray, epochs: Sequence[int],
                    source: str | None) -> np.ndarray | None:
    """The sum over the checkpoints of `epochs` of their stored scores for `target_set`, each divided by its
    standard deviation (influence at an early checkpoint is on another scale than at the end); zeros without
    checkpoints; None when a checkpoint's rows are missing or of another source."""
    total = np.zeros(len(ids))
    for epoch in epochs:
        values = _aligned(store.read_label_signal(checkpoint_signal(epoch), target_set), ids, source)
        if values is None or np.isnan(values).any():
            return None
        total += values / _spread(values)
    return total


def _write_suggestions(store: LanceStore, outputs: pa.Table, classes: bool, cross_fit: pa.Table | None
                       ) -> tuple[int, int, str]:
    """Replace `label_suggestions` (module docstring); (rows, issues, source)."""
    if not classes:
        drop_stale(store, "label_suggestions", ["source"], set())
        return 0, 0, ""
    manifest = AdapterStore(store.root).require_current()
    labels = list(manifest.labels)
    index = {label: i for i, label in enumerate(labels)}
    examples = store.open("examples").to_table(columns=["sample_id", "label"])
    given = dict(zip(examples["sample_id"].to_pylist(), examples["label"].to_pylist(), strict=True))
    ids = outputs["sample_id"].to_pylist()
    if cross_fit is not None:
        probs_by_id = dict(zip(cross_fit["sample_id"].to_pylist(), cross_fit["probs"].to_pylist(), strict=True))
        probs, source = np.array([probs_by_id[i] for i in ids], dtype=np.float64), "cross_fit"
    else:
        probs, source = np.array(outputs["probs"].to_pylist(), dtype=np.float64), "warmup"
    y = np.array([index[str(given[i])] for i in ids])
    quality = assess_labels(y, probs / probs.sum(1, keepdims=True))
    table = pa.table({
        "sample_id": pa.array(ids, pa.string()),
        "label": pa.array([str(given[i]) for i in ids], pa.string()),
        "suggested_label": pa.array([labels[c] for c in quality.suggested], pa.string()),
        "suggested_probability": pa.array(quality.suggested_probability, pa.float64()),
        "issue": pa.array(quality.issues, pa.bool_()),
        "source": pa.repeat(pa.scalar(source, pa.string()), len(ids)),
    }, schema=label_suggestions_schema())
    store.replace_where("label_suggestions", {"source": source}, table, schema=label_suggestions_schema(),
                        also_delete=f"source != {sql_literal(source)}")
    return len(ids), int(quality.issues.sum()), source
