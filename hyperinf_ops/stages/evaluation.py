"""Stage: does curation help, and which curation? Fresh adapters fit on curated subsets, random and full pools,
scored on a held-out validation half (to choose) and a test half (to report) of the labelled test file.

A candidate curation is a `sql/` query over one ranking with one `$fraction` (`Candidate`):

    drop_harmful  every example but the ceil(f N) most harmful
    drop_issues   every example but the k most harmful, k = the number of label issues cleanlab finds (no f)
    relabel       every example; among the ceil(f N) most harmful, those with another suggested label get it
    top_fraction  the ceil(f N) most helpful (class-balanced: the ceil(f N_c) most helpful of every label c)

For every training seed s in (train.seed, train.seed + 1, ...), one fit per candidate, plus

    full     the whole pool (once per seed; "no curation" is a candidate too)
    oracle   the pool without its planted flips (pools with a boolean `flipped` column; a reference, never chosen)
    random   per distinct subset size n < N, n pool rows drawn with seed s: what a selection has to beat

each a fresh LoRA adapter trained with the warm-up recipe (`TrainSettings` with seed s; the full pool's first-seed
fit is the warm-up adapter itself when its records' digest matches: the same training, tested rather than repeated),
evaluated on both halves of
the test file (split by a seeded permutation of its sorted sample ids: `validation` of it to choose on, the rest
to report). `choose` picks the candidate (or the full pool) with the best mean validation accuracy over seeds
(tasks without classes: the lowest mean validation loss); the reported test half never enters the choice. One
row per fit goes to the `evaluation` table as soon as it is done, keyed by a digest of what determines it (subset
ids and labels, recipe, seed, test content), so a rerun or a crashed run reuses every finished fit and only the
rows of the current plan are kept.
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

from hyperinf_ops.adapters import AdapterManifest, AdapterStore
from hyperinf_ops.data.noise import true_labels
from hyperinf_ops.data.prepare import prepare_test, record_columns, records_digest
from hyperinf_ops.errors import DataError
from hyperinf_ops.evaluation import evaluate_model
from hyperinf_ops.export import RELABEL_COLUMN
from hyperinf_ops.location import Location
from hyperinf_ops.memory import release_memory
from hyperinf_ops.models import load_lora_model, model_hash, resolve_model
from hyperinf_ops.progress import ProgressMeter
from hyperinf_ops.query import connect, refresh_duckdb, run_query
from hyperinf_ops.settings import LoraSettings, ModelSpec, TrainSettings
from hyperinf_ops.stages.adapter import adapter_recipe, pool_labels
from hyperinf_ops.stages.common import Log, Summary, drop_stale, require_table
from hyperinf_ops.store import LanceStore
from hyperinf_ops.tasks import get_task
from hyperinf_ops.training import warmup_train

__all__ = ["CANDIDATE_QUERIES", "EVALUATION_TABLE", "WITHOUT_FRACTION", "Candidate", "Choice", "EvaluationPlan", "EvaluationSummary",
           "Fit", "choose", "evaluation_schema", "plan_fits", "pool_records", "run_evaluation", "split_test",
           "subset_label", "summarize"]

EVALUATION_TABLE = "evaluation"
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

    @property
    def params(self) -> dict[str, Any]:
        """The query's DuckDB parameters."""
        out: dict[str, Any] = {"target_set": self.target_set, "method": self.method}
        if self.fraction is not None:
            out["fraction"] = self.fraction
        if self.query == "top_fraction":
            out["balance"] = self.balance
        return out

    @property
    def name(self) -> str:
        """How a person reads it: `relabel(fused, 0.2)`, `drop_issues(fused)`, `top_fraction(hyperinf, 0.8,
        balanced)`."""
        args = [self.method, *([f"{self.fraction:g}"] if self.fraction is not None else []),
                *(["balanced"] if self.balance else [])]
        return f"{self.query}({', '.join(args)})"


@dataclass(frozen=True)
class EvaluationPlan:
    """What to fit (the config's `evaluation:` block, resolved)."""

    test_path: str
    candidates: tuple[Candidate, ...]
    seeds: int = 2
    full: bool = True  # the full pool (and the oracle, when the pool has planted flips)
    validation: float = 0.5  # share of the test file held out to choose on


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
    validation, test = split_test(prepare_test(plan.test_path, data, spec.task, labels)
                                  .select(record_columns(spec.task)).to_pylist(), plan.validation)
    fits = plan_fits(store, plan, pool)
    recipe = _recipe_digest(spec, lora, train, validation, test)
    by_id = {r["sample_id"]: r for r in pool}
    stored = _stored_keys(store)
    keys = [_fit_key(fit, recipe) for fit in fits]
    reused = len(set(keys) & stored)
    warmup = _warmup_adapter(store, spec, lora, train, labels)
    meter = ProgressMeter("evaluation", len(keys) - reused, lambda e: log(str(e)), unit="fits", every=1)
    for i, (fit, key) in enumerate(zip(fits, keys, strict=True), 1):
        if key in stored:
            continue
        log(f"evaluation fit {i}/{len(fits)}: {subset_label(_row_of(fit))} seed {fit.seed}, {len(fit.ids)} examples"
            + (f", {len(fit.relabel)} relabelled" if fit.relabel else ""))
        relabel = dict(fit.relabel)
        records = [{**by_id[j], "original_label": by_id[j]["label"], "label": relabel.get(j, by_id[j]["label"])}
                   for j in fit.ids]
        same = (warmup is not None and fit.subset == "full" and fit.seed == 0
                and warmup.train.get("records_digest") == records_digest(records, spec.task))
        if same:
            log("  the warm-up adapter is this fit (same records, recipe and seed): tested, not trained again")
        row = _fit_and_test(spec, lora, train, labels, records, validation, test, fit, log,
                            adapter=(AdapterStore(store.root), warmup) if same else None)
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
    table = summarize(rows)
    metric = "validation_accuracy" if has_classes else "validation_loss"
    sign = 1.0 if has_classes else -1.0
    names = {c.name: c for c in plan.candidates}
    options = [r for r in table if r["subset"] == "full" or r.get("candidate") in names]
    if not options:
        raise DataError("no fitted candidate to choose from: run the evaluation first")
    order = {None: -1, **{c.name: i for i, c in enumerate(plan.candidates)}}
    best = max(options, key=lambda r: (sign * r[metric], -order[r.get("candidate")]))
    return Choice(candidate=names.get(best.get("candidate")), metric=metric, table=table)


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


# ------------------------------------------------------------------------------------------------ helpers

def _replace_old_layout(store: LanceStore, log: Log) -> None:
    """An `evaluation` table of an earlier layout (before candidates and the validation half) holds fits this
    plan cannot reuse: it is removed, and its fits are made again."""
    if store.exists(EVALUATION_TABLE) and "validation_loss" not in store.open(EVALUATION_TABLE).schema.names:
        log("the evaluation table has an earlier layout (no validation half): removed, its fits are made again")
        Location(store.uri(EVALUATION_TABLE)).remove_tree()


def _row_of(fit: Fit) -> dict[str, Any]:
    return {"subset": fit.subset, "candidate": fit.candidate.name if fit.candidate else None}


def pool_records(store: LanceStore, task: str) -> list[dict[str, Any]]:
    """The pool's records (sample_id, text columns, label, and `flipped` / `true_label` when it has them), sorted
    by sample id."""
    examples = require_table(store, "examples", "ingest the pool first")
    columns = record_columns(task)
    columns += [c for c in ("flipped", "true_label") if c in examples.schema.names]
    return sorted(examples.to_table(columns=columns).to_pylist(), key=lambda r: r["sample_id"])


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
                  fit: Fit, log: Log, *, adapter: tuple[AdapterStore, AdapterManifest] | None = None
                  ) -> dict[str, Any]:
    """Train a fresh adapter on `records` with the warm-up recipe (seed + fit.seed) and test it on both halves;
    `adapter`: an adapter already trained so (the warm-up's), tested as it is."""
    start = time.perf_counter()
    if adapter is not None:
        adapters, manifest = adapter
        loaded = load_lora_model(spec, labels, adapter_dir=adapters.path(manifest))
        train_loss = manifest.train["loss_per_epoch"][-1]
    else:
        recipe = train.model_copy(update={"seed": train.seed + fit.seed})
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


def _fit_key(fit: Fit, recipe: str) -> str:
    c = fit.candidate
    h = hashlib.sha256(f"{recipe}|{fit.subset}|{c.name if c else ''}|{fit.fraction!r}|{fit.seed}".encode())
    for i in fit.ids:
        h.update(i.encode() + b"\0")
    for i, label in fit.relabel:
        h.update(f"{i}={label}".encode() + b"\0")
    return h.hexdigest()


def _stored_keys(store: LanceStore) -> set[str]:
    if not store.exists(EVALUATION_TABLE):
        return set()
    return set(store.open(EVALUATION_TABLE).to_table(columns=["fit_key"])["fit_key"].to_pylist())
