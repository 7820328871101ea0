"""Stage: what a person checks after scoring.

    mislabel_report   how well each ranking's most harmful examples find planted label flips (a boolean
                      `flipped` pool column): AUROC and the share of flips among the 10% / 20% / 30% most harmful;
                      with the target-free rankings (target set "self": self-influence, loss, margin, aum,
                      confident), and how good the label suggestions are (issues that are flips, suggestions
                      that are the truth: `true_label`, or for two classes the other label)
    agreement_check   Spearman between stored scores and exact scores (the stored fp64 Cholesky inverse of the
                      same curvature, the stored rows) on a seeded sample: the solver's error
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from hyperinf_ops.core.estimators import score_gradients
from hyperinf_ops.data.noise import true_labels
from hyperinf_ops.errors import DataError
from hyperinf_ops.scorer import raw_gradient_batches
from hyperinf_ops.settings import (
    SELF_INFLUENCE_METHODS,
    SELF_TARGET,
    EstimatorOptions,
    GradientSettings,
    ModelSpec,
)
from hyperinf_ops.stages.codec import current_whitening
from hyperinf_ops.stages.common import Log, Summary, require_table, sample_filter
from hyperinf_ops.stages.preconditioners import checked_fingerprint, load_preconditioner
from hyperinf_ops.stages.queries import target_gradient
from hyperinf_ops.stages.scores import extremes, read_scores
from hyperinf_ops.store import LanceStore

__all__ = ["DETECTION_CUTS", "SELF_INFLUENCE_PREFIX", "AgreementSummary", "MislabelReport", "agreement_check",
           "detection_metrics", "mislabel_report"]

# Report key of a self-influence ranking: "self_influence_hyperinf", "self_influence_tracin".
SELF_INFLUENCE_PREFIX = "self_influence_"
# Inspection budgets of the detection rate: the share of all flips among the p% most harmful examples.
DETECTION_CUTS = (10, 20, 30)


@dataclass
class MislabelReport(Summary):
    target_set: str
    has_truth: bool  # the pool has a `flipped` column
    examples: int
    flipped: int
    # ranking -> auroc, detection_at_10, _20, _30: the target set's rankings (by method), and the target-free
    # ones: "self_influence_hyperinf", "self_influence_tracin", and the signals by name
    methods: dict[str, dict[str, float]]
    most_harmful: list[dict[str, Any]]
    # label_suggestions against the truth: issues, of them flips, suggestions equal to the truth (None: unknown)
    suggestions: dict[str, Any] | None = None


@dataclass
class AgreementSummary(Summary):
    method: str
    reference: str
    sample_size: int
    spearman: dict[str, float]  # target set -> Spearman of stored vs exact scores (same rows)
    min_spearman: float
    seconds: float


def _auroc(harm: np.ndarray, positive: np.ndarray) -> float:
    """P(a random positive has higher `harm` than a random negative), ties counted half (Mann-Whitney)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = pd.Series(harm).rank(method="average").to_numpy()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_metrics(harm: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """AUROC of `harm` vs flipped, and the share of all flips among the ceil(n p / 100) most harmful (stable
    order) for p in DETECTION_CUTS: `detection_at_<p>`."""
    order = np.argsort(-harm, kind="stable")
    found = {f"detection_at_{p}": float(flipped[order[: math.ceil(len(harm) * p / 100)]].sum()
                                        / max(flipped.sum(), 1)) for p in DETECTION_CUTS}
    return {"auroc": _auroc(harm, flipped), **found}


def mislabel_report(store: LanceStore, methods: Sequence[str], *, target_set: str, task: str) -> MislabelReport:
    """The report of the module docstring for one target set's rankings `methods` (the first is the one whose
    most harmful examples are listed) and every stored target-free ranking, from the stored scores; without a
    `flipped` column only the most harmful examples are listed."""
    examples = require_table(store, "examples", "ingest the pool first")
    has_truth = "flipped" in examples.schema.names
    columns = ["sample_id", "label", *(c for c in ("flipped", "true_label") if c in examples.schema.names)]
    pool = examples.to_table(columns=columns).to_pandas().set_index("sample_id")
    truth = pool["flipped"].astype(bool) if has_truth else None
    rankings = {}
    reported = [(target_set, m, m) for m in methods]
    if truth is not None:
        stored = store.open("scores").to_table(columns=["method"], filter=f"target_set = '{SELF_TARGET}'")
        for method in sorted(set(stored["method"].to_pylist())):
            name = f"{SELF_INFLUENCE_PREFIX}{method}" if method in SELF_INFLUENCE_METHODS else method
            reported.append((SELF_TARGET, method, name))
    for target, method, name in reported:
        s = read_scores(store, target, method)
        if s.empty:
            raise DataError(f"no scores for {target}/{method}: materialize influence_scores first")
        if truth is not None:  # harm = -score: the most negative score (for self: the largest self-influence)
            flipped = truth.reindex(s["sample_id"], fill_value=False).to_numpy(dtype=bool)
            rankings[name] = detection_metrics(-s["score"].to_numpy(), flipped)
    return MislabelReport(target_set=target_set, has_truth=has_truth, examples=examples.count_rows(),
                          flipped=int(truth.sum()) if truth is not None else 0, methods=rankings,
                          most_harmful=extremes(store, task, target_set, methods[0], helpful=False),
                          suggestions=_suggestion_quality(store, pool) if has_truth else None)


def _suggestion_quality(store: LanceStore, pool: pd.DataFrame) -> dict[str, Any] | None:
    """How `label_suggestions` fare against the planted flips: the issues, how many are flips (precision) and
    how many flips they find (recall), and how many flipped issues are suggested their true label."""
    if not store.exists("label_suggestions"):
        return None
    g = store.open("label_suggestions").to_table().to_pandas().set_index("sample_id").join(pool, rsuffix="_pool")
    if g.empty:
        return None
    flipped = g["flipped"].astype(bool)
    issues = g["issue"].astype(bool)
    truth = true_labels(g["label"].tolist(), flipped.tolist(), g["true_label"].tolist() if "true_label" in g else None,
                        sorted(pool["label"].astype(str).unique()))
    found = issues & flipped
    return {"source": str(g["source"].iloc[0]), "issues": int(issues.sum()), "issues_flipped": int(found.sum()),
            "precision": float(found.sum() / max(issues.sum(), 1)), "recall": float(found.sum() / max(flipped.sum(), 1)),
            "suggested_truth": None if truth is None else int((found & (g["suggested_label"] == truth)).sum())}


def agreement_check(store: LanceStore, spec: ModelSpec, settings: GradientSettings, options: EstimatorOptions,
                    targets: Sequence[str], *, sample_size: int = 64, seed: int = 0,
                    log: Log = print) -> AgreementSummary:
    """Spearman between the stored scores of `options.method` and exact scores on a seeded sample of the pool:
    the stored exact inverse applied to the stored mean target gradients, dotted with the sample's stored rows
    (in row space: what compression costs is measured offline, benchmarks/bench_compression.py)."""
    start = time.perf_counter()
    fp = checked_fingerprint(store, settings)
    exact = load_preconditioner(store, fp, options.model_copy(update={"method": "exact"}))
    where = sample_filter(store.open("gradients"), sample_size, seed)
    batches = list(raw_gradient_batches(store, exact.shapes, whitening=current_whitening(store, settings),
                                        filter=where))
    sample_ids = [i for batch_ids, _ in batches for i in batch_ids]
    sample = {name: torch.cat([g[name].cpu() for _, g in batches]) for name in exact.shapes}
    spearman = {}
    for name in targets:
        v = target_gradient(store, name, spec, settings, fp, log=log).mean
        reference = score_gradients(exact.apply_one(v), sample).numpy()
        stored = read_scores(store, name, options.method).set_index("sample_id")["score"].reindex(sample_ids)
        spearman[name] = float(pd.Series(reference).corr(pd.Series(stored.to_numpy()), method="spearman"))
    summary = AgreementSummary(method=options.method, reference="exact", sample_size=len(sample_ids),
                               spearman=spearman, min_spearman=min(spearman.values()),
                               seconds=time.perf_counter() - start)
    log(f"agreement of stored {options.method} scores with exact scores of the same rows on {len(sample_ids)} examples: "
        + ", ".join(f"{k} Spearman {v:.4f}" for k, v in spearman.items()))
    return summary
