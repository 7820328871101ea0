"""What an evaluation fits and how it chooses: the candidate curations, the fits of a plan (curated, random, full,
oracle; stages/evaluation.py trains and tests them), the test file's validation / test split, and the choice of
the winner from the stored rows.

A candidate curation is a `sql/` query over one ranking with one `$fraction` (`Candidate`):

    drop_harmful  every example but the ceil(f N) most harmful
    drop_issues   every example but the k most harmful, k = the number of label issues cleanlab finds, at most
                  ceil(max_fraction N) (no f; DROP_ISSUES_MAX_FRACTION unless the curation sets its own)
    relabel       every example; among the ceil(f N) most harmful, those with another suggested label get it
    top_fraction  the ceil(f N) most helpful (class-balanced: the ceil(f N_c) most helpful of every label c)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hyperinf_ops.config.sections import DROP_ISSUES_MAX_FRACTION
from hyperinf_ops.errors import DataError
from hyperinf_ops.export import RELABEL_COLUMN
from hyperinf_ops.query import connect, run_query
from hyperinf_ops.store import LanceStore

__all__ = ["CANDIDATE_QUERIES", "SUBSETS", "WITHOUT_FRACTION", "Candidate", "Choice", "EvaluationPlan", "Fit",
           "choose", "plan_fits", "split_test", "subset_label", "summarize"]

SUBSETS = ("full", "oracle", "curated", "random")
# The curation queries a candidate may use (each takes $target_set, $method, $fraction).
CANDIDATE_QUERIES = ("drop_harmful", "drop_issues", "relabel", "top_fraction")
# The queries whose candidates take no $fraction.
WITHOUT_FRACTION = ("drop_issues",)


@dataclass(frozen=True)
class Candidate:
    """One curation: `sql/<query>.sql` over the ranking (target_set, method) with `$fraction` (None for
    drop_issues, which takes none) and `$balance` for top_fraction."""

    query: str
    method: str
    target_set: str
    fraction: float | None
    balance: bool = False
    max_fraction: float = DROP_ISSUES_MAX_FRACTION  # drop_issues' cap (the curation's own when it sets one)

    @property
    def params(self) -> dict[str, Any]:
        """The query's DuckDB parameters."""
        out: dict[str, Any] = {"target_set": self.target_set, "method": self.method}
        if self.fraction is not None:
            out["fraction"] = self.fraction
        if self.query == "top_fraction":
            out["balance"] = self.balance
        if self.query == "drop_issues":
            out["max_fraction"] = self.max_fraction
        return out

    @property
    def name(self) -> str:
        """How a person reads it: `relabel(fused, 0.2)`, `drop_issues(fused)`, `top_fraction(hyperinf, 0.8,
        balanced)`."""
        args = [self.method, *([f"{self.fraction:g}"] if self.fraction is not None else []),
                *(["balanced"] if self.balance else []),
                *([f"max {self.max_fraction:g}"] if self.query == "drop_issues" and
                  self.max_fraction != DROP_ISSUES_MAX_FRACTION else [])]
        return f"{self.query}({', '.join(args)})"


@dataclass(frozen=True)
class EvaluationPlan:
    """What to fit (the config's `evaluation:` block, resolved)."""

    test_path: str
    candidates: tuple[Candidate, ...]
    seeds: int = 2
    full: bool = True  # the full pool (and the oracle, when the pool has planted flips)
    validation: float = 0.5  # share of the test file held out to choose on
    subset_epochs: int | None = None  # curated and random fits' epochs (None: the warm-up recipe's)

    def epochs(self, fit: Fit) -> int | None:
        """The epochs `fit` trains for when they are not the warm-up recipe's: `subset_epochs` for a curated or
        random subset, None for the full pool and the oracle."""
        return self.subset_epochs if fit.subset in ("curated", "random") else None


@dataclass(frozen=True)
class Choice:
    """The winner of an evaluation: a candidate, or the full pool (`candidate` None), and every option's mean
    validation and test numbers (rows of `summarize`)."""

    candidate: Candidate | None
    metric: str  # "validation_accuracy" or "validation_loss"
    table: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.candidate.name if self.candidate is not None else "full pool"

    def export(self, plan: EvaluationPlan) -> tuple[str, dict[str, Any]]:
        """The sql/ query and parameters that export the winner: its own, or for the full pool drop_harmful with
        fraction 0 (every scored example, in the first candidate's ranking order)."""
        if self.candidate is not None:
            return self.candidate.query, self.candidate.params
        first = plan.candidates[0]
        return "drop_harmful", {"target_set": first.target_set, "method": first.method, "fraction": 0.0}


@dataclass(frozen=True)
class Fit:
    """One planned fit: which subset (full, oracle, curated, random), from which candidate, the training seed
    offset, the sample ids trained on and the labels replaced."""

    subset: str
    candidate: Candidate | None
    fraction: float
    seed: int
    ids: tuple[str, ...]
    relabel: tuple[tuple[str, str], ...] = ()  # (sample_id, new label)

    @property
    def label(self) -> str:
        """How its subset is shown (subset_label)."""
        return self.candidate.name if self.candidate is not None else self.subset


def split_test(records: Sequence[Mapping[str, Any]], validation: float) -> tuple[list, list]:
    """(validation, test) records: a seeded permutation of the sorted sample ids, the first
    round(validation * n) held out to choose on, the rest reported. Both halves must be non-empty."""
    ordered = sorted(records, key=lambda r: str(r["sample_id"]))
    order = np.random.default_rng(0).permutation(len(ordered))
    n_val = round(validation * len(ordered))
    if not 0 < n_val < len(ordered):
        raise DataError(f"the evaluation test file has {len(ordered)} examples: too few to hold out "
                        f"{validation:g} of them for choosing and keep the rest for the test")
    return [ordered[i] for i in order[:n_val]], [ordered[i] for i in order[n_val:]]


def choose(rows: Sequence[Mapping[str, Any]], plan: EvaluationPlan, *, has_classes: bool) -> Choice:
    """The plan's candidate (or the full pool) with the best mean validation accuracy over seeds (without classes:
    the lowest mean validation loss), from the stored rows; ties go to the full pool, then to the earlier
    candidate. Random subsets and the oracle are references, never chosen."""
    names = {c.name: c for c in plan.candidates}
    _require_whole_plan([r for r in rows if r["subset"] == "full" or r.get("candidate") in names], plan.seeds)
    table = summarize(rows)
    metric = "validation_accuracy" if has_classes else "validation_loss"
    sign = 1.0 if has_classes else -1.0
    options = [r for r in table if r["subset"] == "full" or r.get("candidate") in names]
    if not options:
        raise DataError("no fitted candidate to choose from: run the evaluation first")
    order = {None: -1, **{c.name: i for i, c in enumerate(plan.candidates)}}
    best = max(options, key=lambda r: (sign * r[metric], -order[r.get("candidate")]))
    return Choice(candidate=names.get(best.get("candidate")), metric=metric, table=table)


def _require_whole_plan(rows: Sequence[Mapping[str, Any]], n_seeds: int) -> None:
    """DataError unless every option in `rows` (the fits the choice reads: the full pool's, the plan's candidates')
    has one fit per seed of the plan: a run stopped part-way leaves the new plan's first fits beside the old plan's
    (both seed 0 of one candidate) or fewer seeds than asked, and means over such a mix compare different recipes."""
    seeds: dict[tuple[str, Any], list[int]] = {}
    for row in rows:
        seeds.setdefault((row["subset"], row.get("candidate"), row["fraction"]), []).append(row["seed"])
    odd = sorted(f"{candidate or subset} ({len(got)} fits, seeds {sorted(got)})" for (subset, candidate, _), got
                 in seeds.items() if len(got) != len(set(got)) or len(set(got)) != n_seeds)
    if odd:
        raise DataError(f"the stored evaluation does not hold one fit per seed ({n_seeds}) of every option: "
                        f"{', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}; a run stopped part-way leaves fits of "
                        "two plans: materialize `evaluation` (it reuses every stored fit of the current plan)")


def subset_label(row: Mapping[str, Any]) -> str:
    """How a fit's subset is shown: `full`, `oracle`, `random`, or its candidate's name."""
    return row.get("candidate") or row["subset"]


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of validation and test accuracy and loss, and the mean flips still wrong, per
    option (full, oracle, each candidate, each random size); ordered full, oracle, then by size, curated before
    random."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["subset"], row.get("candidate"), row["fraction"]), []).append(row)
    out = []
    for (subset, candidate, fraction), members in groups.items():
        first = members[0]
        item: dict[str, Any] = {"subset": subset, "candidate": candidate, "query": first.get("query"),
                                "method": first["method"], "balance": first["balance"], "fraction": fraction,
                                "fits": len(members),
                                "n_examples": first["n_examples"], "n_relabelled": first.get("n_relabelled", 0)}
        flipped = [m["n_flipped"] for m in members if m["n_flipped"] is not None]
        item["n_flipped"] = float(np.mean(flipped)) if flipped else None
        for key in ("validation_accuracy", "validation_loss", "test_accuracy", "test_loss"):
            values = [m[key] for m in members if m.get(key) is not None]
            item[key] = float(np.mean(values)) if values else None
            item[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out.append(item)
    order = {s: i for i, s in enumerate(SUBSETS)}
    return sorted(out, key=lambda r: (order[r["subset"]] > 1, -r["n_examples"], order[r["subset"]],
                                      r["candidate"] or ""))


def _candidate_subsets(store: LanceStore, candidates: Sequence[Candidate]
                       ) -> dict[Candidate, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]]:
    """Each candidate's (sorted sample ids, (sample_id, new label) pairs) from its query over the stored scores."""
    con = connect(store)
    out = {}
    try:
        for c in candidates:
            rows = run_query(con, c.query, c.params)
            if rows.num_rows == 0:
                raise DataError(f"candidate {c.name}: its query selects nothing (no scores of "
                                f"{c.target_set}/{c.method}?): materialize influence_scores first")
            ids = tuple(sorted(rows["sample_id"].to_pylist()))
            new = rows[RELABEL_COLUMN].to_pylist() if RELABEL_COLUMN in rows.column_names else [None] * len(ids)
            relabel = tuple(sorted((i, n) for i, n in zip(rows["sample_id"].to_pylist(), new, strict=True)
                                   if n is not None))
            out[c] = (ids, relabel)
    finally:
        con.close()
    return out


def plan_fits(store: LanceStore, plan: EvaluationPlan, pool: Sequence[Mapping[str, Any]]) -> list[Fit]:
    """Every fit of the plan, in the order they run: the smallest training sets first (stable: per seed, the full
    pool and the oracle, the candidates, then one random subset per distinct curated size below the pool's), so
    an evaluation stopped early has compared the most candidates with random subsets of their size, and the
    full-pool fits (the costliest; the first seed's is the warm-up itself) come last."""
    pool_ids = [r["sample_id"] for r in pool]
    subsets = _candidate_subsets(store, plan.candidates)
    clean = tuple(r["sample_id"] for r in pool if r.get("flipped") is False)
    has_flips = any(r.get("flipped") is True for r in pool)
    sizes = sorted({len(ids) for ids, _ in subsets.values() if len(ids) < len(pool_ids)}, reverse=True)
    fits = []
    for s in range(plan.seeds):
        if plan.full:
            fits.append(Fit("full", None, 1.0, s, tuple(pool_ids)))
            if has_flips:
                fits.append(Fit("oracle", None, len(clean) / len(pool_ids), s, clean))
        fits += [Fit("curated", c, c.fraction if c.fraction is not None else round(len(subsets[c][0]) / len(pool_ids), 4),
                     s, *subsets[c]) for c in plan.candidates]
        for n in sizes:
            chosen = np.random.default_rng([s, n]).choice(len(pool_ids), size=n, replace=False)
            fits.append(Fit("random", None, round(n / len(pool_ids), 4), s,
                             tuple(sorted(pool_ids[i] for i in chosen))))
    return sorted(fits, key=lambda fit: len(fit.ids))
