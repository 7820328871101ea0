"""Stage: what a person checks after scoring.

    mislabel_report   how well each ranking's most harmful examples find planted label flips (a boolean
                      `flipped` pool column): AUROC and the share of flips among the 10% / 20% / 30% most harmful; with
                      the target-free self-influence rankings (the scores of target set "self")
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

from hyperinf_ops.errors import DataError
from hyperinf_ops.estimators import score_gradients
from hyperinf_ops.scorer import raw_gradient_batches
from hyperinf_ops.settings import EstimatorOptions, GradientSettings, ModelSpec
from hyperinf_ops.stages.codec import current_whitening
from hyperinf_ops.stages.common import Log, Summary, require_table, sample_filter
from hyperinf_ops.stages.preconditioners import checked_fingerprint, load_preconditioner
from hyperinf_ops.stages.queries import target_gradient
from hyperinf_ops.stages.scores import extremes, read_scores, self_influence_pairs
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
    # ranking -> auroc, detection_at_10, _20, _30: the configured methods (by name) and
    # "self_influence_hyperinf" and "self_influence_tracin" (no target set)
    methods: dict[str, dict[str, float]]
    most_harmful: list[dict[str, Any]]


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


def mislabel_report(store: LanceStore, settings: GradientSettings, methods: Sequence[EstimatorOptions], *,
                    target_set: str, task: str) -> MislabelReport:
    """The report of the module docstring for one target set, from the stored scores (also the self-influence
    rankings `influence_scores` wrote as target set "self"); without a `flipped` column only the most harmful
    examples (of the first method) are listed."""
    examples = require_table(store, "examples", "ingest the pool first")
    has_truth = "flipped" in examples.schema.names
    truth = (examples.to_table(columns=["sample_id", "flipped"]).to_pandas().set_index("sample_id")["flipped"]
             .astype(bool) if has_truth else None)
    rankings = {}
    reported = [(target_set, o.method, o.method) for o in methods]
    if truth is not None:
        reported += [(t, m, f"{SELF_INFLUENCE_PREFIX}{m}") for t, m in sorted(self_influence_pairs())]
    for target, method, name in reported:
        s = read_scores(store, target, method)
        if s.empty:
            raise DataError(f"no scores for {target}/{method}: materialize influence_scores first")
        if truth is not None:  # harm = -score: the most negative score (for self: the largest self-influence)
            flipped = truth.reindex(s["sample_id"], fill_value=False).to_numpy(dtype=bool)
            rankings[name] = detection_metrics(-s["score"].to_numpy(), flipped)
    return MislabelReport(target_set=target_set, has_truth=has_truth, examples=examples.count_rows(),
                          flipped=int(truth.sum()) if truth is not None else 0, methods=rankings,
                          most_harmful=extremes(store, task, target_set, methods[0].method, helpful=False))


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
        v, _, _ = target_gradient(store, name, spec, settings, fp, log=log)
        reference = score_gradients(exact.apply_one(v), sample).numpy()
        stored = read_scores(store, name, options.method).set_index("sample_id")["score"].reindex(sample_ids)
        spearman[name] = float(pd.Series(reference).corr(pd.Series(stored.to_numpy()), method="spearman"))
    summary = AgreementSummary(method=options.method, reference="exact", sample_size=len(sample_ids),
                               spearman=spearman, min_spearman=min(spearman.values()),
                               seconds=time.perf_counter() - start)
    log(f"agreement of stored {options.method} scores with exact scores of the same rows on {len(sample_ids)} examples: "
        + ", ".join(f"{k} Spearman {v:.4f}" for k, v in spearman.items()))
    return summary
