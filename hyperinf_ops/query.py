"""DuckDB over the Lance tables: a synced database file for the shell, live views for fresh reads, and
the parameterised curation queries of `sql/`.

DuckDB cannot read Lance without its `lance` extension, which is not installable offline, so:
  - `sync_duckdb` copies the non-vector tables into `<root>/hyperinf.duckdb` in one transaction, with a
    `_lance_versions` table saying which Lance version each copy came from (`duckdb <root>/hyperinf.duckdb`
    then works from a shell);
  - `connect(live=True)` registers the Lance datasets themselves (DuckDB's replacement scan over a
    pyarrow Dataset: projection pushdown keeps vectors unread unless selected), optionally pinned to
    given versions for time travel.
User values only ever reach SQL as DuckDB named parameters (`$name`), never through string building.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from hyperinf_ops.errors import ConfigError
from hyperinf_ops.store import TABLES, LanceStore

__all__ = [
    "DUCKDB_FILE",
    "SQL_DIR",
    "QueryInfo",
    "connect",
    "list_queries",
    "load_sql",
    "run_query",
    "run_sql",
    "sql_params",
    "sync_duckdb",
]

DUCKDB_FILE = "hyperinf.duckdb"
# sql/ ships inside the package as `hyperinf_ops.sql` (pyproject's package-dir): the same lookup finds the
# installed copy and, in an editable install, the repository's sql/ folder.
SQL_DIR = Path(str(importlib.resources.files("hyperinf_ops.sql")))
# Columns copied by sync_duckdb (None = all): the vectors and d x d sums stay in Lance.
_SYNC_COLUMNS: dict[str, list[str] | None] = {
    "examples": None,
    "targets": None,
    "scores": None,
    "evaluation": None,
    "queries": ["target_set", "method", "fingerprint", "diagnostics"],
    "curvature": ["shard", "matrix", "sq_sum", "count", "numel", "d", "examples_digest", "fingerprint"],
    "preconditioners": ["key", "method", "matrix", "r", "d", "damping", "diagnostics", "options", "fingerprint"],
    "target_gradients": ["target_set", "count", "content_digest", "fingerprint"],
    "gradients": ["sample_id", "shard", "grad_scale", "fingerprint"],
}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class QueryInfo:
    """A query file of sql/: its name, header comment, and the named parameters it takes."""

    name: str
    description: str
    params: tuple[str, ...]
    path: Path


def _strip_comments_and_strings(sql: str) -> str:
    sql = re.sub(r"'(?:[^']|'')*'", "''", sql)
    sql = re.sub(r"--[^\n]*", "", sql)
    return re.sub(r"/\*.*?\*/", "", sql, flags=re.S)


def sql_params(sql: str) -> tuple[str, ...]:
    """Named parameters (`$name`) used by `sql`, outside comments and string literals, sorted."""
    return tuple(sorted(set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", _strip_comments_and_strings(sql)))))


def load_sql(name: str, sql_dir: Path | None = None) -> str:
    """Text of `sql/<name>.sql` (names are identifiers: no paths)."""
    if not _NAME.match(name):
        raise ConfigError(f"query name {name!r} must be an identifier (a file of sql/ without .sql)")
    path = (sql_dir or SQL_DIR) / f"{name}.sql"
    if not path.is_file():
        known = ", ".join(sorted(list_queries(sql_dir))) or "none"
        raise ConfigError(f"no query {name!r} in {path.parent} (known: {known})")
    return path.read_text()


def list_queries(sql_dir: Path | None = None) -> dict[str, QueryInfo]:
    """Every query of sql/: name -> QueryInfo (description = its leading `--` comment lines)."""
    out = {}
    for path in sorted((sql_dir or SQL_DIR).glob("*.sql")):
        text = path.read_text()
        header = []
        for line in text.splitlines():
            if not line.startswith("--"):
                break
            header.append(line[2:].strip())
        out[path.stem] = QueryInfo(path.stem, "\n".join(header), sql_params(text), path)
    return out


def run_sql(
    con: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any], *, name: str = "query"
) -> pa.Table:
    """Execute `sql` with DuckDB named parameters; every `$name` must be given, and nothing else."""
    wanted = set(sql_params(sql))
    missing, unknown = sorted(wanted - set(params)), sorted(set(params) - wanted)
    if missing or unknown:
        raise ConfigError(
            f"{name}: missing parameters {missing}, unknown parameters {unknown}; it takes {sorted(wanted)}"
        )
    # con.sql is lazy and fully materialised here, so no half-read result is left on the connection.
    try:
        rel = con.sql(sql, params=dict(params) if params else None)
        if rel is None:
            raise ConfigError(f"{name}: the SQL returned no rows (not a SELECT)")
        return rel.to_arrow_table()
    except duckdb.Error as err:  # e.g. a parameter of the wrong type: one line naming the query
        raise ConfigError(f"{name}: {str(err).splitlines()[0]} (parameters: {dict(params)})") from err


def run_query(
    con: duckdb.DuckDBPyConnection, name: str, params: Mapping[str, Any], *, sql_dir: Path | None = None
) -> pa.Table:
    """Run `sql/<name>.sql` with `params` (DuckDB named parameters, validated) -> Arrow table."""
    return run_sql(con, load_sql(name, sql_dir), params, name=name)


def connect(
    store: LanceStore,
    live: bool = True,
    *,
    versions: Mapping[str, int] | None = None,
    database: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection over the store's tables.

    live=True: in-memory DuckDB with each Lance table registered as a view (fresh reads; `versions` pins
    tables to Lance versions: time travel, and only those tables are registered), plus `_lance_versions`.
    `gradients` is exposed without its vectors (read at connect time).
    live=False: the synced database file (read-only), `database` or `<root>/hyperinf.duckdb`.
    """
    if not live:
        return duckdb.connect(database or f"{store.root}/{DUCKDB_FILE}", read_only=True)
    con = duckdb.connect()
    pinned = dict(versions) if versions is not None else store.versions()
    for table, version in pinned.items():
        if table not in TABLES:
            raise ConfigError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
        ds = store.open(table, version)
        if table == "gradients":
            # DuckDB has no float16 type and refuses the whole dataset: expose the non-vector columns.
            con.register(table, ds.to_table(columns=_SYNC_COLUMNS[table]))
        else:
            con.register(table, ds)
    con.register(
        "_lance_versions",
        pa.table({"table_name": list(pinned), "version": pa.array(list(pinned.values()), pa.int64())}),
    )
    return con


def sync_duckdb(store: LanceStore, database: str | None = None) -> dict[str, int]:
    """Copy the non-vector tables into the DuckDB file in one transaction; returns table -> Lance version.

    Readers of the file see either the previous sync or this one. `_lance_versions(table_name, version,
    uri, synced_at)` records where every copy came from.
    """
    versions = store.versions()
    synced_at = datetime.now(UTC)
    con = duckdb.connect(database or f"{store.root}/{DUCKDB_FILE}")
    try:
        con.execute("BEGIN TRANSACTION")
        for table, version in versions.items():
            ds = store.open(table, version)
            columns = _SYNC_COLUMNS[table] or ds.schema.names
            con.register("_hyperinf_src", ds.scanner(columns=columns, batch_size=65536).to_reader())
            # `table` comes from TABLES (fixed identifiers), never from user input.
            con.execute(f'CREATE OR REPLACE TABLE "{table}" AS SELECT * FROM _hyperinf_src')
            con.unregister("_hyperinf_src")
        con.execute(
            "CREATE OR REPLACE TABLE _lance_versions "
            "(table_name VARCHAR, version BIGINT, uri VARCHAR, synced_at TIMESTAMPTZ)"
        )
        con.executemany(
            "INSERT INTO _lance_versions VALUES (?, ?, ?, ?)",
            [[t, v, store.uri(t), synced_at] for t, v in versions.items()],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.close()
    return versions
