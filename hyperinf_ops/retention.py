"""Retention: the old Lance versions a refresh leaves behind are removed at its end, except the ones still needed.

Every write is a new Lance version, and a version keeps the fragment files it references, so without cleanup the
tables grow by every rewritten shard and score table, run after run. `apply_retention` runs Lance's
`cleanup_old_versions` on every table of a store and keeps:
  - the latest version (Lance never removes it);
  - every version an export manifest under `<root>/exports/` names in `table_versions` (the latest export of
    each query and the replaced ones kept under `exports/<query>.history/`), so `export.reproduce(manifest)`
    keeps working: each is protected by a Lance tag `export-v<version>` (cleanup skips tagged versions), and the
    tags of versions no manifest names any more are removed so those versions can go;
  - every version younger than `keep_hours` (the incremental gradient pass looks up an edited example's old
    text in older versions of `examples`; without it, that shard is recomputed whole, which is still exact).
Files left by a failed or in-flight write are not touched (`delete_unverified=False`): a concurrent writer's
fragments are safe, and Lance removes such files in a cleanup once they are a week old.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta

from hyperinf_ops.export import Manifest, history_dir
from hyperinf_ops.location import Location
from hyperinf_ops.stages.common import Log, Summary
from hyperinf_ops.store import LanceStore

__all__ = ["TAG_PREFIX", "RetentionSummary", "apply_retention", "manifest_versions"]

TAG_PREFIX = "export-v"  # + the version number: a version an export manifest names


@dataclass
class RetentionSummary(Summary):
    tables: int
    versions_removed: int
    bytes_removed: int
    protected: dict[str, list[int]]  # table -> versions kept because an export manifest names them
    missing: dict[str, list[int]]  # table -> versions a manifest names that were already gone (not reproducible)


def _export_manifests(root: str) -> list[Location]:
    """The manifest.json of every export under `<root>/exports/`, the kept replaced ones included."""
    exports = Location(root) / "exports"
    found = []
    for folder in exports.folders():
        found.append(folder / "manifest.json")
        found.extend(old / "manifest.json" for old in history_dir(folder).folders())
    return [m for m in found if m.is_file()]


def manifest_versions(root: str) -> dict[str, set[int]]:
    """table -> every Lance version an export manifest under `<root>/exports/` names."""
    out: dict[str, set[int]] = defaultdict(set)
    for path in _export_manifests(root):
        for table, version in Manifest.load(path).table_versions.items():
            out[table].add(int(version))
    return dict(out)


def _table_names(store: LanceStore) -> list[str]:
    """Every Lance table under `<root>/lance/` (the topk_* tables and any other one included)."""
    return [f.name.removesuffix(".lance") for f in (Location(store.root) / "lance").folders()
            if f.name.endswith(".lance")]


def _sync_tags(store: LanceStore, table: str, wanted: set[int]) -> tuple[list[int], list[int]]:
    """Tag every version of `wanted` that `table` still has and untag the ones no longer wanted; returns
    (protected, missing) versions."""
    ds = store.open(table)
    have = {v["version"] for v in ds.versions()}
    tags = {name: info["version"] for name, info in ds.tags.list().items() if name.startswith(TAG_PREFIX)}
    # ValueError: a concurrent retention pass deleted or created the same tag first ("Ref ... error"): fine.
    for name, version in tags.items():
        if version not in wanted:
            with suppress(ValueError):
                ds.tags.delete(name)
    protected = sorted(wanted & have)
    for version in protected:
        if f"{TAG_PREFIX}{version}" not in tags:
            with suppress(ValueError):
                ds.tags.create(f"{TAG_PREFIX}{version}", version)
    return protected, sorted(wanted - have)


def apply_retention(store: LanceStore, keep_hours: float, *, log: Log = print) -> RetentionSummary:
    """Remove the Lance versions of every table that the module docstring's rule does not keep."""
    wanted = manifest_versions(store.root)
    protected: dict[str, list[int]] = {}
    missing: dict[str, list[int]] = {}
    removed = freed = 0
    tables = _table_names(store)
    for table in tables:
        protected[table], gone = _sync_tags(store, table, wanted.get(table, set()))
        if gone:
            missing[table] = gone
            log(f"warning: export manifests name versions {gone} of table {table!r} that were already removed: "
                "those exports can no longer be reproduced")
        stats = store.open(table).cleanup_old_versions(older_than=timedelta(hours=keep_hours),
                                                       error_if_tagged_old_versions=False)
        removed, freed = removed + stats.old_versions, freed + stats.bytes_removed
    log(f"retention: removed {removed} old Lance versions ({freed / 1e6:.1f} MB) of {len(tables)} tables; kept the "
        f"latest, those younger than {keep_hours:g} h and {sum(map(len, protected.values()))} named by exports")
    return RetentionSummary(tables=len(tables), versions_removed=removed, bytes_removed=freed,
                            protected={t: v for t, v in protected.items() if v}, missing=missing)
