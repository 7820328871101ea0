"""A tiny hyperinf project for the pipeline tests: a random 2-layer BERT saved as a local HF folder,
a synthetic sentiment pool in parquet shards (20% of labels flipped, `flipped` kept), a clean target set and a
clean test split (`test/test.parquet`, for an `evaluation:` block)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from tiny_models import save_tiny_model

POSITIVE = ("good", "great", "fine", "fun", "love", "best", "funny", "fresh")
NEGATIVE = ("bad", "awful", "boring", "hate", "worst", "dull", "rotten")
NEUTRAL = ("the", "movie", "film", "plot", "story", "acting", "music", "scene", "this", "was", "very", "and")


def sentences(n: int, seed: int, flip_fraction: float = 0.0) -> pd.DataFrame:
    """n short reviews over the tiny model's vocabulary; label pos/neg by the sentiment words used."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(["pos", "neg"], size=n)
    texts = []
    for label in labels:
        words = list(rng.choice(NEUTRAL, size=rng.integers(3, 7)))
        words += list(rng.choice(POSITIVE if label == "pos" else NEGATIVE, size=rng.integers(1, 3)))
        rng.shuffle(words)
        texts.append(" ".join(words))
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=round(flip_fraction * n), replace=False)] = True
    noisy = np.where(flipped, np.where(labels == "pos", "neg", "pos"), labels)
    return pd.DataFrame({"text": texts, "label": noisy, "flipped": flipped})


def write_shard(pool_dir: Path, name: str, n: int, seed: int) -> Path:
    """One parquet shard of n pool examples (ids made unique by shard name and row)."""
    pool_dir.mkdir(parents=True, exist_ok=True)
    df = sentences(n, seed, flip_fraction=0.2)
    df.insert(0, "id", [f"{name}-{i:04d}" for i in range(n)])
    path = pool_dir / f"{name}.parquet"
    df.to_parquet(path, index=False)
    return path


def make_project(root: Path, model_dir: Path, *, n_pool: int = 200, n_shards: int = 2, n_target: int = 40,
                 **overrides: Any) -> Path:
    """Write data + config under ``root`` (model in ``model_dir``, reused if present); returns the config."""
    if not (model_dir / "config.json").is_file():
        save_tiny_model(model_dir)
    for i in range(n_shards):
        write_shard(root / "pool", f"shard-{i}", n_pool // n_shards, seed=i)
    for folder, name, seed in (("targets", "clean", 99), ("test", "test", 98)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        rows = sentences(n_target, seed=seed)
        if folder == "test":  # ids: a test row keeps its place in the validation / test split when edited
            rows.insert(0, "id", [f"test-{i:04d}" for i in range(n_target)])
        rows.to_parquet(root / folder / f"{name}.parquet", index=False)
    doc: dict[str, Any] = {
        "storage_root": "store",
        "model": str(model_dir),
        "task": "classification",
        "data": {"path": "pool", "text_column": "text", "label_column": "label", "id_column": "id"},
        "targets": {"clean": {"path": "targets/clean.parquet"}},
        "lora": {"rank": 4, "alpha": 8, "modules": ["query", "value"]},
        "train": {"epochs": 10, "lr": 3.0e-2, "batch_size": 8, "seed": 0},  # learns the toy task (warm-up check)
        "estimators": ["hyperinf", "datainf", "tracin"],
        "damping_ratio": 0.1,
        "max_length": 16,
        "device": "cpu",
        "curation": {"query": "top_fraction",
                     "params": {"fraction": 0.5, "target_set": "clean", "method": "hyperinf"}},
        **overrides,
    }
    # A tiny random model's warm-up need not beat the majority class: the tests built on it check the plumbing,
    # so they export regardless (curation.require_warmup has its own tests).
    doc["curation"] = {"require_warmup": False, **doc["curation"]}
    path = root / "hyperinf.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
