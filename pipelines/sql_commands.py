"""`hyperinf sql` and `hyperinf shell`: SQL over the live tables, in the user-SQL sandbox.

`hyperinf sql` reads the synced `hyperinf.duckdb` while it holds every table's latest version
(`query.open_snapshot`), else (and with `--live`) the Lance tables as live DuckDB views (`query.connect`); the
shell always reads live. Both connections are sandboxed (external access off, configuration locked) and run only
queries (`query.require_queries`), so user SQL reads the tables and nothing else: no files, no other databases,
no extensions, no writes. Problems end in one line:
`hyperinf sql` raises HyperinfError (the CLI prints `hyperinf: error: ...`, exit 2); the shell prints
`Error: ...` and shows the prompt again.

This module and everything it imports stay free of torch, transformers and Dagster (tests/test_sandbox.py
checks it), so a query answers in well under two seconds.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import duckdb
import pyarrow as pa

from hyperinf_ops.config import TARGET_PARAMS, load_config, query_param_problem
from hyperinf_ops.config.problems import did_you_mean
from hyperinf_ops.errors import HyperinfError
from hyperinf_ops.query import (
    QUERY_KEYWORDS,
    connect,
    list_queries,
    open_snapshot,
    run_query,
    run_sql,
    strip_comments_and_strings,
)

__all__ = ["open_tables", "parse_param", "print_table", "run_shell", "shell_command", "sql_command"]

PROMPT, CONTINUE = "hyperinf> ", "     ...> "
# How SQL text starts (as opposed to a query name): the read statements and the ones refused with a reason.
_SQL_START = r"(SELECT|WITH|FROM|SHOW|DESCRIBE|SUMMARIZE|EXPLAIN|VALUES|PRAGMA|CALL|SET|CREATE|DROP|INSERT|UPDATE|DELETE|ATTACH|COPY|CHECKPOINT|INSTALL|LOAD|\(|--|/\*)"
SHELL_HELP = f"""SQL over the live tables (read-only: {QUERY_KEYWORDS}); end a statement with ';'.
  .tables           table names, rows and Lance versions
  .schema [TABLE]   columns and types (every table without TABLE)
  .help             this text
  .quit, .exit      leave (or Ctrl-D); Ctrl-C cancels the statement being typed"""


def open_tables(config: Path, *, live: bool) -> tuple[duckdb.DuckDBPyConnection, dict[str, int]]:
    """A sandboxed connection over the config's tables, and table -> Lance version.

    live=False reads the synced file `hyperinf.duckdb` when it holds every table's latest version
    (`query.open_snapshot`: no Lance import, about a third of the memory), else the live Lance tables, as
    live=True always does. Raises FileNotFoundError when the store has no tables yet.
    """
    cfg = load_config(config)
    snapshot = None if live else open_snapshot(str(cfg.storage_root))
    if snapshot is not None:
        return snapshot
    from hyperinf_ops.store.transactions import LanceTables  # imports lance: only for live reads

    store = LanceTables(str(cfg.storage_root))
    versions = store.versions()
    if not versions:
        raise FileNotFoundError(f"no tables under {cfg.storage_root} yet: run `hyperinf run` (or demo) first")
    return connect(store, versions=versions), versions


# ---------------------------------------------------------------------------------------------- hyperinf sql

def sql_command(config: Path, query: str, params: list[str], fmt: str, *, live: bool = False) -> int:
    """`hyperinf sql`: run SQL text, or a named query of sql/ with `--param NAME=VALUE`s; print the rows.
    Reads the synced file when it is current, else (or with `live`) the Lance tables (`open_tables`)."""
    con, versions = open_tables(config, live=live)
    try:
        queries = list_queries()
        if query in queries:
            values = dict(parse_param(p) for p in params)
            for key, value in values.items():
                problem = query_param_problem(query, key, value)
                if problem:
                    raise HyperinfError(f"--param {key}={value if isinstance(value, str) else json.dumps(value)}: "
                                        f"{problem}")
            if "scores" in versions:
                _check_scored(con, values)
            table = run_query(con, query, values)
        elif not re.search(r"\s", query.strip()) and not re.match(_SQL_START, query.strip(), re.I):
            # one word that is not SQL: a misspelt query name (or a path, which names never are)
            raise HyperinfError(f"no query {query!r} in sql/{did_you_mean(query, queries)}; queries: "
                                f"{sorted(queries)} (or give SQL text, e.g. \"SELECT * FROM scores LIMIT 5\")")
        elif params:
            raise HyperinfError("--param only applies to the named queries of sql/")
        else:
            table = run_sql(con, query, {}, name="SQL error")
    finally:
        con.close()
    print_table(table, fmt)
    return 0


def _check_scored(con: duckdb.DuckDBPyConnection, params: dict[str, Any]) -> None:
    """A `method` or target-set parameter naming nothing in `scores` would select nothing: say what exists."""
    pairs = con.sql("SELECT DISTINCT target_set, method FROM scores").fetchall()
    known = {"method": sorted({m for _, m in pairs}), "target set": sorted({t for t, _ in pairs})}
    for key, value in params.items():
        kind = "method" if key == "method" else "target set" if key in TARGET_PARAMS else None
        if kind and pairs and value not in known[kind]:
            raise HyperinfError(f"--param {key}={value}: no scores for {kind} {value!r}"
                                f"{did_you_mean(str(value), known[kind])}; scored: {known[kind]}")


def parse_param(text: str) -> tuple[str, object]:
    """`NAME=VALUE` -> (name, value); VALUE is read as JSON when it is (numbers, true/false, null)."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise HyperinfError(f"--param {text!r}: expected NAME=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name, value


def print_table(table: pa.Table, fmt: str, out: IO[str] | None = None) -> None:
    """Rows as an aligned table (at most MAX_ROWS rows, cells cut at MAX_CELL characters), CSV, or JSON records.

    Written from the Arrow rows directly: no pandas, whose import alone took most of a `hyperinf sql` call."""
    out = out or sys.stdout
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")  # quotes only the cells that need it
        writer.writerow(table.column_names)
        writer.writerows([_json_value(v) for v in row.values()] for row in table.to_pylist())
    elif fmt == "json":
        records = [{k: _json_value(v) for k, v in row.items()} for row in table.to_pylist()]
        out.write(json.dumps(records, ensure_ascii=False, separators=(",", ":")) + "\n")
    elif table.num_rows == 0:
        out.write("(no rows)\n")
    else:
        out.write(_aligned(table.slice(0, MAX_ROWS)))
        if table.num_rows > MAX_ROWS:
            out.write(f"... {table.num_rows:,} rows in all (--format csv or json prints every row)\n")


MAX_ROWS, MAX_CELL = 200, 60


def _json_value(value: Any) -> Any:
    """A JSON-able cell: non-finite floats as null (JSON has no NaN), times in ISO 8601, bytes as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def _cell(value: Any) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 3] + "..."


def _aligned(table: pa.Table) -> str:
    """Columns right-aligned under their names, two spaces apart."""
    columns = [[name, *map(_cell, table.column(i).to_pylist())] for i, name in enumerate(table.column_names)]
    widths = [max(map(len, column)) for column in columns]
    return "".join("  ".join(c[r].rjust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n"
                   for r in range(table.num_rows + 1))


# ---------------------------------------------------------------------------------------------- hyperinf shell

def shell_command(config: Path) -> int:
    """`hyperinf shell`: the prompt of `run_shell`; on a terminal with line editing and history."""
    con, versions = open_tables(config, live=True)
    try:
        tty = sys.stdin.isatty()
        if tty:
            import readline  # noqa: F401  (its side effect: input() gains line editing and history)

            print(f"hyperinf shell: DuckDB {duckdb.__version__}, live read-only views of {len(versions)} tables "
                  f"({', '.join(versions)}). .help for commands, .quit to leave.")
        return run_shell(con, read=input if tty else _read_quietly)
    finally:
        con.close()


def _read_quietly(prompt: str) -> str:
    """input() without the prompt: piped input (`hyperinf shell < queries.sql`) prints only results."""
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def run_shell(con: duckdb.DuckDBPyConnection, *, read: Callable[[str], str] = input,
              out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Read statements until `.quit` or end of input, run each, print its rows; returns the exit status (0).

    A statement ends at a `;` outside strings and comments (lines before it are continued); a line starting
    with `.` is a shell command. Every error prints one line (`SQL error: ...`, `.schema: ...`) and the prompt
    comes back; Ctrl-C drops the statement being typed (or cancels the running one).
    """
    out, err = out or sys.stdout, err or sys.stderr
    lines: list[str] = []
    while True:
        try:
            line = read(CONTINUE if lines else PROMPT)
            if not lines and line.strip().startswith("."):
                if not _dot_command(con, line.strip(), out):
                    return 0
                continue
            lines.append(line)
            text = "\n".join(lines)
            if not _complete(text):
                continue
            lines.clear()
            _run_text(con, text, out, err)
        except EOFError:
            out.write("\n")
            if "\n".join(lines).strip():  # the last statement ends at the end of input, `;` or not
                _run_text(con, "\n".join(lines), out, err)
            return 0
        except KeyboardInterrupt:
            lines.clear()
            out.write("^C\n")
        except HyperinfError as problem:
            lines.clear()
            err.write(str(problem).splitlines()[0] + "\n")


def _run_text(con: duckdb.DuckDBPyConnection, text: str, out: IO[str], err: IO[str]) -> None:
    """Run each statement of `text`, printing its rows; an error prints one line and skips the rest."""
    try:
        for statement in _statements(con, text):
            print_table(run_sql(con, statement, {}, name="SQL error"), "table", out)
    except HyperinfError as problem:
        err.write(str(problem).splitlines()[0] + "\n")


def _complete(text: str) -> bool:
    """Whether `text` ends a statement: its last character outside strings and comments is `;`."""
    return strip_comments_and_strings(text).rstrip().endswith(";")


def _statements(con: duckdb.DuckDBPyConnection, text: str) -> list[str]:
    """The statements of `text`, each run (and its rows printed) on its own."""
    try:
        return [statement.query for statement in con.extract_statements(text)]
    except duckdb.Error as problem:
        raise HyperinfError(f"SQL error: {str(problem).splitlines()[0]}") from problem


def _dot_command(con: duckdb.DuckDBPyConnection, line: str, out: IO[str]) -> bool:
    """Run a `.command`; False means leave the shell. Raises HyperinfError for an unknown command or table."""
    command, _, arg = line.partition(" ")
    arg = arg.strip().rstrip(";")
    tables = [name for (name,) in con.sql("SELECT table_name FROM _lance_versions ORDER BY 1").fetchall()]
    if command in (".quit", ".exit"):
        return False
    if command == ".help":
        out.write(SHELL_HELP + "\n")
    elif command == ".tables":
        rows = [(t, con.sql(f'SELECT count(*) FROM "{t}"').fetchall()[0][0]) for t in tables]  # names of TABLES
        versions = dict(con.sql("SELECT table_name, version FROM _lance_versions").fetchall())
        print_table(pa.table({"table": tables, "rows": [n for _, n in rows],
                              "lance_version": [versions[t] for t in tables]}), "table", out)
    elif command == ".schema":
        for table in [arg] if arg else tables:
            if table not in tables:
                raise HyperinfError(f".schema: no table {table!r}{did_you_mean(table, tables)}; tables: {tables}")
            described = con.sql(f'DESCRIBE "{table}"').to_arrow_table().select(["column_name", "column_type"])
            out.write(f"{table}:\n")
            print_table(described, "table", out)
    else:
        commands = [".tables", ".schema", ".help", ".quit", ".exit"]
        raise HyperinfError(f"{command}: unknown command{did_you_mean(command, commands)}; .help lists them")
    return True
