"""Curated subset -> `subset.parquet` + `subset.jsonl` + `manifest.json`, reproducible by time travel.

The export pins every Lance table to its current version first, runs the selection query and
`export_subset.sql` against those versions, and records them in the manifest: `reproduce(manifest)`
reruns the recorded SQL text against the recorded versions and returns the same rows, whatever was
written since. Files are written into a temporary sibling directory that is renamed into place at the
end, so a crash never leaves a half export (an S3 export is uploaded with manifest.json last). With
`keep_previous`, the export being replaced is copied to `<query>.history/<UTC time>/` first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from hyperinf_ops.errors import DataError
from hyperinf_ops.location import Location
from hyperinf_ops.query import connect, load_sql, run_sql, sql_params
from hyperinf_ops.sql_files import EXPORT_QUERY
from hyperinf_ops.store import json_safe, sql_literal
from hyperinf_ops.store.schemas import input_columns, stored_texts

if TYPE_CHECKING:  # the store's writers need torch; the config's check of query names imports this module
    from hyperinf_ops.store import LanceStore

__all__ = ["RELABEL_COLUMN", "Manifest", "export_subset", "history_dir", "reproduce", "update_manifest"]

# The selection column of a new label (relabel.sql); export_subset.sql writes it into `label`.
RELABEL_COLUMN = "new_label"


@dataclass
class Manifest:
    """Everything needed to know (and redo) what an export holds."""

    query_name: str
    params: dict[str, Any]
    sql: str
    export_sql: str
    table_versions: dict[str, int]
    fingerprint: dict[str, Any] | None
    estimator: dict[str, Any]
    row_count: int
    created_at: str
    store_root: str
    files: dict[str, str] = field(
        default_factory=lambda: {"parquet": "subset.parquet", "jsonl": "subset.jsonl"}
    )
    # What later steps learned about the subset (label balance, flips removed, the evaluation's test numbers).
    report: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls(**json.loads(text))

    @classmethod
    def load(cls, path: str | Path | Location) -> Manifest:
        """From a manifest.json file or the export directory holding one (local or on S3)."""
        where = Location(path)
        return cls.from_json((where if where.is_file() else where / "manifest.json").read_text())


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _stored_estimator_info(
    store: LanceStore, params: Mapping[str, Any], version: int | None
) -> dict[str, Any]:
    """Diagnostics (damping, iterations, residual per matrix) of the stored queries the selection used."""
    if version is None:
        return {"method": params.get("method")}
    filters = [f"method = {sql_literal(params['method'])}"] if "method" in params else []
    sets = [params[k] for k in ("target_set", "set_a", "set_b") if k in params]
    if sets:
        filters.append("target_set IN (" + ", ".join(sql_literal(s) for s in sets) + ")")
    rows = store.open("queries", version).to_table(
        columns=["target_set", "method", "diagnostics"], filter=" AND ".join(filters) or None
    )
    return {
        "method": params.get("method"),
        "queries": {
            f"{r['target_set']}/{r['method']}": json.loads(r["diagnostics"]) for r in rows.to_pylist()
        },
    }


def _input_columns(store: LanceStore, versions: Mapping[str, int]) -> dict[str, dict[str, str]]:
    return input_columns(store.open("examples", versions["examples"]).schema) if "examples" in versions else {}


def _write_jsonl(table: pa.Table, path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for batch in table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                fh.write(json.dumps(json_safe(row), ensure_ascii=False, default=_json_default) + "\n")


def _with_input_types(subset: pa.Table, columns: Mapping[str, Mapping[str, str]]) -> pa.Table:
    """The export in the input's own columns: `label` and `original_label` in the type the input's label column
    had (labels are stored as text: a pool of integer labels exports integers, not "1"), and every column the
    pipeline read (id, texts, label) also under the input's name beside hyperinf's (`sample_id`, `text` or
    `prompt` / `response`, `label`: the label the subset trains with, relabelled ones included), so a training
    script written for the input reads the export unchanged. `columns`: `schemas.input_columns` of the pinned
    `examples`. A column whose values do not all come back as the same text in that type (a store written before
    the types were kept, shards of two types) stays text."""
    label = columns.get("label")
    for name in ("label", "original_label"):
        if label and name in subset.column_names:
            typed = _as_input_type(subset[name], label["type"])
            if typed is not None:
                subset = subset.set_column(subset.column_names.index(name), name, typed)
    for role, given in columns.items():
        if role not in subset.column_names or given["name"] in subset.column_names:
            continue
        values = subset[role]
        typed = _as_input_type(values, given["type"]) if role == "sample_id" else None
        subset = subset.add_column(subset.column_names.index(role) + 1, given["name"],
                                   values if typed is None else typed)
    return subset


def _as_input_type(texts: pa.ChunkedArray, type_name: str) -> pa.ChunkedArray | None:
    """`texts` cast to the Arrow type named `type_name` when each value's text (`stored_texts`) is unchanged by it;
    None when the type is text already or the cast would change a value."""
    try:
        target = pa.type_for_alias(type_name)
    except ValueError:  # a type without an alias (timestamps, dictionaries): keep the text
        return None
    if pa.types.is_string(target) or pa.types.is_large_string(target) or pa.types.is_null(target):
        return None
    try:
        typed = texts.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return typed if stored_texts(typed).equals(texts.combine_chunks().cast(pa.string())) else None


def _select(con: Any, sql: str, export_sql: str, params: Mapping[str, Any], name: str,
            columns: Mapping[str, Mapping[str, str]]) -> pa.Table:
    selection = run_sql(con, sql, params, name=name)
    if RELABEL_COLUMN not in selection.column_names:  # a selection that keeps every given label
        label = con.sql("SELECT label FROM examples LIMIT 0").to_arrow_table().schema.field("label").type
        selection = selection.append_column(RELABEL_COLUMN, pa.nulls(selection.num_rows, label))
    con.register("selection", selection)
    try:
        export_params = {k: params[k] for k in sql_params(export_sql) if k in params}
        return _with_input_types(run_sql(con, export_sql, export_params, name=EXPORT_QUERY), columns)
    finally:
        con.unregister("selection")


def export_subset(
    store: LanceStore,
    query_name: str,
    params: Mapping[str, Any],
    out_dir: str | Path | Location,
    *,
    estimator_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    keep_previous: int = 0,
    sql_dir: Path | None = None,
) -> Manifest:
    """Run `sql/<query_name>.sql` (a selection: sample_id, target_set, method, score, rank, ...) with
    `params`, join it with `examples` (sql/export_subset.sql) and write out_dir/{subset.parquet,
    subset.jsonl, manifest.json} atomically.

    estimator_info: estimator + parameters to record (damping, iterations, residual, ...); None records
    the diagnostics stored with the queries of the selected target set(s) and method.
    out_dir (a local folder or an s3:// URI) must not exist unless overwrite=True. Locally the old export is
    replaced only once the new one is whole; on S3 file by file, manifest.json last (Location.staged_folder).
    keep_previous: the export being replaced is first copied to `history_dir(out_dir)` and the newest
    `keep_previous` such copies are kept (0: none), so a bad new export never destroys the last good one.
    """
    out = Location(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"export directory {out} exists (pass overwrite=True to replace it)")
    sql, export_sql = load_sql(query_name, sql_dir), load_sql(EXPORT_QUERY, sql_dir)
    versions = store.versions()
    con = connect(store, versions=versions)
    try:
        subset = _select(con, sql, export_sql, params, query_name, _input_columns(store, versions))
    finally:
        con.close()
    if subset.num_rows == 0:  # an empty subset never replaces an export (it is no fine-tuning set)
        raise DataError(f"{query_name} {dict(params)} selects no rows: nothing exported"
                        + (f", the previous export in {out} is kept" if out.exists() else ""))
    fingerprint = store.fingerprint("gradients", versions["gradients"]) if "gradients" in versions else None
    manifest = Manifest(
        query_name=query_name,
        params=dict(params),
        sql=sql,
        export_sql=export_sql,
        table_versions=versions,
        fingerprint=None if fingerprint is None else json.loads(fingerprint.to_json()),
        estimator=json_safe(
            dict(estimator_info)
            if estimator_info is not None
            else _stored_estimator_info(store, params, versions.get("queries"))
        ),
        row_count=subset.num_rows,
        created_at=datetime.now(UTC).isoformat(),
        store_root=store.root,
    )
    if keep_previous and (out / "manifest.json").is_file():
        _archive_export(out)
    with out.staged_folder(last="manifest.json", replace=True) as tmp:
        pq.write_table(subset, tmp / manifest.files["parquet"])
        _write_jsonl(subset, tmp / manifest.files["jsonl"])
        (tmp / "manifest.json").write_text(manifest.to_json())
    if keep_previous:
        for old in history_dir(out).folders()[:-keep_previous]:  # oldest first: the names are timestamps
            old.remove_tree()
    return manifest


def history_dir(out_dir: str | Path | Location) -> Location:
    """Where replaced exports of `out_dir` are kept: the sibling `<name>.history/`, one folder per export named
    by its UTC creation time (so sorting the names sorts them by age)."""
    return Location(f"{Location(out_dir).uri}.history")


def _archive_export(out: Location) -> Location:
    """Copy the export in `out` (its files and manifest.json, the manifest last) to a new folder of
    `history_dir(out)`; a copy already there (same creation time) is kept as it is."""
    old = Manifest.load(out)
    stamp = datetime.fromisoformat(old.created_at).astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = history_dir(out) / stamp
    if not (target / "manifest.json").is_file():
        with target.staged_folder(last="manifest.json", replace=True) as tmp:
            for name in [*old.files.values(), "manifest.json"]:
                (tmp / name).write_bytes((out / name).read_bytes())
    return target


def update_manifest(out_dir: str | Path | Location, **sections: Any) -> Manifest:
    """Set `sections` in the export's manifest `report` (replacing those keys) and rewrite manifest.json
    atomically (Location.write_text: a local rename, one PUT on S3)."""
    path = Location(out_dir) / "manifest.json"
    manifest = Manifest.load(path)
    manifest.report = {**manifest.report, **json_safe(sections)}
    path.write_text(manifest.to_json())
    return manifest


def reproduce(manifest: Manifest | str | Path, *, store: LanceStore | None = None) -> pa.Table:
    """Rerun a manifest's recorded SQL against its recorded Lance versions: the same rows as its export.

    store: where the tables live now (default: the manifest's store_root). The recorded versions must still
    exist: the retention rule (retention.py) keeps every version a manifest under `<root>/exports/` names; a
    manifest kept elsewhere needs its versions tagged by hand.
    """
    from hyperinf_ops.store import LanceStore

    m = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    store = store or LanceStore(m.store_root)
    con = connect(store, versions=m.table_versions)
    try:
        return _select(con, m.sql, m.export_sql, m.params, m.query_name, _input_columns(store, m.table_versions))
    finally:
        con.close()
