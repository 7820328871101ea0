"""What the last successful refresh was made from, so that an identical `hyperinf run` writes nothing.

A refresh (target sets, preconditioners, queries, scores, signals, evaluation, the export, the mislabel report)
reads the Lance tables, the config, the target and test files, and the code. After a refresh that succeeded with
every asset check passing, `<storage_root>/.hyperinf.refresh.json` records all of them: the config's digest, the
files' digests, the code's digest, every table's Lance version *after* the refresh and the refresh's run id. The
next run compares what it would refresh from with that record: equal (and the run known to its Dagster instance)
means the refresh would reproduce the same rows, so it is not launched (no Lance version, export, DuckDB sync or Dagster run is written); anything that differs (a new shard,
an edited target file, another config value, a table someone moved, an upgrade) refreshes as before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hyperinf_ops.adapters import recipe_key
from hyperinf_ops.data.io import file_digest
from hyperinf_ops.location import Location
from hyperinf_ops.store import LanceStore

__all__ = ["REFRESH_RECORD", "code_digest", "current_refresh", "refresh_inputs", "save_refresh_record"]

REFRESH_RECORD = ".hyperinf.refresh.json"
_CODE_PACKAGES = ("hyperinf_ops", "assets_defs", "pipelines")


def code_digest() -> str:
    """sha256 over the product's Python and SQL sources (an upgrade or an edit refreshes again)."""
    import importlib

    h = hashlib.sha256()
    for name in _CODE_PACKAGES:
        root = Path(importlib.import_module(name).__file__).parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".sql", ".yaml")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def refresh_inputs(cfg: Any, store: LanceStore) -> dict[str, Any]:
    """Everything a refresh reads, as digests and Lance versions (see the module docstring)."""
    files = [t.path for t in cfg.targets.values() if t.path is not None]
    if cfg.evaluation is not None:
        files.append(cfg.evaluation.test.path)
    return {
        "config": recipe_key(cfg.to_dict()),
        "files": {str(p): file_digest(p) for p in files},
        "code": code_digest(),
        "versions": dict(sorted(store.versions().items())),
    }


def current_refresh(cfg: Any, store: LanceStore) -> str | None:
    """The run id of the recorded refresh when it was made from exactly what a refresh would read now, else
    None. (The caller checks that its Dagster instance holds that run: a new instance refreshes again, so its UI
    shows the assets' materializations.)"""
    record = Location(cfg.storage_root) / REFRESH_RECORD
    if not record.is_file():
        return None
    try:
        saved = json.loads(record.read_text())
    except ValueError:
        return None
    run_id = saved.pop("run_id", None)
    return run_id if saved == refresh_inputs(cfg, store) else None


def save_refresh_record(cfg: Any, store: LanceStore, run_id: str) -> None:
    """Record what the refresh run `run_id`, which just succeeded, was made from (its tables at their new
    versions)."""
    record = {**refresh_inputs(cfg, store), "run_id": run_id}
    (Location(cfg.storage_root) / REFRESH_RECORD).write_text(json.dumps(record, indent=1))
