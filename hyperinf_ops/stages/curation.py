"""Stage: the curated subset, a `sql/` query over the scores exported as Parquet + JSONL + manifest.json."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperinf_ops.export import export_subset
from hyperinf_ops.query import sync_duckdb
from hyperinf_ops.stages.common import Log, Summary, require_table
from hyperinf_ops.store import LanceStore

__all__ = ["CurateSummary", "curate", "export_dir"]


@dataclass
class CurateSummary(Summary):
    query: str
    params: dict[str, Any]
    rows: int
    out_dir: str
    files: dict[str, str]
    table_versions: dict[str, int]
    seconds: float


def export_dir(storage_root: str | Path, query: str) -> Path:
    """Where the export of a curation query goes: `<storage_root>/exports/<query>/`."""
    return Path(storage_root) / "exports" / query


def curate(store: LanceStore, query: str, params: Mapping[str, Any], *, log: Log = print) -> CurateSummary:
    """Run `sql/<query>.sql` with `params`, export the subset to `export_dir` (replaced whole, atomically) and
    refresh the DuckDB file."""
    start = time.perf_counter()
    require_table(store, "scores", "materialize influence_scores first")
    out_dir = export_dir(store.root, query)
    manifest = export_subset(store, query, params, out_dir, overwrite=True)
    sync_duckdb(store)
    summary = CurateSummary(query=query, params=dict(params), rows=manifest.row_count, out_dir=str(out_dir),
                            files={k: str(out_dir / v) for k, v in manifest.files.items()},
                            table_versions=manifest.table_versions, seconds=time.perf_counter() - start)
    log(f"curated subset {query}{summary.params}: {summary.rows} examples -> {out_dir}")
    return summary
