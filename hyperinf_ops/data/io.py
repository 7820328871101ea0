"""Pool files: which files are the shards, and reading one as written (no type guessing on ids or texts)."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from pathlib import Path

import pandas as pd
import pyarrow as pa

from hyperinf_ops.errors import DataError

__all__ = ["SUPPORTED_SUFFIXES", "discover_shards", "file_digest", "read_table"]

SUPPORTED_SUFFIXES = (".parquet", ".csv", ".jsonl")
_JSON_HINT = " (.json: write one JSON object per line and name it .jsonl)"


def discover_shards(pool_path: Path) -> dict[str, Path]:
    """Shard key -> file. A file is one shard keyed by its stem; a folder gives one shard per file in it (not
    recursive, hidden files ignored), sorted by name. Extensions match case-insensitively (`a.CSV` is a CSV); a
    file of another type is a DataError, never skipped: a skipped file would remove its shard's examples."""
    path = Path(pool_path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if not f.name.startswith(".") and not f.is_dir())
        if not files:
            raise DataError(f"empty pool: folder {path} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
    else:
        raise DataError(f"pool path {path} does not exist")
    for f in files:
        if f.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"pool file {f} has an unsupported type{_JSON_HINT if f.suffix.lower() == '.json' else ''}"
                            f"; use one of {list(SUPPORTED_SUFFIXES)} (or move the file out of the pool folder)")
    shards: dict[str, Path] = {}
    for f in files:
        if f.stem in shards:
            raise DataError(f"two pool files share the shard name {f.stem!r}: {shards[f.stem].name}, {f.name}")
        shards[f.stem] = f
    return shards


def read_table(path: str | Path, verbatim: Collection[str] = (), integers: Collection[str] = ()) -> pd.DataFrame:
    """Read one .parquet / .csv / .jsonl file as written. A CSV's `verbatim` columns (ids, texts) are read as
    strings, never parsed as numbers (`007` stays `007`); its `integers` columns (ids, labels) are integers only
    when every value is written as one (`12`, `-2`; one `007` or `1.0` keeps the column as text, so no two values
    merge). JSON and Parquet carry their own types (the export gives labels and ids theirs back: export.py)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            # Only empty fields are missing: a text "NA" or "null" is text.
            as_text = dict.fromkeys([*verbatim, *integers], str)
            df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=as_text)
            for col in integers:
                if col in df.columns and df[col].notna().all() and df[col].map(_is_written_integer).all():
                    df[col] = df[col].astype("int64")
            return df
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    raise DataError(f"{path}: unsupported file type{_JSON_HINT if suffix == '.json' else ''}; use one of "
                    f"{list(SUPPORTED_SUFFIXES)}")


def _is_written_integer(text: str) -> bool:
    """`text` is an integer written the one way str(int) writes it."""
    try:
        return str(int(text)) == text
    except ValueError:
        return False


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks: the identity of a pool file's content."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
