"""The SQL files of `sql/`: where they are, their named parameters, and their header comments.

Pure text handling (no DuckDB, Arrow or Lance import): the config validates curation parameters against these
files, and `hyperinf sql` lists them, without paying for a database.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

from hyperinf_ops.errors import ConfigError

__all__ = ["EXPORT_QUERY", "SQL_DIR", "QueryInfo", "list_queries", "load_sql", "sql_params",
           "strip_comments_and_strings"]

# sql/ ships inside the package as `hyperinf_ops.sql` (pyproject's package-dir): the same lookup finds the
# installed copy and, in an editable install, the repository's sql/ folder.
SQL_DIR = Path(str(importlib.resources.files("hyperinf_ops.sql")))
EXPORT_QUERY = "export_subset"  # the join every curated export runs (sql/export_subset.sql), not a curation query
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class QueryInfo:
    """A query file of sql/: its name, header comment, and the named parameters it takes."""

    name: str
    description: str
    params: tuple[str, ...]
    path: Path


def strip_comments_and_strings(sql: str) -> str:
    """`sql` with string literals emptied and comments removed: what is left is SQL syntax only."""
    sql = re.sub(r"\$([A-Za-z_]\w*|)\$.*?\$\1\$", "''", sql, flags=re.S)  # dollar-quoted: $$text$$, $tag$text$tag$
    sql = re.sub(r"'(?:[^']|'')*'", "''", sql)
    sql = re.sub(r"--[^\n]*", "", sql)
    return re.sub(r"/\*.*?\*/", "", sql, flags=re.S)


def sql_params(sql: str) -> tuple[str, ...]:
    """Named parameters (`$name`) used by `sql`, outside comments and string literals, sorted."""
    return tuple(sorted(set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", strip_comments_and_strings(sql)))))


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
