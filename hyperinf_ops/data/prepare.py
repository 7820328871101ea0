"""Pool examples and target sets: validation, stable sample ids, and the digests that say what changed.

A prepared table has `sample_id`, `content_hash`, the task's text columns (`text`, or `prompt` + `response`),
`label` (string), `shard`, and every other input column unchanged; its schema metadata names the input's column
of each role and the Arrow type of its id and label, so the export can give those their input types back
(`store.schemas.input_columns`). `sample_id` is the input's id column as a string when configured, else the
first 16 hex of `content_hash` (sha256 of the text columns and the label), so the same example keeps its id
across runs, files and row orders. Every unusable input raises
`DataError` naming the problem; nothing is written before that check.

Two digests tell later steps what changed:
    table_digest(table)      every column of every row: the shard's content (Dagster data version)
    content_digest(ids, ch)  the (sample_id, content_hash) pairs: what gradients depend on (text + label)
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from hyperinf_ops.errors import DataError
from hyperinf_ops.query import sandbox
from hyperinf_ops.store.schemas import INPUT_COLUMNS_KEY, value_text
from hyperinf_ops.tasks import get_task

__all__ = ["RESERVED_COLUMNS", "content_digest", "prepare_examples", "prepare_targets", "prepare_test",
           "record_columns", "records_digest", "table_digest"]

# Columns hyperinf adds to every prepared table, then to every export (sql/export_subset.sql); an input column of
# the same name would be shadowed, or written twice into the export after the whole run.
RESERVED_COLUMNS = ("sample_id", "content_hash", "text", "prompt", "response", "label", "shard", "original_label",
                    "relabelled", "selected_for", "influence_method", "influence_score", "influence_rank")
_SHOWN = 5  # offending ids / rows named in an error message


def record_columns(task: str) -> list[str]:
    """The columns a model batch is built from: sample_id, the task's text columns, label."""
    return ["sample_id", *get_task(task).text_columns, "label"]


def prepare_examples(df: pd.DataFrame, data: Any, task: str, shard: str, *, source: str | None = None,
                     require_id: bool = True) -> pa.Table:
    """Validated, id'd examples of one shard (or one target file); see the module docstring.

    `data` is the config's `DataSection` (column names, id column). Exact duplicates (same content hash, no
    id column) keep their first row: the number dropped is `len(df) - result.num_rows`. `source` names the
    input in error messages (default: the shard). `require_id=False` lets a file without the configured id
    column fall back to content hashes.
    """
    source = source or f"shard {shard!r}"
    if df.empty:
        raise DataError(f"{source} is empty: no rows")
    df = df.reset_index(drop=True)
    spec = get_task(task)
    roles = spec.column_roles(data)
    id_col = data.id_column
    if id_col is not None and id_col not in df.columns and not require_id:
        id_col = None
    _require_columns(df, [c for c in (*roles.values(), id_col) if c is not None], source)
    extras = [c for c in df.columns if c not in roles.values() and c != id_col]
    clash = [c for c in extras if c in RESERVED_COLUMNS]
    if clash:
        hint = " (or set data.label_column: label to use it as the label)" if clash == ["label"] else ""
        raise DataError(f"{source}: column(s) {clash} clash with columns hyperinf adds; rename them{hint}")

    out = pd.DataFrame(index=df.index)
    for role in spec.text_columns:
        out[role] = _texts(df[roles[role]], roles[role], source)
    out["label"] = _labels(df, roles["label"], source)
    hashed = zip(*(out[c] for c in (*spec.text_columns, "label")), strict=True)
    content = [hashlib.sha256(json.dumps(list(row), ensure_ascii=False).encode()).hexdigest() for row in hashed]
    sample_ids = _ids(df[id_col], id_col, source) if id_col is not None else \
        pd.Series([h[:16] for h in content], index=df.index)
    out.insert(0, "content_hash", content)
    out.insert(0, "sample_id", sample_ids)
    out["shard"] = shard
    out = pd.concat([out, df[extras]], axis=1)
    # Without an id column, equal content means equal id: the same example listed twice.
    out = out[~out["sample_id"].duplicated()]
    try:
        table = pa.Table.from_pandas(out, preserve_index=False)
    except (pa.ArrowException, ValueError) as err:
        raise DataError(f"{source}: a column cannot be stored ({err}); give it one type") from err
    given = {**roles, "sample_id": id_col}
    # texts are stored as text whatever they were: only the id's and the label's types are worth a conversion
    columns = {role: {"name": name, **({"type": _arrow_type(df[name])} if role in ("label", "sample_id") else {})}
               for role, name in given.items() if name}
    return table.replace_schema_metadata({INPUT_COLUMNS_KEY: json.dumps(columns, sort_keys=True)})


def prepare_targets(targets: Mapping[str, Any], data: Any, task: str,
                    pool: pd.DataFrame | pa.Table) -> dict[str, pa.Table]:
    """Each target set as a table of `target_set`, `sample_id`, `content_hash`, text columns, `label`.

    `targets` maps names to the config's `TargetSection`s; `pool` is the prepared pool (all shards). File
    targets are prepared like the pool (a missing id column falls back to content hashes: validation files
    often have none); `where:` targets select pool rows with a DuckDB predicate over the pool's columns, run in
    the user-SQL sandbox (`query.sandbox`: it cannot read files or load extensions).
    Raises DataError for an empty target set, a predicate DuckDB cannot bind, or labels the pool does not
    have (tasks with classes).
    """
    pool_df = pool.to_pandas() if isinstance(pool, pa.Table) else pool
    if pool_df.empty:
        raise DataError("empty pool: no examples to select targets from or to score")
    spec = get_task(task)
    keep = ["sample_id", "content_hash", *spec.text_columns, "label"]
    pool_labels = set(pool_df["label"].dropna())
    out = {}
    for name, target in targets.items():
        source = f"target set {name!r}"
        if target.path is not None:
            from hyperinf_ops.data.io import read_table

            df = read_table(target.path, data.verbatim_columns, data.integer_columns)
            table = prepare_examples(df, data, task, name,
                                     source=f"{source} ({target.path})", require_id=False)
            df = table.select(keep).to_pandas()
        else:
            df = _select_where(pool_df, target.where or "", source)[keep]
        if df.empty:
            raise DataError(f"{source} is empty: `where: {target.where}` selects no pool rows")
        if spec.has_classes:
            unknown = sorted(set(df["label"]) - pool_labels)
            if unknown:
                raise DataError(f"{source} has labels the pool does not have: {unknown[:_SHOWN]} "
                                f"(pool labels: {sorted(pool_labels)})")
        df.insert(0, "target_set", name)
        out[name] = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    return out


def prepare_test(path: str | Path, data: Any, task: str, labels: Collection[str]) -> pa.Table:
    """An evaluation test file prepared like the pool; DataError when it has no examples or labels the pool
    (`labels`) does not have."""
    from hyperinf_ops.data.io import read_table

    source = f"evaluation test file {path}"
    df = read_table(path, data.verbatim_columns, data.integer_columns)
    table = prepare_examples(df, data, task, "test", source=source, require_id=False)
    unknown = sorted(set(map(str, table["label"].to_pylist())) - set(labels)) if labels else []
    if unknown:
        raise DataError(f"{source} has labels the pool does not have: {unknown[:_SHOWN]} (pool labels: "
                        f"{sorted(labels)})")
    return table


def table_digest(table: pa.Table) -> str:
    """sha256 over every column of every row, in sample_id order: equal for equal content, whatever the
    row order or chunking (a re-read of stored rows gives the digest of the prepared table)."""
    rows = table.sort_by("sample_id").to_pylist()
    text = json.dumps([table.column_names, rows], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def content_digest(sample_ids: Iterable[str], content_hashes: Iterable[str]) -> str:
    """sha256 over the sorted (sample_id, content_hash) pairs: the examples a gradient pass depends on."""
    pairs = sorted(zip(map(str, sample_ids), map(str, content_hashes), strict=True))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def records_digest(records: Iterable[Mapping[str, Any]], task: str) -> str:
    """sha256 over the training records in their order (the `record_columns` of each): two trainings with the same
    recipe and seed on records of one digest are the same training."""
    h = hashlib.sha256()
    columns = record_columns(task)
    for record in records:
        h.update(json.dumps([record[c] for c in columns], default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _select_where(pool_df: pd.DataFrame, predicate: str, source: str) -> pd.DataFrame:
    """The pool rows `predicate` selects; it runs in the user-SQL sandbox (no files, no extensions), and the
    config check has parsed it as one boolean expression, so the text spliced here is the user's own."""
    con = sandbox({"examples": pool_df})
    try:
        ids = con.execute(f"SELECT sample_id FROM examples WHERE ({predicate})").fetchall()
    except duckdb.Error as err:
        raise DataError(f"{source}: `where: {predicate}` failed over the pool: {str(err).splitlines()[0]}; "
                        f"pool columns: {list(pool_df.columns)}") from err
    finally:
        con.close()
    chosen = {row[0] for row in ids}
    return pool_df[pool_df["sample_id"].isin(chosen)]


def _require_columns(df: pd.DataFrame, columns: list[str], source: str) -> None:
    have = [str(c) for c in df.columns]
    problems = []
    for col in columns:
        if col not in have:
            close = difflib.get_close_matches(col, have, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"column {col!r} not found{hint}")
    if problems:
        raise DataError(f"{source}: {'; '.join(problems)}; available columns: {have}")


def _texts(col: pd.Series, name: str, source: str) -> pd.Series:
    nested = col.map(lambda v: isinstance(v, list | tuple | dict | set | np.ndarray))
    if nested.any():  # str() would train on its repr, "['a', 'b']"
        rows = [int(i) for i in np.flatnonzero(nested.to_numpy())[:_SHOWN]]
        kind = type(col[nested].iloc[0]).__name__
        raise DataError(f"{source}: column {name!r} holds {kind} values, not texts (rows {rows}); give one text "
                        "per row (join the parts, or name another column)")
    bad = col.isna() | col.astype(str).str.strip().eq("")
    if bad.any():
        rows = [int(i) for i in np.flatnonzero(bad.to_numpy())[:_SHOWN]]
        raise DataError(f"{source}: {int(bad.sum())} empty or whitespace-only value(s) in column {name!r} "
                        f"(rows {rows})")
    return col.astype(str)


def _labels(df: pd.DataFrame, name: str | None, source: str) -> pd.Series:
    if name is None:
        return pd.Series([None] * len(df), index=df.index, dtype=object)
    col = df[name]
    if col.isna().any():
        rows = [int(i) for i in np.flatnonzero(col.isna().to_numpy())[:_SHOWN]]
        raise DataError(f"{source}: {int(col.isna().sum())} missing label(s) in column {name!r} (rows {rows})")
    return col.map(value_text)


def _ids(col: pd.Series, name: str, source: str) -> pd.Series:
    if col.isna().any():
        raise DataError(f"{source}: {int(col.isna().sum())} missing id(s) in id column {name!r}")
    ids = col.map(value_text)
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise DataError(f"{source}: duplicated id(s) in column {name!r}: {dup[:_SHOWN]}"
                        f"{' ...' if len(dup) > _SHOWN else ''} ({len(dup)} in all)")
    return ids


def _arrow_type(col: pd.Series) -> str:
    try:
        return str(pa.Array.from_pandas(col).type)
    except (pa.ArrowException, ValueError):  # mixed values: stored as text
        return "string"
