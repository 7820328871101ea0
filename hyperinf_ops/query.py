"""DuckDB over the Lance tables: live views for fresh reads, a synced database file for DuckDB's own
shell, the parameterised curation queries of `sql/`, and the sandbox every piece of user SQL runs in.

DuckDB cannot read Lance without its `lance` extension, which is not installable offline, so:
  - `connect(live=True)` registers the Lance datasets themselves (DuckDB's replacement scan over a
    pyarrow Dataset: projection pushdown keeps vectors unread unless selected), optionally pinned to
    given versions for time travel; `hyperinf sql` and `hyperinf shell` read these;
  - `sync_duckdb` copies the non-vector tables into `<root>/hyperinf.duckdb`, with a `_lance_versions`
    table saying which Lance version each copy came from, in a storage format every DuckDB 1.x CLI reads;
    `open_snapshot` opens it when it still holds every table's latest version (`hyperinf sql` reads it then:
    no Lance import, a third of the memory), else the caller reads live.

User SQL (`where:` target predicates, `hyperinf sql`, `hyperinf shell`, the curation queries) runs on a
`sandbox` connection: DuckDB's external access is off and its configuration locked, so SQL cannot read or
write files (read_csv, read_text, glob, COPY, EXPORT), ATTACH databases, INSTALL or LOAD extensions, or turn
that back on; and `run_sql` runs only queries (`require_queries`), so the registered tables cannot be
changed or dropped. The Lance tables are never written through DuckDB. User values only ever reach SQL as
DuckDB named parameters (`$name`), never through string building.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from hyperinf_ops.errors import ConfigError
from hyperinf_ops.location import is_object_store
from hyperinf_ops.sql_files import (
    SQL_DIR,
    QueryInfo,
    list_queries,
    load_sql,
    sql_params,
    strip_comments_and_strings,
)
from hyperinf_ops.store import TABLES

if TYPE_CHECKING:  # lance is imported by a live connection's store, not by readers of the synced file
    from hyperinf_ops.store.transactions import LanceTables

__all__ = [
    "DUCKDB_FILE",
    "DUCKDB_FILE_STORAGE",
    "QUERY_KEYWORDS",
    "SQL_DIR",
    "QueryInfo",
    "connect",
    "list_queries",
    "load_sql",
    "open_snapshot",
    "versions_signature",
    "refresh_duckdb",
    "require_queries",
    "run_query",
    "run_sql",
    "sandbox",
    "sql_params",
    "strip_comments_and_strings",
    "sync_duckdb",
]

DUCKDB_FILE = "hyperinf.duckdb"
# Storage format of the synced file: DuckDB 2.x writes format 69 by default, which no 1.x CLI opens (the newest
# on PyPI, 1.5.x, reads 64-68); "v1.0.0" writes format 64, which every DuckDB from 1.0 on reads.
DUCKDB_FILE_STORAGE = "v1.0.0"
# Every user-SQL connection: no file system, network or extension access, and no SET to turn it back on.
_SANDBOX_CONFIG = {"enable_external_access": False, "lock_configuration": True}
# Statements user SQL may run: SELECT also covers WITH, FROM, SHOW, DESCRIBE and SUMMARIZE.
_QUERY_STATEMENTS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})
QUERY_KEYWORDS = "SELECT, WITH, FROM, SHOW, DESCRIBE, SUMMARIZE, EXPLAIN"
# Columns copied by sync_duckdb (None = all): the vectors and d x d sums stay in Lance.
_SYNC_COLUMNS: dict[str, list[str] | None] = {
    "examples": None,
    "targets": None,
    "scores": None,
    "evaluation": None,
    "example_outputs": None,
    "label_signals": None,
    "label_suggestions": None,
    "queries": ["target_set", "method", "fingerprint", "diagnostics"],
    "curvature": ["shard", "matrix", "sq_sum", "count", "numel", "d", "examples_digest", "fingerprint"],
    "preconditioners": ["key", "method", "matrix", "r", "d", "damping", "diagnostics", "options", "fingerprint"],
    "target_gradients": ["target_set", "count", "content_digest", "fingerprint"],
    "gradients": ["sample_id", "shard", "grad_scale", "fingerprint"],
}


def sandbox(
    relations: Mapping[str, Any] | None = None, *, database: str | None = None
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for user SQL: external access off and the configuration locked from the start.

    relations: name -> Arrow table, pyarrow or Lance dataset, or DataFrame, registered as views (their reads
    are done by Arrow or Lance, not by DuckDB's file system, so they work inside the sandbox). database: a
    DuckDB file to open read-only instead of an in-memory database.
    """
    con = duckdb.connect(database or ":memory:", read_only=database is not None, config=dict(_SANDBOX_CONFIG))
    for name, relation in (relations or {}).items():
        con.register(name, relation)
    return con


def require_queries(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise ConfigError unless every statement of `sql` is a query (see QUERY_KEYWORDS); parses, runs nothing.

    The sandbox alone would let `DROP VIEW scores` or `CREATE TABLE` through (in-memory objects), so user SQL
    is limited to reads; a parse error raises duckdb.ParserException.
    """
    for statement in con.extract_statements(sql):
        if statement.type not in _QUERY_STATEMENTS:
            keyword = statement.query.split(None, 1)[0].rstrip(";").upper()
            raise ConfigError(f"{keyword} is refused: SQL here only reads ({QUERY_KEYWORDS}); the tables are "
                              "read-only")
        if statement.type == duckdb.StatementType.EXPLAIN:
            # EXPLAIN ANALYZE runs its statement: what it explains must be a query too
            explained = re.sub(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?(\([^)]*\)\s*)?", "", statement.query, flags=re.I)
            require_queries(con, explained)


def run_sql(
    con: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, Any], *, name: str = "query"
) -> pa.Table:
    """Execute the query `sql` with DuckDB named parameters; every `$name` must be given, and nothing else.

    Raises ConfigError, one line starting with `name`, for anything but a query (`require_queries`) and for
    every DuckDB error; a text of several queries returns the last one's rows.
    """
    wanted = set(sql_params(sql))
    missing, unknown = sorted(wanted - set(params)), sorted(set(params) - wanted)
    if missing or unknown:
        raise ConfigError(
            f"{name}: missing parameters {missing}, unknown parameters {unknown}; it takes {sorted(wanted)}"
        )
    # con.sql is lazy and fully materialised here, so no half-read result is left on the connection.
    try:
        require_queries(con, sql)
        return con.sql(sql, params=dict(params) if params else None).to_arrow_table()
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from err
    except duckdb.Error as err:  # e.g. a parameter of the wrong type: one line naming the query
        given = f" (parameters: {dict(params)})" if params else ""
        raise ConfigError(f"{name}: {str(err).splitlines()[0]}{given}") from err


def run_query(
    con: duckdb.DuckDBPyConnection, name: str, params: Mapping[str, Any], *, sql_dir: Path | None = None
) -> pa.Table:
    """Run `sql/<name>.sql` with `params` (DuckDB named parameters, validated) -> Arrow table."""
    return run_sql(con, load_sql(name, sql_dir), params, name=name)


def connect(
    store: LanceTables,
    live: bool = True,
    *,
    versions: Mapping[str, int] | None = None,
    database: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """A `sandbox` connection over the store's tables.

    live=True: in-memory DuckDB with each Lance table registered as a view (fresh reads; `versions` pins
    tables to Lance versions: time travel, and only those tables are registered), plus `_lance_versions`.
    `gradients` is exposed without its vectors (read at connect time).
    live=False: the synced database file (read-only), `database` or `<root>/hyperinf.duckdb`.
    """
    if not live:
        return sandbox(database=database or str(_synced_file(store)))
    pinned = dict(versions) if versions is not None else store.versions()
    relations: dict[str, Any] = {}
    for table, version in pinned.items():
        if table not in TABLES:
            raise ConfigError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
        ds = store.open(table, version)
        # DuckDB has no float16 type and refuses the whole gradients dataset: expose its non-vector columns.
        relations[table] = ds.to_table(columns=_SYNC_COLUMNS[table]) if table == "gradients" else ds
    relations["_lance_versions"] = pa.table(
        {"table_name": list(pinned), "version": pa.array(list(pinned.values()), pa.int64())}
    )
    return sandbox(relations)


def open_snapshot(root: str) -> tuple[duckdb.DuckDBPyConnection, dict[str, int]] | None:
    """A `sandbox` connection on the synced file `<root>/hyperinf.duckdb` and its table -> Lance version, when
    the file holds the latest version of every table; else None (read the live tables instead).

    Current means: every table's `_versions` folder lists exactly the manifests it listed when the sync began
    (`versions_signature`: every Lance commit adds one, a cleanup removes some, and a table folder moved back from
    an archive brings other files, whatever their modification times), and no table appeared since. It costs
    one directory listing per table and no Lance import, which is what makes `hyperinf sql` light
    (benchmarks/bench_sql_cli.py). Object-storage roots always read live.
    """
    path = Path(root) / DUCKDB_FILE
    if is_object_store(root) or not path.is_file():
        return None
    con = sandbox(database=str(path))
    try:
        synced = con.execute("SELECT table_name, version, uri, signature FROM _lance_versions").fetchall()
    except duckdb.Error:  # a file of an older layout, or one being replaced
        con.close()
        return None
    folders = {str(p) for p in (Path(root) / "lance").glob("*.lance")}
    if not synced or folders != {uri for _, _, uri, _ in synced} or any(
            versions_signature(uri) != signature for _, _, uri, signature in synced):
        con.close()
        return None
    return con, {table: version for table, version, _, _ in synced}


def versions_signature(uri: str) -> str | None:
    """A digest of the manifest files in a local table's `_versions` folder (names and inodes, from one
    directory listing); None when the folder is missing."""
    try:
        entries = sorted(f"{e.name}:{e.inode()}" for e in os.scandir(Path(uri, "_versions")))
    except FileNotFoundError:
        return None
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _synced_file(store: LanceTables) -> Path:
    """`<root>/hyperinf.duckdb`; ValueError for an object-store root (DuckDB writes only local files)."""
    if store.remote:
        raise ValueError(f"{store.root} is on an object store: there is no synced DuckDB file; read the tables live")
    return Path(store.root) / DUCKDB_FILE


def refresh_duckdb(store: LanceTables, log: Callable[[str], None]) -> None:
    """`sync_duckdb` into `<root>/hyperinf.duckdb`; skipped (and logged) for an object-store root, whose tables
    `hyperinf sql` reads live (`open_snapshot` returns None there)."""
    if store.remote:
        log(f"{store.root} is on an object store: no {DUCKDB_FILE} copy is synced; `hyperinf sql` reads the "
            "tables live")
        return
    sync_duckdb(store)


def sync_duckdb(store: LanceTables, database: str | None = None) -> dict[str, int]:
    """Copy the non-vector tables into the DuckDB file; returns table -> Lance version.

    The copy is written to a temporary file in storage format DUCKDB_FILE_STORAGE (a DuckDB 1.x CLI opens
    it) and renamed over the old file, so readers see either the previous sync or this one, and a file
    written by an older sync in another format is replaced whole. `_lance_versions(table_name, version,
    uri, synced_at, signature)` records where every copy came from (`versions_signature`: `open_snapshot`'s
    test that it is still current).
    """
    synced_at = datetime.now(UTC)
    # Signatures before the versions are read: a commit after them makes the copy stale, never wrongly current.
    signatures = {t: versions_signature(store.uri(t)) for t in TABLES}
    versions = store.versions()
    target = Path(database) if database else _synced_file(store)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        with duckdb.connect(str(tmp), config={"storage_compatibility_version": DUCKDB_FILE_STORAGE}) as con:
            for table, version in versions.items():
                ds = store.open(table, version)
                columns = _SYNC_COLUMNS[table] or ds.schema.names
                con.register("_hyperinf_src", ds.scanner(columns=columns, batch_size=65536).to_reader())
                # `table` comes from TABLES (fixed identifiers), never from user input.
                con.execute(f'CREATE TABLE "{table}" AS SELECT * FROM _hyperinf_src')
                con.unregister("_hyperinf_src")
            con.execute("CREATE TABLE _lance_versions (table_name VARCHAR, version BIGINT, uri VARCHAR, "
                        "synced_at TIMESTAMPTZ, signature VARCHAR)")
            con.executemany(
                "INSERT INTO _lance_versions VALUES (?, ?, ?, ?, ?)",
                [[t, v, store.uri(t), synced_at, signatures.get(t)] for t, v in versions.items()],
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)  # left by a write cut short
        raise
    return versions
