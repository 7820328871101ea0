"""The pipeline as plain functions: each Dagster asset is a thin wrapper around one of these.

    ingest_shard (per shard) -> ingest_targets -> train_or_load_adapter -> compute_gradient_shard (per
    shard) -> merge_curvature -> build_target_queries -> score -> curate, mislabel_report, agreement_check

Every step takes the validated config, a `LanceStore` and a `log` callable (`print`, a logger, Dagster's
`context.log.info`), writes its big results to Lance, and returns a small dataclass of facts a person
wants to see (counts, Lance versions, timings, solver health): never tensors. Each step validates its
input before writing, so bad input never replaces a table, and refuses to combine rows made under
different fingerprints (model, adapter, LoRA matrices, projection). `run_all` runs the whole graph.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from hyperinf_ops.config import BUNDLED_MODELS, HyperinfConfig
from hyperinf_ops.curvature import CurvaturePartial, curvature_partials
from hyperinf_ops.data import discover_shards, prepare_examples, prepare_targets, read_table, text_columns
from hyperinf_ops.errors import DataError, ModelLoadError
from hyperinf_ops.estimators import EstimatorOptions, precondition, score_gradients
from hyperinf_ops.export import export_subset
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.gradients import lora_matrix_shapes, per_example_lora_gradients
from hyperinf_ops.models import (
    LoadedModel,
    adapter_hash,
    batches,
    describe,
    load_lora_model,
    model_hash,
    pooling_of,
    resolve_model,
)
from hyperinf_ops.progress import ProgressMeter
from hyperinf_ops.projection import BlockProjector, ProjectionSpec
from hyperinf_ops.query import sync_duckdb
from hyperinf_ops.scorer import build_queries, score_store, self_influence_store
from hyperinf_ops.store import GradientBatch, LanceStore, sql_literal
from hyperinf_ops.training import warmup_train

__all__ = [
    "AdapterSummary",
    "AgreementSummary",
    "CurateSummary",
    "CurvatureSummary",
    "GradientSummary",
    "IngestSummary",
    "MislabelReport",
    "QueriesSummary",
    "RunSummary",
    "ScoreStepSummary",
    "TargetsSummary",
    "adapter_dir",
    "agreement_check",
    "build_target_queries",
    "compute_gradient_shard",
    "curate",
    "gradient_shard_is_current",
    "ingest_shard",
    "ingest_targets",
    "merge_curvature",
    "mislabel_report",
    "open_store",
    "run_all",
    "score",
    "self_influence_scores",
    "train_or_load_adapter",
]

Log = Callable[[str], Any]
ADAPTER_DIR = "adapter"
ADAPTER_INFO = "adapter.json"
_SHOWN = 10  # rows in "most helpful / most harmful" lists


@dataclass
class Summary:
    """Base of every step summary: plain data, JSON-ready through `to_dict()`."""

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


@dataclass
class IngestSummary(Summary):
    shard: str
    rows: int
    dropped_duplicates: int  # same content twice in this file (no id column)
    dropped_in_other_shards: int  # same content already ingested from another shard
    columns: list[str]
    examples_version: int
    seconds: float


@dataclass
class TargetsSummary(Summary):
    rows: dict[str, int]  # target set -> examples
    removed_sets: list[str]  # sets of an earlier config, no longer configured
    targets_version: int
    seconds: float


@dataclass
class AdapterSummary(Summary):
    source: str  # "trained", "reused" or "given"
    path: str
    adapter_hash: str
    model_hash: str
    labels: list[str]
    trained_on: int  # pool examples the warm-up saw (0 for a given adapter)
    pool_examples: int
    train: dict[str, Any] | None  # TrainStats of the warm-up that made it
    seconds: float


@dataclass
class GradientSummary(Summary):
    shard: str
    rows: int
    nonfinite_rows: int
    nonfinite_ids: list[str]
    dim: int
    fingerprint: str
    gradients_version: int
    curvature_version: int
    seconds: float
    examples_per_s: float


@dataclass
class CurvatureSummary(Summary):
    shards: list[str]
    examples: int
    matrices: int
    all_converged: bool
    max_residual: float
    max_condition_estimate: float
    diagnostics: dict[str, dict[str, Any]]  # matrix -> damping, iterations, residual, converged, condition
    curvature_version: int
    seconds: float


@dataclass
class QueriesSummary(Summary):
    target_examples: dict[str, int]
    methods: list[str]
    all_converged: bool
    diagnostics: dict[str, dict[str, Any]]  # "target/method" -> worst residual, iterations, converged
    queries_version: int
    seconds: float


@dataclass
class ScoreStepSummary(Summary):
    rows: int
    examples: int  # pool size; rows < examples means some examples have no gradient row
    pairs: list[str]  # "target_set/method"
    scores_version: int
    gradients_version: int
    run_id: str
    device: str
    seconds: float
    rows_per_second: float
    score_stats: dict[str, dict[str, float]]  # "target/method" -> min, p10, median, p90, max, negative share
    most_helpful: list[dict[str, Any]]  # for the curation target set and method
    most_harmful: list[dict[str, Any]]


@dataclass
class CurateSummary(Summary):
    query: str
    params: dict[str, Any]
    rows: int
    out_dir: str
    files: dict[str, str]
    table_versions: dict[str, int]
    seconds: float


@dataclass
class MislabelReport(Summary):
    target_set: str
    has_truth: bool  # the pool has a `flipped` column
    examples: int
    flipped: int
    # method -> auroc, detection_at_10, detection_at_20. The configured estimators (target-based, by name), and
    # with raw gradient rows also "self_influence_hyperinf" and "self_influence_tracin" (no target set).
    methods: dict[str, dict[str, float]]
    most_harmful: list[dict[str, Any]]


@dataclass
class AgreementSummary(Summary):
    method: str
    reference: str
    sample_size: int
    spearman: dict[str, float]  # target set -> Spearman of stored vs exact raw scores
    min_spearman: float
    seconds: float


@dataclass
class RunSummary(Summary):
    ingest: list[IngestSummary]
    targets: TargetsSummary
    adapter: AdapterSummary
    gradients: list[GradientSummary]  # only the shards that were (re)computed
    curvature: CurvatureSummary
    queries: QueriesSummary
    scores: ScoreStepSummary
    curated: CurateSummary
    mislabel: MislabelReport
    agreement: AgreementSummary
    seconds: float
    skipped_shards: list[str] = field(default_factory=list)  # gradients already current


def open_store(cfg: HyperinfConfig) -> LanceStore:
    """The Lance store under `cfg.storage_root`."""
    return LanceStore(str(cfg.storage_root))


# --------------------------------------------------------------------------- ingest

def ingest_shard(cfg: HyperinfConfig, store: LanceStore, shard_key: str, path: str | Path,
                 log: Log = print) -> IngestSummary:
    """Read, validate and id one pool file, then replace that shard's rows of `examples` in one commit.

    An example whose content (no id column) was already ingested from another shard is dropped here;
    with an id column, an id used by another shard is a DataError.
    """
    start = time.perf_counter()
    df = read_table(path)
    table = prepare_examples(df, cfg, shard_key, source=f"pool file {Path(path).name}")
    dropped_here = len(df) - table.num_rows
    elsewhere = _ids_in_other_shards(store, shard_key, table["sample_id"])
    if elsewhere and cfg.data.id_column is not None:
        raise DataError(f"shard {shard_key!r}: ids also used by other shards: {sorted(elsewhere)[:5]} "
                        f"({len(elsewhere)} in all); ids must be unique across the pool")
    if elsewhere:
        table = table.filter(pc.invert(pc.is_in(table["sample_id"], pa.array(sorted(elsewhere)))))
        if table.num_rows == 0:
            raise DataError(f"shard {shard_key!r}: every example was already ingested from another shard")
    version = store.write_examples(shard_key, table)
    summary = IngestSummary(shard=shard_key, rows=table.num_rows, dropped_duplicates=dropped_here,
                            dropped_in_other_shards=len(elsewhere), columns=table.column_names,
                            examples_version=version, seconds=time.perf_counter() - start)
    log(f"ingested shard {shard_key}: {summary.rows} examples ({dropped_here} duplicate rows dropped, "
        f"{len(elsewhere)} already in other shards), examples v{version}")
    return summary


def _ids_in_other_shards(store: LanceStore, shard_key: str, ids: pa.ChunkedArray) -> set[str]:
    if not store.exists("examples"):
        return set()
    others = store.open("examples").to_table(columns=["sample_id"], filter=f"shard != {sql_literal(shard_key)}")
    return set(pc.filter(ids, pc.is_in(ids, others["sample_id"])).to_pylist())


def ingest_targets(cfg: HyperinfConfig, store: LanceStore, log: Log = print) -> TargetsSummary:
    """Validate every configured target set against the ingested pool, then write each (one commit per set).

    Target sets of an earlier config that are no longer configured are removed.
    """
    start = time.perf_counter()
    pool = _require_table(store, "examples", "ingest the pool first").to_table()
    targets = prepare_targets(cfg, pool)  # every set validated before any is written
    for name, table in targets.items():
        store.write_targets(name, table)
    removed = _drop_stale(store, "targets", ["target_set"], {(name,) for name in targets})
    version = store.open("targets").version
    summary = TargetsSummary(rows={n: t.num_rows for n, t in targets.items()}, removed_sets=removed,
                             targets_version=version, seconds=time.perf_counter() - start)
    log(f"target sets {summary.rows} written, targets v{version}" + (f"; removed {removed}" if removed else ""))
    return summary


# --------------------------------------------------------------------------- adapter

def adapter_dir(cfg: HyperinfConfig) -> Path:
    """The adapter every gradient is taken under: `adapter.path`, else `<storage_root>/adapter`."""
    return cfg.adapter.path or cfg.storage_root / ADAPTER_DIR


def _adapter_key(cfg: HyperinfConfig, labels: Sequence[str], base_hash: str) -> str:
    """What a trained adapter depends on besides the data: reuse it while this is unchanged."""
    lora = dataclasses.asdict(cfg.lora)
    del lora["gradient_modules"]  # which matrices enter influence does not change the adapter
    train = dataclasses.asdict(cfg.train)
    del train["log_every"]
    # The pooling the classifier head reads (mean for sentence-transformers folders) changes what is trained.
    pooling = pooling_of(resolve_model(cfg.model)) if cfg.task == "classification" else "model"
    recipe = {"model_hash": base_hash, "task": cfg.task, "pooling": pooling, "lora": lora, "train": train,
              "max_length": cfg.max_length, "labels": list(labels)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def train_or_load_adapter(cfg: HyperinfConfig, store: LanceStore, log: Log = print, *,
                          retrain: bool = False) -> AdapterSummary:
    """The LoRA adapter all gradients are taken under.

    `adapter.path` given: use it. Else reuse `<storage_root>/adapter` when it was trained with the same
    model, labels and LoRA / training settings, even if shards were added since: gradients are only
    comparable under one adapter, so new data must not silently invalidate every stored row (pass
    `retrain=True`, or delete the folder, to train again). Else warm up a fresh adapter on the whole
    pool and save it (with `adapter.json`: hash, labels, training stats) atomically.
    """
    start = time.perf_counter()
    pool = _require_table(store, "examples", "ingest the pool first")
    n_pool = pool.count_rows()
    labels = _pool_labels(cfg, store)
    path = adapter_dir(cfg)
    if cfg.adapter.path is not None:
        loaded = _load(cfg, store)
        info = _read_adapter_info(path) or {}
        summary = AdapterSummary(source="given", path=str(path), adapter_hash=adapter_hash(loaded.model),
                                 model_hash=model_hash(loaded.model_path), labels=list(loaded.label2id),
                                 trained_on=info.get("trained_on", 0), pool_examples=n_pool,
                                 train=info.get("train"), seconds=time.perf_counter() - start)
        log(f"using the given adapter {path} (hash {summary.adapter_hash[:12]})")
        return summary
    base_hash = model_hash(resolve_model(cfg.model))
    key = _adapter_key(cfg, labels, base_hash)
    info = _read_adapter_info(path)
    if info is not None and info.get("key") == key and not retrain:
        grown = n_pool - info["trained_on"]
        log(f"reusing adapter {path} (hash {info['adapter_hash'][:12]})"
            + (f"; the pool grew by {grown} examples since it was trained" if grown else ""))
        return AdapterSummary(source="reused", path=str(path), adapter_hash=info["adapter_hash"],
                              model_hash=base_hash, labels=info["labels"], trained_on=info["trained_on"],
                              pool_examples=n_pool, train=info["train"], seconds=time.perf_counter() - start)
    records = pool.to_table(columns=_record_columns(cfg)).to_pylist()
    probe = load_lora_model(cfg, labels)
    log(f"warm-up training on {len(records)} examples: {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
        f"lr {cfg.train.lr}, device {probe.device}")
    stats = warmup_train(probe, records, cfg.train, max_length=cfg.max_length, progress=lambda e: log(str(e)))
    train = {**dataclasses.asdict(stats), "examples_per_s": stats.examples_per_s}
    info = {"key": key, "adapter_hash": adapter_hash(probe.model), "model_hash": base_hash,
            "labels": labels, "trained_on": len(records), "train": train, "model": describe(probe)}
    _save_adapter(probe, path, info)
    log(f"adapter saved to {path} (hash {info['adapter_hash'][:12]}), final loss {stats.loss_per_epoch[-1]:.4f}")
    return AdapterSummary(source="trained", path=str(path), adapter_hash=info["adapter_hash"],
                          model_hash=base_hash, labels=labels, trained_on=len(records), pool_examples=n_pool,
                          train=train, seconds=time.perf_counter() - start)


def _save_adapter(loaded: LoadedModel, path: Path, info: Mapping[str, Any]) -> None:
    """Write the adapter next to `path` and swap it in: readers never see half an adapter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        loaded.model.save_pretrained(tmp)
        (tmp / ADAPTER_INFO).write_text(json.dumps(info, indent=2, default=str))
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_adapter_info(path: Path) -> dict[str, Any] | None:
    file = path / ADAPTER_INFO
    return json.loads(file.read_text()) if file.is_file() else None


def _pool_labels(cfg: HyperinfConfig, store: LanceStore) -> list[str]:
    if cfg.task != "classification":
        return []
    labels = store.open("examples").to_table(columns=["label"])["label"]
    return sorted(pc.unique(labels).to_pylist())


# The last model loaded under an adapter in this process: run_all's steps share it instead of reloading.
_LOADED: dict[tuple, LoadedModel] = {}


def _load(cfg: HyperinfConfig, store: LanceStore) -> LoadedModel:
    """The model under the pipeline's adapter (labels as the adapter was trained with).

    Cached per process, keyed by the adapter folder's file names, sizes and mtimes, so a retrained
    (atomically replaced) adapter is always reloaded.
    """
    path = adapter_dir(cfg)
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"no adapter at {path}: run train_or_load_adapter first")
    info = _read_adapter_info(path)
    labels = info["labels"] if info is not None and info.get("labels") else _pool_labels(cfg, store)
    files = tuple(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir()) if f.is_file()
    )
    key = (cfg.model, cfg.task, cfg.device, str(path), files, tuple(labels))
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_lora_model(cfg, labels, adapter_dir=path)
    return _LOADED[key]


def _fingerprint(cfg: HyperinfConfig, loaded: LoadedModel) -> Fingerprint:
    model_id = cfg.model if cfg.model in BUNDLED_MODELS else Path(cfg.model).name
    return Fingerprint.create(
        model_id=model_id, model_hash=model_hash(loaded.model_path), adapter_hash=adapter_hash(loaded.model),
        task=cfg.task, lora_modules=loaded.lora_modules,
        shapes=lora_matrix_shapes(loaded.model, cfg.lora.gradient_modules),
        projection=ProjectionSpec(dim=cfg.projection_dim, seed=cfg.projection_seed, dtype=cfg.projection_dtype),
        loss_reduction="mean_over_response_tokens" if cfg.task == "causal_lm" else "mean",
    )


# --------------------------------------------------------------------------- gradients

def _record_columns(cfg: HyperinfConfig) -> list[str]:
    return ["sample_id", *text_columns(cfg.task), "label"]


def _shard_records(cfg: HyperinfConfig, store: LanceStore, shard_key: str) -> list[dict[str, Any]]:
    table = _require_table(store, "examples", "ingest the pool first").to_table(
        columns=_record_columns(cfg), filter=f"shard = {sql_literal(shard_key)}"
    )
    if table.num_rows == 0:
        raise DataError(f"shard {shard_key!r} has no examples: ingest it first")
    return table.to_pylist()


def _gradient_batches(cfg: HyperinfConfig, loaded: LoadedModel, records: Sequence[Mapping[str, Any]],
                      ) -> Iterator[tuple[list[str], dict[str, Tensor]]]:
    """(sample_ids, per-example LoRA gradients) batch by batch."""
    for chunk, batch in batches(loaded, records, cfg.gradient_batch_size, cfg.max_length):
        grads = per_example_lora_gradients(loaded.model, batch, modules=cfg.lora.gradient_modules)
        yield [str(r["sample_id"]) for r in chunk], grads


def _finite_rows(grads: Mapping[str, Tensor]) -> Tensor:
    """(n,) bool: the examples whose gradient is finite in every matrix."""
    return torch.stack([torch.isfinite(g).flatten(1).all(1) for g in grads.values()]).all(0)


def compute_gradient_shard(cfg: HyperinfConfig, store: LanceStore, shard_key: str, log: Log = print, *,
                           overwrite: bool = False) -> GradientSummary:
    """Per-example gradients of one shard -> projected rows in `gradients` + curvature sums in `curvature`.

    One forward/backward per batch gives the raw gradients; the exact curvature partial sums and the
    projected rows come from the same pass. Each table's shard is replaced in one commit. Examples
    with a non-finite gradient are left out of both and counted. Rows of another fingerprint (another
    adapter, projection, ...) in either table are refused up front, unless `overwrite=True`, which
    deletes them in the same commits (use it after retraining the adapter, then recompute every shard).
    """
    start = time.perf_counter()
    records = _shard_records(cfg, store, shard_key)
    loaded = _load(cfg, store)
    fp = _fingerprint(cfg, loaded)
    if not overwrite:
        for table in ("gradients", "curvature"):
            if store.exists(table):
                store.check_fingerprint(table, fp)
    shapes = lora_matrix_shapes(loaded.model, cfg.lora.gradient_modules)
    projector = BlockProjector(shapes, fp.projection, device=loaded.device)
    n_batches = math.ceil(len(records) / cfg.gradient_batch_size)
    meter = ProgressMeter(f"gradients of shard {shard_key}", len(records), lambda e: log(str(e)),
                          every=max(1, n_batches // 10))
    curvature: dict[str, CurvaturePartial] = {}
    bad_ids: list[str] = []

    def rows() -> Iterator[GradientBatch]:
        # Consumed by the store while it streams the shard into Lance: memory stays one batch deep.
        for ids, grads in _gradient_batches(cfg, loaded, records):
            keep = _finite_rows(grads)
            bad_ids.extend(i for i, ok in zip(ids, keep.tolist(), strict=True) if not ok)
            if not bool(keep.any()):
                meter.update(len(ids))
                continue
            grads = {name: g[keep] for name, g in grads.items()}
            ids = [i for i, ok in zip(ids, keep.tolist(), strict=True) if ok]
            for name, part in curvature_partials(grads).items():
                curvature[name] = part if name not in curvature else curvature[name].merge(part)
            meter.update(len(ids))
            yield GradientBatch.from_grads(projector, ids, grads)

    grad_version = store.write_gradients(shard_key, rows(), fp, overwrite=overwrite)  # no rows: DataError
    curv_version = store.write_curvature(shard_key, curvature, fp, overwrite=overwrite)
    done = meter.finish()
    n_rows = len(records) - len(bad_ids)
    if bad_ids:
        log(f"shard {shard_key}: {len(bad_ids)} examples with non-finite gradients left out: {bad_ids[:5]}")
    log(f"gradients of shard {shard_key}: {n_rows} rows x {projector.out_dim} dims, gradients v{grad_version}, "
        f"curvature v{curv_version}")
    return GradientSummary(shard=shard_key, rows=n_rows, nonfinite_rows=len(bad_ids), nonfinite_ids=bad_ids[:20],
                           dim=projector.out_dim, fingerprint=fp.digest(), gradients_version=grad_version,
                           curvature_version=curv_version, seconds=time.perf_counter() - start,
                           examples_per_s=done.rate)


def gradient_shard_is_current(cfg: HyperinfConfig, store: LanceStore, shard_key: str,
                              fingerprint: Fingerprint) -> bool:
    """True when the shard's gradient and curvature rows carry `fingerprint` and cover exactly its examples."""
    if not all(store.exists(t) for t in ("examples", "gradients", "curvature")):
        return False
    where = f"shard = {sql_literal(shard_key)}"
    grads = store.open("gradients").to_table(columns=["sample_id", "fingerprint"], filter=where)
    curv = store.open("curvature").to_table(columns=["count", "fingerprint"], filter=where)
    examples = store.open("examples").to_table(columns=["sample_id"], filter=where)["sample_id"]
    digests = set(grads["fingerprint"].to_pylist()) | set(curv["fingerprint"].to_pylist())
    return (digests == {fingerprint.digest()}
            and set(grads["sample_id"].to_pylist()) == set(examples.to_pylist())
            and set(curv["count"].to_pylist()) == {grads.num_rows})


# --------------------------------------------------------------------------- curvature, queries, scores

def _checked_fingerprint(cfg: HyperinfConfig, store: LanceStore) -> tuple[LoadedModel, Fingerprint]:
    """The current adapter's fingerprint, after checking that every stored gradient / curvature row has it
    and that they cover every shard of the pool consistently."""
    loaded = _load(cfg, store)
    fp = _fingerprint(cfg, loaded)
    for table in ("gradients", "curvature"):
        _require_table(store, table, "compute the gradient shards first")
        store.check_fingerprint(table, fp)
    pool = set(pc.unique(store.open("examples").to_table(columns=["shard"])["shard"]).to_pylist())
    grads = store.open("gradients").to_table(columns=["shard"])["shard"].to_pandas().value_counts()
    curv = store.open("curvature").to_table(columns=["shard", "count"]).to_pandas().groupby("shard")["count"]
    missing, stale = sorted(pool - set(grads.index)), sorted(set(grads.index) - pool)
    if missing or stale:
        raise DataError(f"gradient rows do not match the pool's shards: missing {missing}, not in the pool {stale}; "
                        "compute (or remove) those shards")
    uneven = sorted(s for s in grads.index if s not in curv.groups or set(curv.get_group(s)) != {grads[s]})
    if uneven:
        raise DataError(f"curvature sums and gradient rows disagree for shards {uneven}: recompute them")
    return loaded, fp


def _options(cfg: HyperinfConfig, method: str = "hyperinf") -> EstimatorOptions:
    return EstimatorOptions(method=method, damping_ratio=cfg.damping_ratio, **cfg.estimator_options)


def merge_curvature(cfg: HyperinfConfig, store: LanceStore, log: Log = print) -> CurvatureSummary:
    """Merge the per-shard curvature sums, damp, and Schulz-invert every LoRA matrix: solver health.

    The merge is exact (sums); the inverse is recomputed where queries are built (it is cheap next to
    gradients), so this step stores nothing: it proves the inverse converges (InverseNotConvergedError
    otherwise) and reports iterations, residual and condition estimate per matrix.
    """
    start = time.perf_counter()
    _, fp = _checked_fingerprint(cfg, store)
    curvature = store.read_curvature(fp)
    zero = {name: torch.zeros(part.numel // part.gfim_sum.shape[0], part.gfim_sum.shape[0], dtype=torch.float64)
            for name, part in curvature.items()}
    diagnostics = precondition(zero, curvature, _options(cfg)).diagnostics
    shards = sorted(pc.unique(store.open("curvature").to_table(columns=["shard"])["shard"]).to_pylist())
    summary = CurvatureSummary(
        shards=shards, examples=next(iter(curvature.values())).count, matrices=len(curvature),
        all_converged=all(d["converged"] for d in diagnostics.values()),
        max_residual=max(d["residual"] for d in diagnostics.values()),
        max_condition_estimate=max(d["condition_estimate"] for d in diagnostics.values()),
        diagnostics=diagnostics, curvature_version=store.open("curvature").version,
        seconds=time.perf_counter() - start)
    log(f"curvature of {summary.examples} examples over {len(shards)} shards, {summary.matrices} matrices: "
        f"Schulz max residual {summary.max_residual:.2e}, max condition estimate "
        f"{summary.max_condition_estimate:.3g}, converged {summary.all_converged}")
    return summary


def _mean_target_gradient(cfg: HyperinfConfig, loaded: LoadedModel, records: Sequence[Mapping[str, Any]],
                          name: str, log: Log) -> tuple[dict[str, Tensor], int]:
    """v_l = mean raw (exact) gradient over a target set's finite examples, float64, and their number."""
    total: dict[str, Tensor] = {}
    n = 0
    for _ids, grads in _gradient_batches(cfg, loaded, records):
        keep = _finite_rows(grads)
        if not bool(keep.all()):
            log(f"target set {name}: {int((~keep).sum())} examples with non-finite gradients left out")
        for key, g in grads.items():
            part = g[keep].sum(0, dtype=torch.float64)
            total[key] = part if key not in total else total[key] + part
        n += int(keep.sum())
    if n == 0:
        raise DataError(f"target set {name!r}: no example has a finite gradient")
    return {key: t / n for key, t in total.items()}, n


def _target_records(cfg: HyperinfConfig, store: LanceStore, name: str) -> list[dict[str, Any]]:
    table = _require_table(store, "targets", "run ingest_targets first").to_table(
        columns=_record_columns(cfg), filter=f"target_set = {sql_literal(name)}")
    if table.num_rows == 0:
        raise DataError(f"target set {name!r} has no stored examples: run ingest_targets first")
    return table.to_pylist()


def build_target_queries(cfg: HyperinfConfig, store: LanceStore, log: Log = print) -> QueriesSummary:
    """One preconditioned, projected query per (target set, estimator), stored in `queries`.

    Target gradients are raw (exact); v_l is preconditioned with the merged curvature (DataInf by its
    projected two-pass over the stored rows), then projected with the rows' map. Queries of target
    sets or estimators no longer configured are removed.
    """
    start = time.perf_counter()
    loaded, fp = _checked_fingerprint(cfg, store)
    curvature = store.read_curvature(fp)
    projector = BlockProjector(lora_matrix_shapes(loaded.model, cfg.lora.gradient_modules), fp.projection,
                               device=loaded.device)
    queries, sizes = [], {}
    for name in cfg.targets:
        v, sizes[name] = _mean_target_gradient(cfg, loaded, _target_records(cfg, store, name), name, log)
        queries += build_queries(v, curvature, cfg.estimators, projector, _options(cfg), target_set=name,
                                 fingerprint=fp, store=store)
    version = store.write_queries(queries)
    _drop_stale(store, "queries", ["target_set", "method"], _configured_pairs(cfg))
    health = {f"{q.target_set}/{q.method}": _worst(q.diagnostics) for q in queries}
    summary = QueriesSummary(target_examples=sizes, methods=list(cfg.estimators),
                             all_converged=all(h["converged"] for h in health.values()), diagnostics=health,
                             queries_version=store.open("queries").version if version >= 0 else version,
                             seconds=time.perf_counter() - start)
    log(f"{len(queries)} queries ({', '.join(health)}) written, queries v{summary.queries_version}")
    return summary


def _worst(diagnostics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One line of solver health over a query's matrices."""
    residuals = [d["residual"] for d in diagnostics.values() if not math.isnan(d.get("residual", math.nan))]
    return {"converged": all(d.get("converged", True) for d in diagnostics.values()),
            "max_residual": max(residuals) if residuals else None,
            "max_iterations": max((d.get("iterations", 0) for d in diagnostics.values()), default=0)}


def _configured_pairs(cfg: HyperinfConfig) -> set[tuple[str, str]]:
    return {(t, m) for t in cfg.targets for m in cfg.estimators}


def score(cfg: HyperinfConfig, store: LanceStore, log: Log = print) -> ScoreStepSummary:
    """Score every gradient row against every configured (target set, estimator) query in one scan."""
    start = time.perf_counter()
    _, fp = _checked_fingerprint(cfg, store)
    wanted = _configured_pairs(cfg)
    queries = [q for q in store.read_queries(fp) if (q.target_set, q.method) in wanted]
    missing = sorted(wanted - {(q.target_set, q.method) for q in queries})
    if missing:
        raise DataError(f"no stored queries for {missing}: run build_target_queries first")
    result = score_store(store, queries, device=_score_device(cfg))
    _drop_stale(store, "scores", ["target_set", "method"], wanted)
    n_examples = store.open("examples").count_rows()
    if result.rows < n_examples:
        log(f"warning: {n_examples - result.rows} pool examples have no gradient row (non-finite gradients)")
    stats = {}
    for target, method in sorted(wanted):
        s = _scores(store, target, method)["score"].to_numpy()
        stats[f"{target}/{method}"] = {"min": float(s.min()), "p10": float(np.quantile(s, 0.1)),
                                      "median": float(np.median(s)), "p90": float(np.quantile(s, 0.9)),
                                      "max": float(s.max()), "negative_share": float((s < 0).mean())}
    target, method = _curation_pair(cfg)
    summary = ScoreStepSummary(
        rows=result.rows, examples=n_examples, pairs=[f"{t}/{m}" for t, m in sorted(wanted)],
        scores_version=store.open("scores").version, gradients_version=result.gradients_version,
        run_id=result.run_id, device=result.device, seconds=time.perf_counter() - start,
        rows_per_second=result.rows_per_second, score_stats=stats,
        most_helpful=_extremes(cfg, store, target, method, helpful=True),
        most_harmful=_extremes(cfg, store, target, method, helpful=False))
    log(f"scored {result.rows} rows x {len(queries)} queries in {result.seconds:.1f}s on {result.device}, "
        f"scores v{summary.scores_version}")
    return summary


def _score_device(cfg: HyperinfConfig) -> str | None:
    """The scorer's device: the configured one, or None to let it pick CUDA when available."""
    return None if cfg.device == "auto" else cfg.device


def _curation_pair(cfg: HyperinfConfig) -> tuple[str, str]:
    params = cfg.curation.params
    return (str(params.get("target_set", params.get("set_a", next(iter(cfg.targets))))),
            str(params.get("method", cfg.estimators[0])))


def _scores(store: LanceStore, target: str, method: str) -> pd.DataFrame:
    return store.open("scores").to_table(
        columns=["sample_id", "score", "rank"],
        filter=f"target_set = {sql_literal(target)} AND method = {sql_literal(method)}").to_pandas()


def _extremes(cfg: HyperinfConfig, store: LanceStore, target: str, method: str, *, helpful: bool,
              k: int = _SHOWN) -> list[dict[str, Any]]:
    """The k most helpful (or harmful) examples with their text and label, most extreme first."""
    ranked = _scores(store, target, method).sort_values("rank", ascending=helpful).head(k)
    ids = ", ".join(sql_literal(i) for i in ranked["sample_id"])
    if not ids:
        return []
    rows = store.open("examples").to_table(columns=_record_columns(cfg), filter=f"sample_id IN ({ids})")
    info = {r["sample_id"]: r for r in rows.to_pylist()}
    return [{**{col: (v[:200] if isinstance(v, str) else v) for col, v in info[sid].items()},
             "score": float(s), "rank": int(rk)}
            for sid, s, rk in zip(ranked["sample_id"], ranked["score"], ranked["rank"], strict=True)]


# --------------------------------------------------------------------------- curation and reports

def curate(cfg: HyperinfConfig, store: LanceStore, log: Log = print) -> CurateSummary:
    """Run the configured `sql/` query and export the subset (Parquet, JSONL, manifest.json) to
    `<storage_root>/exports/<query>/` (replaced whole, atomically); refresh the DuckDB file."""
    start = time.perf_counter()
    _require_table(store, "scores", "run score first")
    out_dir = cfg.storage_root / "exports" / cfg.curation.query
    manifest = export_subset(store, cfg.curation.query, cfg.curation.params, out_dir, overwrite=True)
    sync_duckdb(store)
    summary = CurateSummary(query=cfg.curation.query, params=dict(cfg.curation.params), rows=manifest.row_count,
                            out_dir=str(out_dir), files={k: str(out_dir / v) for k, v in manifest.files.items()},
                            table_versions=manifest.table_versions, seconds=time.perf_counter() - start)
    log(f"curated subset {cfg.curation.query}{summary.params}: {summary.rows} examples -> {out_dir}")
    return summary


def _auroc(harm: np.ndarray, positive: np.ndarray) -> float:
    """P(a random positive has higher `harm` than a random negative), ties counted half (Mann-Whitney)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = pd.Series(harm).rank(method="average").to_numpy()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


SELF_INFLUENCE_PREFIX = "self_influence_"
# Self-influence detectors the mislabel report adds with raw gradient rows: the GFIM inverse (HyperINF's
# curvature, Schulz) and the plain squared gradient norm (tracin: no curvature).
SELF_INFLUENCE_REPORTED = ("hyperinf", "tracin")


def _detection(harm: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """AUROC of `harm` vs flipped, and the share of all flips among the 10% / 20% most harmful."""
    order = np.argsort(-harm, kind="stable")
    found = {f"detection_at_{p}": float(flipped[order[: math.ceil(len(harm) * p / 100)]].sum()
                                        / max(flipped.sum(), 1)) for p in (10, 20)}
    return {"auroc": _auroc(harm, flipped), **found}


def self_influence_scores(cfg: HyperinfConfig, store: LanceStore, method: str = "hyperinf") -> pd.Series:
    """Self-influence of every stored (raw) gradient row under the pool's merged curvature, indexed by
    sample_id: higher = less explained by the rest of the pool (likely mislabeled). No target set needed.
    GradientMismatchError when the rows are projected (projection_dim > 0)."""
    fp = store.fingerprint("gradients")
    if fp is None:
        raise DataError("the gradients table is empty: compute the gradient shards first")
    curvature = store.read_curvature(fp)
    shapes = {name: (part.numel // part.gfim_sum.shape[0], part.gfim_sum.shape[0]) for name, part in curvature.items()}
    ids, values = self_influence_store(store, curvature, shapes, _options(cfg, method), device=_score_device(cfg))
    return pd.Series(values, index=pd.Index(ids, name="sample_id"), name=f"{SELF_INFLUENCE_PREFIX}{method}")


def mislabel_report(cfg: HyperinfConfig, store: LanceStore, target_set: str | None = None) -> MislabelReport:
    """How well each estimator's most harmful examples find planted label flips (pool column `flipped`):
    AUROC of -score vs flipped, and the share of all flips found in the 10% / 20% most harmful.

    With raw gradient rows (projection_dim 0) the report also ranks by self-influence (`self_influence_hyperinf`:
    g_k (G + lambda I)^-1 g_k with the pool's GFIM; `self_influence_tracin`: |g_k|^2), the classic
    target-free mislabel detector, higher = more suspicious. Without a `flipped` column, only the most
    harmful examples are listed."""
    target = target_set or _curation_pair(cfg)[0]
    examples = _require_table(store, "examples", "ingest the pool first")
    has_truth = "flipped" in examples.schema.names
    truth = (examples.to_table(columns=["sample_id", "flipped"]).to_pandas().set_index("sample_id")["flipped"]
             .astype(bool) if has_truth else None)
    methods = {}
    for method in cfg.estimators:
        s = _scores(store, target, method)
        if s.empty:
            raise DataError(f"no scores for {target}/{method}: run score first")
        if truth is None:
            continue
        flipped = truth.reindex(s["sample_id"], fill_value=False).to_numpy(dtype=bool)
        methods[method] = _detection(-s["score"].to_numpy(), flipped)
    if truth is not None and cfg.projection_dim == 0:
        for method in SELF_INFLUENCE_REPORTED:
            si = self_influence_scores(cfg, store, method)
            flipped = truth.reindex(si.index, fill_value=False).to_numpy(dtype=bool)
            methods[str(si.name)] = _detection(si.to_numpy(), flipped)
    n_flipped = int(truth.sum()) if truth is not None else 0
    return MislabelReport(target_set=target, has_truth=has_truth, examples=examples.count_rows(), flipped=n_flipped,
                          methods=methods, most_harmful=_extremes(cfg, store, target, _curation_pair(cfg)[1],
                                                                  helpful=False))


def agreement_check(cfg: HyperinfConfig, store: LanceStore, sample_size: int = 64, seed: int = 0, *,
                    method: str | None = None, log: Log = print) -> AgreementSummary:
    """Spearman between stored scores (default: hyperinf, else the first estimator) and exact scores
    recomputed from the raw gradients of a seeded random sample of the pool: fp64 Cholesky solve of the
    same damped GFIM, no projection. Measures projection + solver error together."""
    start = time.perf_counter()
    method = method or ("hyperinf" if "hyperinf" in cfg.estimators else cfg.estimators[0])
    loaded, fp = _checked_fingerprint(cfg, store)
    curvature = store.read_curvature(fp)
    ids = sorted(store.open("gradients").to_table(columns=["sample_id"])["sample_id"].to_pylist())
    chosen = sorted(np.random.default_rng(seed).choice(ids, size=min(sample_size, len(ids)), replace=False))
    rows = store.open("examples").to_table(
        columns=_record_columns(cfg), filter=f"sample_id IN ({', '.join(sql_literal(i) for i in chosen)})")
    records = rows.to_pylist()
    raw_ids: list[str] = []
    parts: dict[str, list[Tensor]] = {}
    for batch_ids, grads in _gradient_batches(cfg, loaded, records):
        raw_ids += batch_ids
        for key, g in grads.items():
            parts.setdefault(key, []).append(g)
    sample = {key: torch.cat(gs) for key, gs in parts.items()}
    spearman = {}
    for name in cfg.targets:
        v, _ = _mean_target_gradient(cfg, loaded, _target_records(cfg, store, name), name, log)
        exact = score_gradients(precondition(v, curvature, _options(cfg, "exact")), sample).cpu().numpy()
        stored = _scores(store, name, method).set_index("sample_id")["score"].reindex(raw_ids).to_numpy()
        spearman[name] = float(pd.Series(exact).corr(pd.Series(stored), method="spearman"))
    summary = AgreementSummary(method=method, reference="exact", sample_size=len(raw_ids), spearman=spearman,
                               min_spearman=min(spearman.values()), seconds=time.perf_counter() - start)
    log(f"agreement of stored {method} scores with exact raw scores on {len(raw_ids)} examples: "
        + ", ".join(f"{k} Spearman {v:.4f}" for k, v in spearman.items()))
    return summary


# --------------------------------------------------------------------------- helpers and the whole graph

def _require_table(store: LanceStore, table: str, hint: str):
    if not store.exists(table):
        raise DataError(f"table {table!r} does not exist yet: {hint}")
    return store.open(table)


def _drop_stale(store: LanceStore, table: str, columns: list[str], keep: set[tuple[str, ...]]) -> list[str]:
    """Remove rows whose key (values of `columns`) is not in `keep`, one commit per key; returns the keys."""
    present = store.open(table).to_table(columns=columns).to_pandas().drop_duplicates()
    stale = [tuple(map(str, row)) for row in present.itertuples(index=False) if tuple(map(str, row)) not in keep]
    for key in stale:
        store.replace_where(table, dict(zip(columns, key, strict=True)), [], unique=None)
    return ["/".join(key) for key in stale]


def run_all(cfg: HyperinfConfig, log: Log = print, *, agreement_sample: int = 64) -> RunSummary:
    """The whole graph in plain Python: the reference for the Dagster assets, and what tests run.

    Re-running is incremental and never duplicates rows: every shard is re-ingested (one commit each),
    but gradients are recomputed only for shards that are not current under the adapter's fingerprint.
    If the adapter changed (retrained), every shard is recomputed and the old rows are replaced.
    """
    start = time.perf_counter()
    store = open_store(cfg)
    shards = discover_shards(cfg.data)
    ingested = [ingest_shard(cfg, store, key, path, log) for key, path in shards.items()]
    targets = ingest_targets(cfg, store, log)
    adapter = train_or_load_adapter(cfg, store, log)
    fp = _fingerprint(cfg, _load(cfg, store))
    stale = any(store.exists(t) and set(store.row_fingerprints(t)) - {fp.digest()} for t in ("gradients",
                                                                                            "curvature"))
    if stale:
        log("stored gradients were made under another fingerprint (adapter or projection changed): "
            "recomputing every shard")
    todo = [k for k in shards if stale or not gradient_shard_is_current(cfg, store, k, fp)]
    gradients = [compute_gradient_shard(cfg, store, key, log, overwrite=stale) for key in todo]
    curvature = merge_curvature(cfg, store, log)
    queries = build_target_queries(cfg, store, log)
    scores = score(cfg, store, log)
    curated = curate(cfg, store, log)
    mislabel = mislabel_report(cfg, store)
    agreement = agreement_check(cfg, store, sample_size=agreement_sample, log=log)
    if mislabel.has_truth:
        log("mislabel detection (AUROC): " + ", ".join(f"{m} {r['auroc']:.3f}" for m, r in mislabel.methods.items()))
    return RunSummary(ingest=ingested, targets=targets, adapter=adapter, gradients=gradients, curvature=curvature,
                      queries=queries, scores=scores, curated=curated, mislabel=mislabel, agreement=agreement,
                      seconds=time.perf_counter() - start, skipped_shards=[k for k in shards if k not in todo])
