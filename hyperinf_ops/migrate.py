"""Moving a store to a new row layout: `hyperinf migrate --config FILE [--yes]`.

Gradient rows are fixed-width Lance columns, so settings that change a row's width or value type (`model`,
`lora.modules`, `lora.rank`, `lora.gradient_modules`, `compression.sketch_dim` / `dtype`) cannot write into the
stored tables. `row_layout_problem`
finds that before any work (preflight) and says what to do; `migrate` does it: the tables derived from gradient
rows (ARCHIVED) and the DuckDB copy are renamed into `<root>/archive/<UTC time>/`, nothing is deleted, and
moving them back restores the store. `examples`, `targets`, `evaluation`, the adapters (kept by hash) and the
exports stay, so the next `hyperinf run` ingests nothing and recomputes only the derived tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hyperinf_ops.adapters import AdapterStore
from hyperinf_ops.core.row_format import RowFormat
from hyperinf_ops.core.sketch import row_format
from hyperinf_ops.core.stacks import select_matrices
from hyperinf_ops.errors import ConfigError, HyperinfError
from hyperinf_ops.location import is_object_store
from hyperinf_ops.query import DUCKDB_FILE
from hyperinf_ops.store import LanceStore
from hyperinf_ops.store.schemas import gradients_schema
from hyperinf_ops.topk import BASIS_TABLE, INDEX_TABLE

__all__ = ["ARCHIVED", "MigrateSummary", "migrate", "row_layout_problem"]

# Every table whose rows are, or are computed from, gradient rows of one layout (and the outputs of their pass).
ARCHIVED = ("gradients", "example_outputs", "curvature", "preconditioners", "target_gradients", "queries", "scores",
            "label_suggestions", INDEX_TABLE, BASIS_TABLE)


@dataclass(frozen=True)
class MigrateSummary:
    archive: Path  # where the tables went (created only when something moved and not dry_run)
    moved: list[str]  # table names (and the DuckDB file) moved, or that would move


def _expected_format(store: LanceStore, cfg: Any) -> RowFormat | None:
    """The row format the config's settings give: from the current adapter's matrices with `lora.rank` when the
    config keeps its model and LoRA modules, else from the model's config.json alone (`_configured_shapes`);
    None when it cannot be known without loading a model (no adapter yet, or modules config.json cannot place)."""
    manifest = AdapterStore(store.root).current()
    if manifest is None:
        return None
    if manifest.model == cfg.model and (cfg.lora.modules is None or set(cfg.lora.modules) == set(manifest.lora_modules)):
        shapes = {n: (cfg.lora.rank, d) for n, (_, d) in manifest.selected_shapes(cfg.lora.gradient_modules).items()}
    else:
        shapes = _configured_shapes(cfg)
    if not shapes:
        return None
    return row_format(shapes, cfg.compression)


def _configured_shapes(cfg: Any) -> dict[str, tuple[int, int]] | None:
    """name -> (r, d) of the LoRA gradient matrices the config asks for, read from the model's config.json without
    loading weights (`architecture.lora_shapes`: the attention query/value projections); None for a model or a
    `lora.modules` entry it cannot place."""
    from hyperinf_ops.architecture import lora_shapes, model_config

    try:
        every = lora_shapes(model_config(cfg.model), cfg.lora.rank, None)
        placed = {name.split(".")[-2] for name in every}  # the module of `...layer.3.attention.self.query.lora_A`
        if cfg.lora.modules is not None and not set(cfg.lora.modules) <= placed:
            return None
        adapted = [n for n in every if n.split(".")[-2] in (cfg.lora.modules or placed)]
        # the rule that picks the gradient matrices from a live model and from a manifest (stacks.select_matrices)
        return {n: every[n] for n in select_matrices(adapted, cfg.lora.gradient_modules)}
    except (HyperinfError, OSError, KeyError, TypeError, ValueError):  # GradientMismatchError: selects nothing
        return None


def row_layout_problem(store: LanceStore, cfg: Any) -> str | None:
    """Why the stored gradient rows cannot take rows made with the config `cfg` (another width or value type), as
    one line saying what to do next; None when they can, or when there are no rows (or no adapter) to compare."""
    if not store.exists("gradients"):
        return None
    stored = store.open("gradients")
    first = stored.to_table(columns=["fingerprint"], limit=1)["fingerprint"].to_pylist()
    want = _expected_format(store, cfg)
    if not first or want is None:
        return None
    have = [(f.name, f.type) for f in stored.schema]
    if have == [(f.name, f.type) for f in gradients_schema(want)]:
        return None
    fp = store.fingerprints("gradients").get(first[0])
    made = (f"adapter {fp.adapter_hash[:16]} (rank {fp.rank}, {fp.row_format.values} {fp.row_dtype} values per row)"
            if fp else "another layout")
    return (f"storage root {store.root} holds gradient rows of {made}; model {cfg.model}, lora.modules "
            f"{list(cfg.lora.modules) if cfg.lora.modules else 'default'}, lora.rank {cfg.lora.rank} with compression "
            f"{cfg.compression.dtype} / sketch_dim {cfg.compression.sketch_dim} / row_rank {want.rank} needs rows of {want.values} "
            f"{want.dtype} values: run `hyperinf migrate --config FILE --yes` to move the derived tables to "
            f"{store.root}/archive/ (a rename: nothing is deleted, moving them back restores them) and start over "
            "on this root, or set another storage_root")


def migrate(storage_root: str | os.PathLike[str], *, dry_run: bool = False) -> MigrateSummary:
    """Rename the ARCHIVED tables present and the DuckDB copy into `<root>/archive/<UTC time>/` (the same
    layout below it); `dry_run`: only say what would move. Local roots only: on S3 a rename is a copy of every
    object, so point storage_root at another prefix instead."""
    if is_object_store(str(storage_root)):
        raise ConfigError(f"hyperinf migrate works on local storage roots; for {storage_root} set storage_root to "
                          "another prefix (the old one stays as it is)")
    root = Path(storage_root)
    archive = root / "archive" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    sources = [root / "lance" / f"{t}.lance" for t in ARCHIVED] + [root / DUCKDB_FILE]
    present = [p for p in sources if p.exists()]
    moved = [p.name.removesuffix(".lance") for p in present]
    if dry_run or not present:
        return MigrateSummary(archive=archive, moved=moved)
    (archive / "lance").mkdir(parents=True)  # fails if a migration of this second exists: never mix two
    for path in present:
        # Same file system (both under root): an atomic rename per table, so a table is either here or there.
        path.rename(archive / path.relative_to(root))
    return MigrateSummary(archive=archive, moved=moved)
