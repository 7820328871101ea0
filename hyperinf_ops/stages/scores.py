"""Stage: every stored gradient row scored against every configured (target set, method) query, its
self-influence under the stored hyperinf / tracin preconditioners (target set "self") and, with
`signals.cover`, every target example's query of the cover rankings (`<method>_cover`, signals/cover.py), in one
scan (`scorer.score_store`), with the numbers a person checks first: score distribution and the extremes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from hyperinf_ops.data.prepare import RESERVED_COLUMNS
from hyperinf_ops.errors import DataError
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.scorer import QueryGroup, score_store
from hyperinf_ops.settings import (
    SELF_INFLUENCE_METHODS,
    SELF_TARGET,
    SIGNALS,
    EstimatorOptions,
    GradientSettings,
    ModelSpec,
)
from hyperinf_ops.signals.cover import cover_scores
from hyperinf_ops.stages.codec import current_whitening
from hyperinf_ops.stages.common import Log, Summary, drop_stale
from hyperinf_ops.stages.preconditioners import checked_fingerprint, load_preconditioner
from hyperinf_ops.store import LanceStore, sql_literal
from hyperinf_ops.tasks import get_task

__all__ = ["ScoreStepSummary", "display_columns", "extremes", "read_scores", "row_norms", "score",
           "self_influence_pairs"]

SHOWN = 10  # rows in "most helpful / most harmful" lists
SHOWN_CARRY = 4  # carry columns in them: a pool may carry dozens


@dataclass
class ScoreStepSummary(Summary):
    rows: int
    examples: int  # pool size; rows < examples means some examples have no gradient row
    pairs: list[str]  # "target_set/method", self-influence as "self/method"
    digest: str  # over every (target set, method, sample, score): equal scores, equal digest
    scores_version: int
    gradients_version: int
    run_id: str
    device: str
    seconds: float
    rows_per_second: float
    score_stats: dict[str, dict[str, float]]  # "target/method" -> min, p10, median, p90, max, negative share
    most_helpful: list[dict[str, Any]]  # for the curation target set and method
    most_harmful: list[dict[str, Any]]


def read_scores(store: LanceStore, target: str, method: str) -> pd.DataFrame:
    """sample_id, score, rank of one (target set, method)."""
    return store.open("scores").to_table(
        columns=["sample_id", "score", "rank"],
        filter=f"target_set = {sql_literal(target)} AND method = {sql_literal(method)}").to_pandas()


def display_columns(names: Sequence[str], task: str) -> list[str]:
    """The columns an example is shown with, out of a prepared table's column names: sample_id, label, the
    first `SHOWN_CARRY` columns the pool only carries along (`flipped` first: the truth the mislabel report is
    judged by; a pool may carry dozens), then the text columns (the widest, last)."""
    carried = sorted((c for c in names if c not in RESERVED_COLUMNS), key=lambda c: c != "flipped")
    return ["sample_id", "label", *carried[:SHOWN_CARRY], *get_task(task).text_columns]


def extremes(store: LanceStore, task: str, target: str, method: str, *, helpful: bool,
             k: int = SHOWN) -> list[dict[str, Any]]:
    """The k most helpful (or harmful) examples, most extreme first: rank, score and the `display_columns`."""
    ranked = read_scores(store, target, method).sort_values("rank", ascending=helpful).head(k)
    if ranked.empty:
        return []
    ids = ", ".join(sql_literal(i) for i in ranked["sample_id"])
    examples = store.open("examples")
    columns = display_columns(examples.schema.names, task)
    info = {r["sample_id"]: r for r in examples.to_table(columns=columns, filter=f"sample_id IN ({ids})").to_pylist()}
    return [{"rank": int(rk), "score": float(s), **info[sid]}
            for sid, s, rk in zip(ranked["sample_id"], ranked["score"], ranked["rank"], strict=True)]


def self_influence_pairs() -> set[tuple[str, str]]:
    """The (SELF_TARGET, method) pairs the influence_scores asset writes: one per SELF_INFLUENCE_METHODS."""
    return {(SELF_TARGET, m) for m in SELF_INFLUENCE_METHODS}


def row_norms(store: LanceStore, fingerprint: Fingerprint) -> pd.Series:
    """sample_id -> the stored gradient row's norm, sqrt of the sum of its blocks' squared norms (floored at the
    smallest positive one, so a zero gradient scores 0 rather than NaN)."""
    rows = store.open("gradients").to_table(columns=["sample_id", "sq_norms"],
                                            filter=f"fingerprint = {sql_literal(fingerprint.digest())}")
    blocks = rows["sq_norms"].combine_chunks()
    sq = np.asarray(blocks.values, dtype=np.float64).reshape(len(rows), -1).sum(1)
    norms = np.sqrt(np.maximum(sq, sq[sq > 0].min() if (sq > 0).any() else 1.0))
    return pd.Series(norms, index=rows["sample_id"].to_pylist())


def _cover_groups(store: LanceStore, settings: GradientSettings, spec: ModelSpec, fingerprint: Fingerprint,
                  targets: Sequence[str], cover: Sequence[EstimatorOptions]) -> list[QueryGroup]:
    """One QueryGroup per (target set, cover method): its target examples' queries, reduced by cover_scores over
    the rows' norms."""
    from hyperinf_ops.stages.queries import cover_queries

    if not cover:
        return []
    norms = row_norms(store, fingerprint)

    def reduce(sample_ids: pa.Array, influence: np.ndarray) -> np.ndarray:
        return cover_scores(influence, norms.reindex(sample_ids.to_pylist()).to_numpy())

    whitening = current_whitening(store, settings)
    prepared = [load_preconditioner(store, fingerprint, o) for o in cover]
    return [QueryGroup(t, f"{o.method}_cover", vectors, reduce)
            for t in targets
            for o, vectors in zip(cover, cover_queries(store, t, spec, settings, fingerprint, prepared, whitening),
                                  strict=True)]


def score(store: LanceStore, settings: GradientSettings, pairs: Sequence[tuple[str, str]], *, task: str,
          shown: tuple[str, str], self_influence: Sequence[EstimatorOptions] = (), device: str | None = None,
          cover: Sequence[EstimatorOptions] = (), spec: ModelSpec | None = None,
          rankings: Callable[[Fingerprint, int, str], Any] | None = None, log: Log = print) -> ScoreStepSummary:
    """Score every gradient row against the stored query of every (target set, method) in `pairs`, its
    self-influence under the stored preconditioner of every options in `self_influence` (target set "self")
    and, for every options in `cover` (hyperinf, tracin; `spec` then needed), the cover ranking
    `<method>_cover` of every target set in `pairs` (signals/cover.py), all in one scan; `shown` is the pair
    whose most helpful / harmful examples the summary lists. `rankings(fingerprint, gradients version, run id)`
    then writes the rankings beside influence (stages/rankings.py; its pairs are part of the summary)."""
    start = time.perf_counter()
    fp = checked_fingerprint(store, settings)
    wanted = set(pairs)
    queries = [q for q in store.read_queries(fp) if (q.target_set, q.method) in wanted]
    missing = sorted(wanted - {(q.target_set, q.method) for q in queries})
    if missing:
        raise DataError(f"no stored queries for {missing}: materialize target_queries first")
    if cover and spec is None:
        raise DataError("cover rankings need the model spec (their target examples' gradients)")
    prepared = [load_preconditioner(store, fp, o) for o in self_influence]
    groups = _cover_groups(store, settings, spec, fp, sorted({t for t, _ in pairs}), cover) if cover else []
    result = score_store(store, queries, self_influence=prepared, groups=groups,
                         whitening=current_whitening(store, settings), device=device, progress=lambda e: log(str(e)))
    written = wanted | {(SELF_TARGET, p.method) for p in prepared} | {(g.target_set, g.method) for g in groups}
    drop_stale(store, "scores", ["target_set", "method"], written, among=lambda key: key[1] not in SIGNALS)
    ranked = rankings(fp, result.gradients_version, result.run_id) if rankings is not None else None
    written |= {tuple(pair.split("/", 1)) for pair in (ranked.pairs if ranked is not None else [])}
    n_examples = store.open("examples").count_rows()
    if result.rows < n_examples:
        log(f"warning: {n_examples - result.rows} pool examples have no gradient row (non-finite gradients)")
    stats, digest = {}, hashlib.sha256()
    for target, method in sorted(written):
        scored = read_scores(store, target, method).sort_values("sample_id")
        digest.update(f"{target}|{method}|{'|'.join(scored['sample_id'])}|".encode() + scored["score"].to_numpy().tobytes())
        s = scored["score"].to_numpy()
        stats[f"{target}/{method}"] = {"min": float(s.min()), "p10": float(np.quantile(s, 0.1)),
                                      "median": float(np.median(s)), "p90": float(np.quantile(s, 0.9)),
                                      "max": float(s.max()), "negative_share": float((s < 0).mean())}
    summary = ScoreStepSummary(
        rows=result.rows, examples=n_examples, pairs=[f"{t}/{m}" for t, m in sorted(written)],
        digest=digest.hexdigest()[:32], scores_version=store.open("scores").version, gradients_version=result.gradients_version,
        run_id=result.run_id, device=result.device, seconds=time.perf_counter() - start,
        rows_per_second=result.rows_per_second, score_stats=stats,
        most_helpful=extremes(store, task, *shown, helpful=True),
        most_harmful=extremes(store, task, *shown, helpful=False))
    log(f"scored {result.rows} rows x {len(queries)} queries"
        + (f" + {len(groups)} cover rankings ({sum(len(g.vectors) for g in groups)} target-example queries)"
           if groups else "")
        + (f" + self-influence ({', '.join(p.method for p in prepared)})" if prepared else "")
        + f" in {result.seconds:.1f}s on {result.device}, scores v{summary.scores_version}")
    return summary
