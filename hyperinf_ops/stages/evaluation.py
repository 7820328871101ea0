"""Stage: does curation help? Fresh adapters fit on curated, random and full subsets, scored on a test file.

For every training seed s in (train.seed, train.seed + 1, ...) and fraction f, with N pool examples and
n = ceil(f N) (or, class-balanced, the sum over labels c of ceil(f N_c)):

    curated  the rows `sql/top_fraction.sql` selects from one method's ranking of the evaluation target set,
             once per `balance` variant (false: the top n; true: the top ceil(f N_c) of every label c)
    random   n pool rows drawn with seed s (one subset per seed: the spread a selection has to beat; n is the
             size of the unbalanced curated subset when both variants are asked for)
    full     the whole pool (once per seed)

each fit is a fresh LoRA adapter trained with the warm-up recipe (`TrainSettings` with seed s) and evaluated on
the test records (evaluation.py: mean loss, accuracy). One row per fit goes to the `evaluation` table as soon as
it is done, keyed by a digest of what determines it (subset ids, recipe, seed, test content), so a rerun or a
crashed run reuses every finished fit and only the rows of the current plan are kept. `n_flipped` counts the
subset's planted label flips when the pool has a boolean `flipped` column.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from hyperinf_ops.data.prepare import prepare_test, record_columns
from hyperinf_ops.errors import DataError
from hyperinf_ops.evaluation import evaluate_model
from hyperinf_ops.memory import release_memory
from hyperinf_ops.models import load_lora_model, model_hash, resolve_model
from hyperinf_ops.progress import ProgressMeter
from hyperinf_ops.query import connect, refresh_duckdb, run_query
from hyperinf_ops.settings import LoraSettings, ModelSpec, TrainSettings
from hyperinf_ops.stages.adapter import pool_labels
from hyperinf_ops.stages.common import Log, Summary, drop_stale, require_table
from hyperinf_ops.store import LanceStore
from hyperinf_ops.training import warmup_train

__all__ = ["EVALUATION_TABLE", "EvaluationPlan", "EvaluationSummary", "evaluation_schema", "run_evaluation",
           "subset_label", "summarize"]

EVALUATION_TABLE = "evaluation"
SUBSETS = ("curated", "random", "full")


def evaluation_schema() -> pa.Schema:
    """One fitted adapter: what it was trained on and how it scored on the test file."""
    return pa.schema([
        pa.field("fit_key", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),  # 'curated' | 'random' | 'full'
        pa.field("method", pa.string()),  # the ranking a curated subset came from; null otherwise
        pa.field("target_set", pa.string()),  # the ranking's target set; null otherwise
        pa.field("balance", pa.bool_(), nullable=False),
        pa.field("fraction", pa.float64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("n_examples", pa.int64(), nullable=False),
        pa.field("n_flipped", pa.int64()),  # planted flips in the subset (pools with a `flipped` column)
        pa.field("label_counts", pa.string(), nullable=False),  # JSON {label: examples}
        pa.field("test_examples", pa.int64(), nullable=False),
        pa.field("test_accuracy", pa.float64()),  # null for tasks without classes
        pa.field("test_loss", pa.float64(), nullable=False),
        pa.field("train_loss", pa.float64(), nullable=False),  # last epoch
        pa.field("seconds", pa.float64(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ])


@dataclass(frozen=True)
class EvaluationPlan:
    """What to fit (the config's `evaluation:` block, resolved)."""

    test_path: str
    target_set: str
    methods: tuple[str, ...]
    fractions: tuple[float, ...]
    seeds: int = 2
    balance: tuple[bool, ...] = (True,)  # the curated variants: class-balanced and / or the plain top fraction
    full: bool = True


@dataclass(frozen=True)
class _Fit:
    subset: str
    method: str | None
    fraction: float
    seed: int
    ids: tuple[str, ...]
    balance: bool = False  # curated subsets only


@dataclass
class EvaluationSummary(Summary):
    fits: int
    reused: int  # fits whose rows were already stored
    test_examples: int
    rows: list[dict[str, Any]]  # mean / std of test accuracy and loss per (subset, method, fraction)
    table_version: int
    seconds: float


def run_evaluation(store: LanceStore, spec: ModelSpec, lora: LoraSettings, train: TrainSettings, data: Any,
                   plan: EvaluationPlan, *, log: Log = print) -> EvaluationSummary:
    """Fit and test every adapter of `plan` not already stored (see the module docstring)."""
    start = time.perf_counter()
    require_table(store, "scores", "materialize influence_scores first")
    labels = pool_labels(store, spec.task)
    pool = _pool_records(store, spec.task)
    test = prepare_test(plan.test_path, data, spec.task, labels).select(record_columns(spec.task)).to_pylist()
    fits = _plan_fits(store, plan, [r["sample_id"] for r in pool])
    recipe = _recipe_digest(spec, lora, train, test)
    by_id = {r["sample_id"]: r for r in pool}
    stored = _stored_keys(store)
    keys = [_fit_key(fit, recipe) for fit in fits]
    reused = len(set(keys) & stored)
    meter = ProgressMeter("evaluation", len(keys) - reused, lambda e: log(str(e)), unit="fits", every=1)
    for i, (fit, key) in enumerate(zip(fits, keys, strict=True), 1):
        if key in stored:
            continue
        what = (f"{fit.subset}{'/' + fit.method if fit.method else ''}{' balanced' if fit.balance else ''} "
                f"fraction {fit.fraction:g} seed {fit.seed}")
        log(f"evaluation fit {i}/{len(fits)}: {what}, {len(fit.ids)} examples")
        row = _fit_and_test(spec, lora, train, labels, [by_id[j] for j in fit.ids], test, fit, log)
        row.update(fit_key=key, target_set=plan.target_set if fit.method else None, balance=fit.balance)
        store.replace_where(EVALUATION_TABLE, {"fit_key": key}, pa.Table.from_pylist([row], evaluation_schema()),
                            schema=evaluation_schema(), unique=None)
        log(f"  test accuracy {row['test_accuracy']}, test loss {row['test_loss']:.4f} ({row['seconds']:.0f} s)")
        release_memory()
        meter.update(1)  # the whole evaluation's ETA, at the mean time of a fit so far
    dropped = drop_stale(store, EVALUATION_TABLE, ["fit_key"], {(k,) for k in keys})
    if dropped:
        log(f"removed {len(dropped)} stored fits the current evaluation plan no longer asks for")
    if reused < len(keys) or dropped:
        refresh_duckdb(store, log)  # the synced file stays current (query.open_snapshot): `hyperinf sql` reads it
    table = store.open(EVALUATION_TABLE)
    return EvaluationSummary(fits=len(fits), reused=reused, test_examples=len(test),
                             rows=summarize(table.to_table().to_pylist()), table_version=table.version,
                             seconds=time.perf_counter() - start)


def subset_label(row: Mapping[str, Any]) -> str:
    """How a fit's subset is shown: `full`, `random`, `curated (hyperinf)`, `curated (hyperinf, balanced)`."""
    if not row["method"]:
        return row["subset"]
    return f"{row['subset']} ({row['method']}{', balanced' if row['balance'] else ''})"


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of test accuracy and loss, and the mean flips kept, per (subset, method,
    balance, fraction); ordered full, then by fraction, curated before random."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["subset"], row["method"], row["balance"], row["fraction"]), []).append(row)
    out = []
    for (subset, method, balance, fraction), members in groups.items():
        acc = [m["test_accuracy"] for m in members if m["test_accuracy"] is not None]
        flipped = [m["n_flipped"] for m in members if m["n_flipped"] is not None]
        out.append({"subset": subset, "method": method, "balance": balance, "fraction": fraction,
                    "fits": len(members),
                    "n_examples": members[0]["n_examples"],
                    "n_flipped": float(np.mean(flipped)) if flipped else None,
                    "test_accuracy": float(np.mean(acc)) if acc else None,
                    "test_accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
                    "test_loss": float(np.mean([m["test_loss"] for m in members])),
                    "test_loss_std": float(np.std([m["test_loss"] for m in members], ddof=1))
                    if len(members) > 1 else None})
    order = {s: i for i, s in enumerate(SUBSETS)}
    return sorted(out, key=lambda r: (r["subset"] != "full", r["fraction"], order[r["subset"]], r["balance"],
                                      r["method"] or ""))


# ------------------------------------------------------------------------------------------------ helpers

def _pool_records(store: LanceStore, task: str) -> list[dict[str, Any]]:
    examples = require_table(store, "examples", "ingest the pool first")
    columns = record_columns(task)
    if "flipped" in examples.schema.names:
        columns.append("flipped")
    return sorted(examples.to_table(columns=columns).to_pylist(), key=lambda r: r["sample_id"])


def _plan_fits(store: LanceStore, plan: EvaluationPlan, pool_ids: Sequence[str]) -> list[_Fit]:
    """Every fit of the plan, in the order they run: per seed, the full pool, then per fraction the curated
    subsets and the random one (so early rows already compare)."""
    con = connect(store)
    try:
        curated = {(m, f, b): tuple(sorted(run_query(con, "top_fraction", {
            "target_set": plan.target_set, "method": m, "fraction": f, "balance": b,
        })["sample_id"].to_pylist())) for m in plan.methods for f in plan.fractions for b in plan.balance}
    finally:
        con.close()
    for (method, fraction, _), ids in curated.items():
        if not ids:
            raise DataError(f"no scores of target set {plan.target_set!r} and method {method!r} to curate "
                            f"{fraction:g} of the pool from: materialize influence_scores first")
    fits = []
    for s in range(plan.seeds):
        if plan.full:
            fits.append(_Fit("full", None, 1.0, s, tuple(pool_ids)))
        for f in plan.fractions:
            fits += [_Fit("curated", m, f, s, curated[m, f, b], b) for b in plan.balance for m in plan.methods]
            # the curated size (class-balanced alone: the sum of the per-label ceils)
            n = len(curated[plan.methods[0], f, plan.balance[0]])
            chosen = np.random.default_rng(s).choice(len(pool_ids), size=n, replace=False)
            fits.append(_Fit("random", None, f, s, tuple(sorted(pool_ids[i] for i in chosen))))
    return fits


def _fit_and_test(spec: ModelSpec, lora: LoraSettings, train: TrainSettings, labels: Sequence[str],
                  records: list[dict[str, Any]], test: list[dict[str, Any]], fit: _Fit, log: Log) -> dict[str, Any]:
    start = time.perf_counter()
    recipe = train.model_copy(update={"seed": train.seed + fit.seed})
    loaded = load_lora_model(spec, labels, lora=lora, seed=recipe.seed)
    stats = warmup_train(loaded, records, recipe, max_length=spec.max_length, progress=lambda e: log(f"  {e}"))
    result = evaluate_model(loaded, test, max_length=spec.max_length)
    flips = [r["flipped"] for r in records if r.get("flipped") is not None]
    counts = Counter(str(r.get("label")) for r in records)
    return {"subset": fit.subset, "method": fit.method, "fraction": fit.fraction, "seed": fit.seed,
            "n_examples": len(records), "n_flipped": int(sum(flips)) if flips else None,
            "label_counts": json.dumps(dict(sorted(counts.items()))), "test_examples": result.examples,
            "test_accuracy": result.accuracy, "test_loss": result.loss, "train_loss": stats.loss_per_epoch[-1],
            "seconds": time.perf_counter() - start, "created_at": datetime.now(UTC)}


def _recipe_digest(spec: ModelSpec, lora: LoraSettings, train: TrainSettings, test: Sequence[Mapping]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model_hash": model_hash(resolve_model(spec.name)), "spec": spec.model_dump(),
                         "lora": lora.model_dump(exclude={"gradient_modules"}),
                         "train": train.model_dump(exclude={"log_every"})}, sort_keys=True).encode())
    for r in test:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _fit_key(fit: _Fit, recipe: str) -> str:
    h = hashlib.sha256(f"{recipe}|{fit.subset}|{fit.method}|{fit.fraction!r}|{fit.seed}|{fit.balance}".encode())
    for i in fit.ids:
        h.update(i.encode() + b"\0")
    return h.hexdigest()


def _stored_keys(store: LanceStore) -> set[str]:
    if not store.exists(EVALUATION_TABLE):
        return set()
    return set(store.open(EVALUATION_TABLE).to_table(columns=["fit_key"])["fit_key"].to_pylist())
