"""Stage: the curated subset, a `sql/` query over the scores exported as Parquet + JSONL + manifest.json, and
what it did to the pool: each label's share kept (a target set skewed to one label can strip another; the
`balance` parameter of `top_fraction` keeps every label's share), how many labels it replaced (relabel.sql), and,
for pools with a boolean `flipped` column, how many planted flips it removed against the
n_flipped * (1 - n_subset / n_pool) a random subset of the same size removes on average, how many it corrected
(relabelled to the truth: the `true_label` column, or for two classes the other label) and how many correct
labels it changed."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from hyperinf_ops.config.sections import RetentionSection
from hyperinf_ops.data.noise import true_labels
from hyperinf_ops.errors import WarmupFailedError
from hyperinf_ops.export import export_subset, update_manifest
from hyperinf_ops.location import Location
from hyperinf_ops.query import refresh_duckdb
from hyperinf_ops.retention import apply_retention
from hyperinf_ops.stages.common import Log, Summary, require_table
from hyperinf_ops.stages.scores import display_columns
from hyperinf_ops.store import LanceStore
from hyperinf_ops.store.schemas import stored_texts

__all__ = ["CurateSummary", "curate", "export_dir", "refuse_unlearned_warmup", "subset_preview"]

PREVIEW_ROWS = 10


@dataclass
class CurateSummary(Summary):
    query: str
    params: dict[str, Any]
    rows: int
    out_dir: str
    files: dict[str, str]
    table_versions: dict[str, int]
    labels: list[dict[str, Any]]  # label, pool, subset, kept (share of the label's pool examples kept)
    relabelled: int  # examples whose label the export replaced
    # pool, kept, removed, removed_at_random (expected), vs_random (ratio); with relabelling also corrected, changed
    # to another wrong label (multi-class), broken (a correct label replaced), still_wrong
    flipped: dict[str, Any] | None
    seconds: float
    versions_removed: int = 0  # old Lance versions the retention rule removed after the export (retention.py)
    bytes_removed: int = 0


def export_dir(storage_root: str | Path, name: str) -> Location:
    """Where an export goes: `<storage_root>/exports/<name>/` (local or on S3); `name` is the curation query, or
    `auto` for the evaluation's choice."""
    return Location(storage_root) / "exports" / name


def refuse_unlearned_warmup(storage_root: str | Path) -> None:
    """WarmupFailedError when the current adapter's warm-up did not learn (`stages.adapter.warmup_problem`): its
    rankings rank noise (or worse, a diverged model's), so no export may replace the current one. A given adapter
    has no warm-up to judge."""
    from hyperinf_ops.adapters import AdapterStore
    from hyperinf_ops.stages.adapter import warmup_problem

    current = AdapterStore(storage_root).current()
    problem = warmup_problem(current.train if current else None)
    if problem:
        raise WarmupFailedError(f"no curated subset exported (the previous export, if any, stays current): "
                                f"{problem}; or set curation.require_warmup: false to export anyway")


def curate(store: LanceStore, query: str, params: Mapping[str, Any], *, name: str | None = None,
           retention: RetentionSection | None = None, log: Log = print) -> CurateSummary:
    """Run `sql/<query>.sql` with `params`, export the subset to `export_dir(root, name or query)` (replaced
    whole, atomically) and refresh the DuckDB file. `retention` (the config's): the replaced export is kept under
    `exports/<name>.history/` and, once the new one is in place, old Lance versions are removed by its rule
    (retention.py); None: neither."""
    start = time.perf_counter()
    require_table(store, "scores", "materialize influence_scores first")
    out_dir = export_dir(store.root, name or query)
    log(f"curation {query}{dict(params)}: selecting over {store.open('scores').count_rows()} score rows, "
        f"exporting to {out_dir} ...")
    manifest = export_subset(store, query, params, out_dir, overwrite=True,
                             keep_previous=retention.keep_exports if retention else 0)
    examples = store.open("examples")
    columns = [c for c in ("label", "flipped", "true_label") if c in examples.schema.names]
    pool = examples.to_table(columns=columns)
    subset = _labels_as_stored((out_dir / manifest.files["parquet"]).read_parquet([*columns, "original_label",
                                                                                     "relabelled"]))
    labels, flipped = subset_report(pool, subset)
    relabelled = _true_count(subset["relabelled"])
    update_manifest(out_dir, labels=labels, flipped=flipped, relabelled=relabelled)
    # After the export, so the new manifest (and the kept ones) protect the versions they name; before the sync,
    # whose copy stays current only while no table's `_versions` folder changes (query.open_snapshot).
    cleaned = apply_retention(store, retention.keep_hours, log=log) if retention else None
    refresh_duckdb(store, log)
    summary = CurateSummary(query=query, params=dict(params), rows=manifest.row_count, out_dir=str(out_dir),
                            files={k: str(out_dir / v) for k, v in manifest.files.items()},
                            table_versions=manifest.table_versions, labels=labels, relabelled=relabelled,
                            flipped=flipped,
                            seconds=time.perf_counter() - start,
                            versions_removed=cleaned.versions_removed if cleaned else 0,
                            bytes_removed=cleaned.bytes_removed if cleaned else 0)
    log(f"curated subset {query}{summary.params}: {summary.rows} examples -> {out_dir} in {summary.seconds:.1f}s; "
        "kept per label: "
        + ", ".join(f"{r['label']} {r['subset']}/{r['pool']}" for r in labels)
        + (f"; {relabelled} labels replaced" if relabelled else "")
        + (f"; removed {flipped['removed']} of {flipped['pool']} flipped labels (random: "
           f"{flipped['removed_at_random']:.1f})" if flipped else "")
        + (f", corrected {flipped['corrected']}, broke {flipped['broken']} correct labels"
           if flipped and relabelled else ""))
    return summary


def subset_preview(store: LanceStore, parquet: str | Path, task: str, k: int = PREVIEW_ROWS) -> list[dict[str, Any]]:
    """The exported subset's first k rows (`parquet`: a local path or an s3:// URI) shown like the scores'
    extremes: rank, score (of the exported method) and the examples' `display_columns`."""
    columns = display_columns(store.open("examples").schema.names, task)
    table = Location(parquet).read_parquet(["influence_rank", "influence_score", *columns])
    rows = table.slice(0, k).to_pylist()
    return [{"rank": r.pop("influence_rank"), "score": r.pop("influence_score"), **r} for r in rows]


def _labels_as_stored(subset: pa.Table) -> pa.Table:
    """The export's labels (in the input's type) as the text `examples` stores them, to count against the pool."""
    for name in ("label", "original_label"):
        if name in subset.column_names and not pa.types.is_string(subset.schema.field(name).type):
            subset = subset.set_column(subset.column_names.index(name), name, stored_texts(subset[name]))
    return subset


def subset_report(pool: pa.Table, subset: pa.Table) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Per label: pool and subset counts (the subset's labels as exported) and the share kept; the planted flips
    removed against random, and those relabelled (both tables with the optional `label`, `flipped` and
    `true_label` columns; the subset also with `original_label` and `relabelled`)."""
    labels = []
    if "label" in pool.column_names:
        pool_counts = pool.group_by("label").aggregate([("label", "count")]).to_pylist()
        subset_counts = {r["label"]: r["label_count"]
                         for r in subset.group_by("label").aggregate([("label", "count")]).to_pylist()}
        for row in sorted(pool_counts, key=lambda r: str(r["label"])):
            if row["label"] is None:
                continue  # tasks without labels
            kept = subset_counts.get(row["label"], 0)
            labels.append({"label": str(row["label"]), "pool": row["label_count"], "subset": kept,
                           "kept": round(kept / row["label_count"], 4)})
    if "flipped" not in pool.column_names or not pa.types.is_boolean(pool.schema.field("flipped").type):
        return labels, None
    n_flipped, kept_flipped = _true_count(pool["flipped"]), _true_count(subset["flipped"])
    at_random = n_flipped * (1 - subset.num_rows / max(pool.num_rows, 1))
    report = {"pool": n_flipped, "kept": kept_flipped, "removed": n_flipped - kept_flipped,
              "removed_at_random": round(at_random, 2),
              "vs_random": round((n_flipped - kept_flipped) / at_random, 3) if at_random else None}
    if "relabelled" in subset.column_names and _true_count(subset["relabelled"]):
        report.update(_relabel_report(pool, subset))
    return labels, report


def _relabel_report(pool: pa.Table, subset: pa.Table) -> dict[str, int | None]:
    """What the relabelling did to the planted flips: corrected (the new label is the truth), changed to another
    wrong label, broken (a correct label replaced), and the subset's labels still wrong. The truth: noise.true_labels
    (`true_label`, or for two classes the other label of a flipped example); without it, only the relabelled flips
    are counted."""
    rows = subset.to_pydict()
    classes = sorted({str(v) for v in pool["label"].to_pylist() if v is not None})
    truth = true_labels(rows["original_label"], rows["flipped"], rows.get("true_label"), classes)
    changed = [i for i, r in enumerate(rows["relabelled"]) if r]
    flips = sum(bool(rows["flipped"][i]) for i in changed)
    if truth is None:
        return {"relabelled_flips": flips, "corrected": None, "broken": None, "still_wrong": None}
    right = [str(label) == t for label, t in zip(rows["label"], truth, strict=True)]
    return {"relabelled_flips": flips, "corrected": sum(bool(rows["flipped"][i]) and right[i] for i in changed),
            "changed_to_another_wrong_label": sum(bool(rows["flipped"][i]) and not right[i] for i in changed),
            "broken": sum(not rows["flipped"][i] for i in changed), "still_wrong": right.count(False)}


def _true_count(column: pa.ChunkedArray) -> int:
    return sum(v is True for v in column.to_pylist())
