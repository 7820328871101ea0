"""Stage 0: everything a run can check from the config and its files, before any training or writing.

`load_config` has already checked the file itself; this checks it against the data, with the stages' own
functions, so a mistake costs seconds and no table changes:

    device            `device: cuda` on a machine without CUDA (devices.resolve_device)
    adapter.path      its adapter_config.json has the configured LoRA rank, alpha and modules, and its weights
                      file is a readable safetensors file (named when it is not)
    the model         `max_length` within its positions, `lora.rank` within its width (config.json, no weights)
    stored rows       the gradient rows stored under storage_root have the width and value type the LoRA and
                      compression settings give (else: `hyperinf migrate`, migrate.row_layout_problem)
    every pool file   readable, the configured columns present, the columns of the stored pool (of the first
                      file, on a new store), no empty text / missing label, ids unique in
                      the file and across files (pool.prepare_shard: what ingest would write; the rows of shards
                      whose file is gone do not count, ingest removes them)
    target sets       files prepared like the pool; `where:` predicates run over the new pool (sandboxed, as
                      the target_sets asset runs them); no set empty; labels the pool has (prepare_targets)
    evaluation test   prepared like the pool, labels the pool has (prepare_test; a classifier's only)
    the pool          at least two examples; for classification, at least two labels
    signals.folds     every label has at least `folds` pool examples (the cross-fit splits each label)

Warnings (returned, not raised): target or test examples that are also in the pool (a target example scores
itself; a test example measures memorization), test examples that are also in a target set (the curation selects
for them), and a classifier's target set without some of the pool's labels (their examples score as harmful).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from hyperinf_ops.data.io import discover_shards
from hyperinf_ops.data.prepare import prepare_targets, prepare_test, table_digest
from hyperinf_ops.devices import resolve_device
from hyperinf_ops.errors import ConfigError, DataError
from hyperinf_ops.migrate import row_layout_problem
from hyperinf_ops.stages.common import Log, Summary
from hyperinf_ops.stages.pool import gone_shards, prepare_shard, stored_digest
from hyperinf_ops.store import LanceStore
from hyperinf_ops.tasks import get_task

__all__ = ["PreflightSummary", "preflight"]

_SHOWN = 5


@dataclass
class PreflightSummary(Summary):
    shards: dict[str, Path]  # every pool file, by shard key
    pending: list[str]  # shards whose prepared rows differ from what `examples` holds (to ingest)
    gone: list[str]  # stored shards whose pool file is gone (deleted or renamed): to remove
    pool_rows: int
    target_rows: dict[str, int]
    warnings: list[str] = field(default_factory=list)


def preflight(store: LanceStore, cfg: Any, *, log: Log = print) -> PreflightSummary:
    """Check the config `cfg` (a loaded HyperinfConfig) against its files and this machine; DataError /
    ConfigError naming the first problem, nothing written; each warning is logged as `warning: ...`. See the
    module docstring for what is checked."""
    try:
        resolve_device(cfg.device)
    except ValueError as err:
        raise ConfigError(f"device: {err}") from err
    if cfg.adapter.path is not None:
        _check_adapter(Path(cfg.adapter.path), cfg.lora)
    _check_model_fits(cfg)
    problem = row_layout_problem(store, cfg)  # before the adapter step would train (and the gradient step fail)
    if problem:
        raise ConfigError(problem)
    shards = discover_shards(cfg.data.path)
    gone = gone_shards(store, shards)
    tables, pending = {}, []
    for shard, path in shards.items():
        tables[shard] = prepare_shard(store, shard, path, cfg.data, cfg.task, gone=gone)[0]
        if table_digest(tables[shard]) != stored_digest(store, shard):
            pending.append(shard)
    _check_columns(store, tables, shards)
    pool = _new_pool(tables, id_column=cfg.data.id_column)
    labels = sorted(set(pool["label"].to_pylist()) - {None})
    if pool.num_rows < 2:
        raise DataError(f"the pool has {pool.num_rows} example: influence ranks examples against each other; give "
                        "at least two")
    if cfg.task == "classification" and len(labels) < 2:
        raise DataError(f"every pool example has the label {labels[0]!r}: a classifier needs at least two labels "
                        f"(column {cfg.data.label_column!r})")
    targets = prepare_targets(cfg.targets, cfg.data, cfg.task, pool)
    _check_folds(pool, cfg)
    in_pool = set(pool["content_hash"].to_pylist())
    warnings = [_overlap_warning(f"target set {name!r}", table, in_pool, "their scores include their own gradient")
                for name, table in targets.items() if cfg.targets[name].path is not None]
    # A causal LM's label is metadata (a source, a topic): targets and tests may lack or add some.
    classes = labels if get_task(cfg.task).has_classes else []
    warnings += [_missing_labels_warning(name, table, classes) for name, table in targets.items()]
    if cfg.evaluation is not None:
        test = prepare_test(cfg.evaluation.test.path, cfg.data, cfg.task, classes)
        warnings.append(_overlap_warning("evaluation test file", test, in_pool, "the evaluation trains on them"))
        warnings += [_overlap_warning("evaluation test file", test, set(table["content_hash"].to_pylist()),
                                      "the curation selects for them, so the evaluation overstates it",
                                      where=f"target set {name!r}") for name, table in targets.items()]
    summary = PreflightSummary(shards=shards, pending=pending, gone=gone, pool_rows=pool.num_rows,
                               target_rows={n: t.num_rows for n, t in targets.items()},
                               warnings=[w for w in warnings if w])
    for warning in summary.warnings:
        log(f"warning: {warning}")
    return summary


def _check_columns(store: LanceStore, tables: dict[str, pa.Table], shards: dict[str, Path]) -> None:
    """Every pool file gives the columns of the stored pool (of the first file, on a new store): a column added
    to one file failed its ingest after the preflight, the instance and the other shards' work."""
    if store.exists("examples"):
        reference, where = store.open("examples").schema.names, "the stored pool"
    elif tables:
        first = next(iter(tables))
        reference, where = tables[first].schema.names, f"pool file {shards[first].name}"
    else:
        return
    for shard, table in tables.items():
        new, missing = sorted(set(table.schema.names) - set(reference)), sorted(set(reference) - set(table.schema.names))
        if new or missing:
            raise DataError(f"pool file {shards[shard].name}: its columns differ from {where}'s: new {new}, missing "
                            f"{missing}; every pool file has the same columns (a pool with other columns needs "
                            "another storage_root)")


def _check_model_fits(cfg: Any) -> None:
    """ConfigError for `max_length` beyond the model's positions or `lora.rank` above its width
    (architecture.model_fit_problem; before, the first was found while tokenizing, the second by asking for terabytes)."""
    from hyperinf_ops.architecture import model_fit_problem

    problem = model_fit_problem(cfg)
    if problem:
        raise ConfigError(problem)


def _check_folds(pool: pa.Table, cfg: Any) -> None:
    """`signals.folds` warm-ups need every label in every fold: refused before any training when a label has
    fewer pool examples than folds."""
    if not cfg.signals.folds or cfg.task != "classification":
        return
    counts = pool.group_by("label").aggregate([("label", "count")]).to_pylist()
    small = {str(r["label"]): r["label_count"] for r in counts if r["label_count"] < cfg.signals.folds}
    if small:
        raise ConfigError(f"signals.folds: {cfg.signals.folds} folds need at least {cfg.signals.folds} pool examples "
                          f"of every label; {small} have fewer: lower signals.folds (or 0: no cross-fit)")


def _new_pool(tables: dict[str, pa.Table], *, id_column: str | None) -> pa.Table:
    """The pool as the files define it now. With an id column, an id in two files is an error (ingest would
    fail at the second file, after writing the first); without one, the same content in two files is one
    example (ingest keeps the first shard's)."""
    pool = pa.concat_tables(list(tables.values()), promote_options="permissive")
    first: dict[str, tuple[int, str]] = {}  # sample_id -> (row, shard) of its first occurrence, in row order
    clashes: list[str] = []
    for row, (sid, shard) in enumerate(zip(pool["sample_id"].to_pylist(), pool["shard"].to_pylist(), strict=True)):
        if sid not in first:
            first[sid] = (row, shard)
        elif first[sid][1] != shard:
            clashes.append(f"{sid!r} ({first[sid][1]}, {shard})")
    if clashes and id_column is not None:
        raise DataError(f"ids used by more than one pool file: {', '.join(clashes[:_SHOWN])} ({len(clashes)} in all); "
                        f"ids in column {id_column!r} must be unique across the pool")
    return pool if len(first) == pool.num_rows else pool.take([row for row, _ in first.values()])


def _overlap_warning(source: str, table: pa.Table, hashes: set[str], consequence: str, *, where: str = "the pool") -> str:
    shared = sum(h in hashes for h in table["content_hash"].to_pylist())
    if not shared:
        return ""
    return f"{source}: {shared} of {table.num_rows} examples are also in {where} (same text and label): {consequence}"


def _missing_labels_warning(name: str, table: pa.Table, pool_labels: list[str]) -> str:
    """A classifier's target set without some of the pool's labels: their examples push toward a class the target
    never asks for, so they score as harmful and a drop curation takes them first."""
    missing = sorted(set(pool_labels) - set(table["label"].to_pylist()))
    if not missing:
        return ""
    return (f"target set {name!r} has no example of label(s) {missing[:_SHOWN]}{' ...' if len(missing) > _SHOWN else ''} "
            "of the pool: their examples score as harmful to it and a drop curation removes them first; add a few "
            "examples of every label the curated set should keep")


def _check_adapter(folder: Path, lora: Any) -> None:
    """ConfigError unless the saved peft adapter in `folder` is the configured LoRA shape and its weights load."""
    try:
        saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"adapter.path: {folder / 'adapter_config.json'} is not a readable JSON file ({err})") from err
    differs = [f"{key} {saved.get(name)!r} where the config has {mine!r}"
               for key, name, mine in (("rank", "r", lora.rank), ("alpha", "lora_alpha", lora.alpha))
               if saved.get(name) != mine]
    if lora.modules is not None and sorted(saved.get("target_modules") or []) != sorted(lora.modules):
        differs.append(f"modules {sorted(saved.get('target_modules') or [])} where the config has {sorted(lora.modules)}")
    if differs:
        raise ConfigError(f"adapter.path: the adapter in {folder} has {'; '.join(differs)}: set lora to match it "
                          "(or remove adapter.path to train one)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            return  # an older peft's pickle: torch reads it when the adapter loads
        raise ConfigError(f"adapter.path: {weights} is missing (peft saves the weights there)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as tensors:
            tensors.keys()
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"adapter.path: {weights} is not a readable safetensors file ({err})") from err
