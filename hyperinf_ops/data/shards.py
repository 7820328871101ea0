"""The on-disk layout every bundled dataset builder writes: `<out>/pool/shard-NN.parquet`,
`<out>/targets/<name>.parquet` and the held-out `<out>/test/test.parquet` (never trained on nor scored: the
evaluation's test split)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

__all__ = ["DatasetPaths", "relative_path", "write_dataset_config", "write_pool_and_target"]


@dataclass(frozen=True)
class DatasetPaths:
    """Where a builder wrote the pool shards, the target set and the test split, and how many examples they hold."""

    root: Path
    pool_dir: Path
    shards: tuple[Path, ...]
    target: Path
    n_pool: int
    n_target: int
    test: Path
    n_test: int


def write_pool_and_target(pool: pd.DataFrame, target: pd.DataFrame, test: pd.DataFrame, out_dir: str | Path,
                          n_shards: int, target_name: str) -> tuple[Path, tuple[Path, ...], Path, Path]:
    """Write `pool` as `n_shards` contiguous parquet shards, `target` and `test` as one file each; returns (pool
    folder, shard paths, target path, test path). Shards of an earlier build are removed first: a rebuild with
    fewer shards must not keep old ones."""
    out_dir = Path(out_dir)
    pool_dir, target_dir, test_dir = out_dir / "pool", out_dir / "targets", out_dir / "test"
    for folder in (pool_dir, target_dir, test_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for stale in pool_dir.glob("shard-*.parquet"):
        stale.unlink()
    shards = []
    for i, part in enumerate(np.array_split(np.arange(len(pool)), n_shards)):
        path = pool_dir / f"shard-{i:02d}.parquet"
        pool.iloc[part].to_parquet(path, index=False)
        shards.append(path)
    target_path, test_path = target_dir / f"{target_name}.parquet", test_dir / "test.parquet"
    target.reset_index(drop=True).to_parquet(target_path, index=False)
    test.reset_index(drop=True).to_parquet(test_path, index=False)
    return pool_dir, tuple(shards), target_path, test_path


def relative_path(path: Path, base: Path) -> str:
    """`path` relative to `base` (a config file's folder) when it lies below it, else absolute."""
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return str(path.resolve())


def write_dataset_config(paths: DatasetPaths, settings: Mapping[str, Any], *, data_columns: Mapping[str, str],
                         target_name: str, config_path: str | Path | None = None, storage_root: str = "store",
                         overrides: Mapping[str, Any] | None = None,
                         evaluation: Mapping[str, Any] | None = None) -> Path:
    """Write a YAML config over a builder's dataset (default `<root>/hyperinf.yaml`) and return its path.

    `settings`: the model, training and curation keys; `data_columns`: the pool's column keys (text_column, ...).
    Paths in the file are relative to its folder. `overrides` replace top-level keys (nested mappings are merged
    one level deep, e.g. {"train": {"epochs": 1}}); `evaluation` (a mapping, {} for the section's defaults) adds
    an `evaluation:` block over the test split."""
    config_path = Path(config_path or paths.root / "hyperinf.yaml").resolve()
    base = config_path.parent
    doc: dict[str, Any] = {
        "storage_root": storage_root, **settings,
        "data": {"path": relative_path(paths.pool_dir, base), **data_columns},
        "targets": {target_name: {"path": relative_path(paths.target, base)}},
    }
    if evaluation is not None:
        doc["evaluation"] = {"test": {"path": relative_path(paths.test, base)}, **evaluation}
    for key, value in (overrides or {}).items():
        doc[key] = {**doc[key], **value} if isinstance(value, Mapping) and isinstance(doc.get(key), dict) else value
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return config_path
