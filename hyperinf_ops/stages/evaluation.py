"""Stage: does curation help, and which curation? Fresh adapters fit on curated subsets, random and full pools,
scored on a held-out validation half (to choose) and a test half (to report) of the labelled test file.

For every training seed s in (train.seed, train.seed + 1, ...), one fit per candidate curation
(stages/evaluation_plan.py: the candidates, the plan, the split and the choice), plus

    full     the whole pool (once per seed; "no curation" is a candidate too)
    oracle   the pool without its planted flips (pools with a boolean `flipped` column; a reference, never chosen)
    random   per distinct subset size n < N, n pool rows drawn with seed s: what a selection has to beat

each a fresh LoRA adapter trained with the warm-up recipe (`TrainSettings` with seed s; the full pool's first-seed
fit is the warm-up adapter itself when its records' digest matches: the same training, tested rather than repeated),
evaluated on both halves of the test file (split by a seeded permutation of its sorted sample ids: `validation`
of it to choose on, the rest to report). `choose` picks the candidate (or the full pool) with the best mean
validation accuracy over seeds (tasks without classes: the lowest mean validation loss); the reported test half
never enters the choice. One row per fit goes to the `evaluation` table as soon as it is done, keyed by a digest
of what determines it (subset ids and labels, recipe, seed, test content), so a rerun or a crashed run reuses
every finished fit and only the rows of the current plan are kept.
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

import pyarrow as pa

from hyperinf_ops.adapters import AdapterManifest, AdapterStore
from hyperinf_ops.data.noise import true_labels
from hyperinf_ops.data.prepare import prepare_test, record_columns, records_digest
from hyperinf_ops.evaluation import evaluate_model
from hyperinf_ops.location import Location
from hyperinf_ops.memory import release_memory
from hyperinf_ops.models import load_lora_model, model_hash, resolve_model
from hyperinf_ops.progress import ProgressMeter
from hyperinf_ops.query import refresh_duckdb
from hyperinf_ops.settings import LoraSettings, ModelSpec, TrainSettings
from hyperinf_ops.stages.adapter import adapter_recipe, pool_labels
from hyperinf_ops.stages.common import Log, Summary, drop_stale, require_table
from hyperinf_ops.stages.evaluation_plan import EvaluationPlan, Fit, choose, plan_fits, split_test
from hyperinf_ops.store import LanceStore
from hyperinf_ops.tasks import get_task
from hyperinf_ops.training import warmup_train

__all__ = ["EVALUATION_TABLE", "EvaluationSummary", "evaluation_halves", "evaluation_schema", "fit_records",
           "pool_records", "run_evaluation"]

EVALUATION_TABLE = "evaluation"


@dataclass
class EvaluationSummary(Summary):
    fits: int
    reused: int  # fits whose rows were already stored
    validation_examples: int
    test_examples: int
    rows: list[dict[str, Any]]  # mean / std per option (summarize)
    chosen: str  # the winner's name (Choice.name)
    table_version: int
    seconds: float


def evaluation_schema() -> pa.Schema:
    """One fitted adapter: what it was trained on and how it scored on the validation and test halves."""
    return pa.schema([
        pa.field("fit_key", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),  # 'full' | 'oracle' | 'curated' | 'random'
        pa.field("candidate", pa.string()),  # Candidate.name of a curated subset; null otherwise
        pa.field("query", pa.string()),
        pa.field("method", pa.string()),  # the ranking a curated subset came from; null otherwise
        pa.field("target_set", pa.string()),  # the ranking's target set; null otherwise
        pa.field("balance", pa.bool_(), nullable=False),
        pa.field("fraction", pa.float64(), nullable=False),  # the query's $fraction (else: the size share)
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("n_examples", pa.int64(), nullable=False),
        pa.field("n_relabelled", pa.int64(), nullable=False),
        pa.field("n_flipped", pa.int64()),  # planted flips still wrong in the subset (pools with `flipped`)
        pa.field("label_counts", pa.string(), nullable=False),  # JSON {label: examples}
        pa.field("validation_examples", pa.int64(), nullable=False),
        pa.field("validation_accuracy", pa.float64()),  # causal LM: exact match (signals/outputs.exact_matches)
        pa.field("validation_loss", pa.float64(), nullable=False),
        pa.field("test_examples", pa.int64(), nullable=False),
        pa.field("test_accuracy", pa.float64()),
        pa.field("test_loss", pa.float64(), nullable=False),
        pa.field("train_loss", pa.float64(), nullable=False),  # last epoch
        pa.field("seconds", pa.float64(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ])


def run_evaluation(store: LanceStore, spec: ModelSpec, lora: LoraSettings, train: TrainSettings, data: Any,
                   plan: EvaluationPlan, *, log: Log = print) -> EvaluationSummary:
    """Fit and test every adapter of `plan` not already stored, and choose (see the module docstring)."""
    start = time.perf_counter()
    require_table(store, "scores", "materialize influence_scores first")
    _replace_old_layout(store, log)
    labels = pool_labels(store, spec.task)
    pool = pool_records(store, spec.task)
    validation, test = evaluation_halves(plan, data, spec.task, labels)
    fits = plan_fits(store, plan, pool)
    recipe = _recipe_digest(spec, lora, train, validation, test)
    by_id = {r["sample_id"]: r for r in pool}
    stored = _stored_keys(store)
    keys = [_fit_key(fit, recipe, plan.epochs(fit)) for fit in fits]
    reused = len(set(keys) & stored)
    warmup = _warmup_adapter(store, spec, lora, train, labels)
    meter = ProgressMeter("evaluation", len(keys) - reused, lambda e: log(str(e)), unit="fits", every=1)
    for i, (fit, key) in enumerate(zip(fits, keys, strict=True), 1):
        if key in stored:
            continue
        epochs = plan.epochs(fit)
        log(f"evaluation fit {i}/{len(fits)}: {fit.label} seed {fit.seed}, {len(fit.ids)} examples"
            + (f", {len(fit.relabel)} relabelled" if fit.relabel else "") + (f", {epochs} epochs" if epochs else ""))
        records = fit_records(fit, by_id)
        same = (warmup is not None and fit.subset == "full" and fit.seed == 0
                and warmup.train.get("records_digest") == records_digest(records, spec.task))
        if same:
            log("  the warm-up adapter is this fit (same records, recipe and seed): tested, not trained again")
        row = _fit_and_test(spec, lora, train, labels, records, validation, test, fit, log,
                            adapter=(AdapterStore(store.root), warmup) if same else None, epochs=epochs)
        row["fit_key"] = key
        store.replace_where(EVALUATION_TABLE, {"fit_key": key}, pa.Table.from_pylist([row], evaluation_schema()),
                            schema=evaluation_schema(), unique=None)
        log(f"  validation accuracy {row['validation_accuracy']}, test accuracy {row['test_accuracy']}, test loss "
            f"{row['test_loss']:.4f} ({row['seconds']:.0f} s)")
        release_memory()
        meter.update(1)  # the whole evaluation's ETA, at the mean time of a fit so far
    dropped = drop_stale(store, EVALUATION_TABLE, ["fit_key"], {(k,) for k in keys})
    if dropped:
        log(f"removed {len(dropped)} stored fits the current evaluation plan no longer asks for")
    if reused < len(keys) or dropped:
        refresh_duckdb(store, log)  # the synced file stays current (query.open_snapshot): `hyperinf sql` reads it
    table = store.open(EVALUATION_TABLE)
    choice = choose(table.to_table().to_pylist(), plan, has_classes=get_task(spec.task).has_classes)
    log(f"evaluation: {choice.name} has the best {choice.metric.replace('_', ' ')} over {plan.seeds} seed(s)")
    return EvaluationSummary(fits=len(fits), reused=reused, validation_examples=len(validation),
                             test_examples=len(test), rows=choice.table, chosen=choice.name,
                             table_version=table.version, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ helpers

def evaluation_halves(plan: EvaluationPlan, data: Any, task: str, labels: Sequence[str]
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The plan's test file as records (`record_columns`), split into the validation half (chooses) and the
    reported half."""
    table = prepare_test(plan.test_path, data, task, labels).select(record_columns(task))
    return split_test(table.to_pylist(), plan.validation)


def fit_records(fit: Fit, by_id: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The records `fit` trains on, from the pool's records by sample id: its relabelled examples carry the new
    label, every record its given one as `original_label`."""
    relabel = dict(fit.relabel)
    return [{**by_id[j], "original_label": by_id[j]["label"], "label": relabel.get(j, by_id[j]["label"])}
            for j in fit.ids]


def _replace_old_layout(store: LanceStore, log: Log) -> None:
    """An `evaluation` table of an earlier layout (before candidates and the validation half) holds fits this
    plan cannot reuse: it is removed, and its fits are made again."""
    if store.exists(EVALUATION_TABLE) and "validation_loss" not in store.open(EVALUATION_TABLE).schema.names:
        log("the evaluation table has an earlier layout (no validation half): removed, its fits are made again")
        Location(store.uri(EVALUATION_TABLE)).remove_tree()


def pool_records(store: LanceStore, task: str) -> list[dict[str, Any]]:
    """The pool's records (sample_id, text columns, label, and `flipped` / `true_label` when it has them), sorted
    by sample id."""
    examples = require_table(store, "examples", "ingest the pool first")
    columns = record_columns(task)
    columns += [c for c in ("flipped", "true_label") if c in examples.schema.names]
    return sorted(examples.to_table(columns=columns).to_pylist(), key=lambda r: r["sample_id"])


def _warmup_adapter(store: LanceStore, spec: ModelSpec, lora: LoraSettings, train: TrainSettings,
                    labels: Sequence[str]) -> AdapterManifest | None:
    """The current adapter when the warm-up trained it with exactly this recipe (its `full`, seed-0 fit is then
    the same training when the records' digest matches too), else None."""
    current = AdapterStore(store.root).current()
    if (current is None or current.source != "trained" or not current.train
            or current.recipe_key != adapter_recipe(list(labels), spec, lora, train, None)):
        return None
    return current


def _fit_and_test(spec: ModelSpec, lora: LoraSettings, train: TrainSettings, labels: Sequence[str],
                  records: list[dict[str, Any]], validation: list[dict[str, Any]], test: list[dict[str, Any]],
                  fit: Fit, log: Log, *, adapter: tuple[AdapterStore, AdapterManifest] | None = None,
                  epochs: int | None = None) -> dict[str, Any]:
    """Train a fresh adapter on `records` with the warm-up recipe (seed + fit.seed; `epochs` of them when given)
    and test it on both halves; `adapter`: an adapter already trained so (the warm-up's), tested as it is."""
    start = time.perf_counter()
    if adapter is not None:
        adapters, manifest = adapter
        loaded = load_lora_model(spec, labels, adapter_dir=adapters.path(manifest))
        train_loss = manifest.train["loss_per_epoch"][-1]
    else:
        recipe = train.model_copy(update={"seed": train.seed + fit.seed, **({"epochs": epochs} if epochs else {})})
        loaded = load_lora_model(spec, labels, lora=lora, seed=recipe.seed)
        stats = warmup_train(loaded, records, recipe, max_length=spec.max_length, progress=lambda e: log(f"  {e}"))
        train_loss = stats.loss_per_epoch[-1]
    held = evaluate_model(loaded, validation, max_length=spec.max_length)
    result = evaluate_model(loaded, test, max_length=spec.max_length)
    c = fit.candidate
    return {"subset": fit.subset, "candidate": c.name if c else None, "query": c.query if c else None,
            "method": c.method if c else None, "target_set": c.target_set if c else None,
            "balance": bool(c and c.balance), "fraction": fit.fraction, "seed": fit.seed,
            "n_examples": len(records), "n_relabelled": len(fit.relabel),
            "n_flipped": _still_wrong(records, labels),
            "label_counts": json.dumps(dict(sorted(Counter(str(r.get("label")) for r in records).items()))),
            "validation_examples": held.examples, "validation_accuracy": held.accuracy,
            "validation_loss": held.loss, "test_examples": result.examples, "test_accuracy": result.accuracy,
            "test_loss": result.loss, "train_loss": train_loss,
            "seconds": time.perf_counter() - start, "created_at": datetime.now(UTC)}


def _still_wrong(records: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> int | None:
    """Labels of the fit's records that are not the truth (noise.true_labels of the original labels), None when
    the pool has no planted flips or the truth cannot be known."""
    if not records or records[0].get("flipped") is None:
        return None
    truth = true_labels([r["original_label"] for r in records], [r["flipped"] for r in records],
                        [r["true_label"] for r in records] if "true_label" in records[0] else None, classes)
    if truth is None:  # several classes without `true_label`: the planted flips still in the subset
        return sum(bool(r["flipped"]) for r in records)
    return sum(str(r["label"]) != t for r, t in zip(records, truth, strict=True))


def _recipe_digest(spec: ModelSpec, lora: LoraSettings, train: TrainSettings, validation: Sequence[Mapping],
                   test: Sequence[Mapping]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model_hash": model_hash(resolve_model(spec.name)), "spec": spec.model_dump(),
                         "lora": lora.model_dump(exclude={"gradient_modules"}),
                         "train": train.model_dump(exclude={"log_every"})}, sort_keys=True).encode())
    for part in (validation, test):
        h.update(b"|part|")
        for r in part:
            h.update(json.dumps(r, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _fit_key(fit: Fit, recipe: str, epochs: int | None) -> str:
    c = fit.candidate
    h = hashlib.sha256(f"{recipe}|{fit.subset}|{c.name if c else ''}|{fit.fraction!r}|{fit.seed}".encode())
    if epochs is not None:  # the recipe's own epochs otherwise: keys of fits made before the setting still hold
        h.update(f"|epochs={epochs}".encode())
    for i in fit.ids:
        h.update(i.encode() + b"\0")
    for i, label in fit.relabel:
        h.update(f"{i}={label}".encode() + b"\0")
    return h.hexdigest()


def _stored_keys(store: LanceStore) -> set[str]:
    if not store.exists(EVALUATION_TABLE):
        return set()
    return set(store.open(EVALUATION_TABLE).to_table(columns=["fit_key"])["fit_key"].to_pylist())
