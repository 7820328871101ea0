"""Chatterbot prompt/response pairs (from the installed `chatterbot-corpus` package) for the causal LM.

Each conversation of `chatterbot_corpus/data/english/<topic>.yml` gives one pair per consecutive turn
(prompt = a turn, response = the next one); the topic (the file's name) is the `label`. Pairs with an empty
side and repeated prompts (the corpus has many) keep their first occurrence. `build_chatterbot_dataset` writes
a pool (parquet shards) and a target set of held-out pairs of one topic: "which training pairs help the model
answer <topic> questions".
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from hyperinf_ops.data.shards import DatasetPaths, write_pool_and_target
from hyperinf_ops.errors import DataError

__all__ = ["ChatterbotPaths", "build_chatterbot_dataset", "chatterbot_pairs"]


@dataclass(frozen=True)
class ChatterbotPaths(DatasetPaths):
    """Where `build_chatterbot_dataset` wrote the pool shards, the target set and the test split of one topic."""

    target_topic: str


def chatterbot_pairs() -> pd.DataFrame:
    """Every (prompt, response, label = topic) pair of the English corpus, deduplicated by prompt."""
    spec = importlib.util.find_spec("chatterbot_corpus")  # located, never imported
    if spec is None or spec.origin is None:
        raise DataError("the chatterbot data needs the `chatterbot-corpus` package (pip install --no-deps "
                        "chatterbot-corpus)")
    rows = []
    for file in sorted((Path(spec.origin).parent / "data" / "english").glob("*.yml")):
        for turns in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", []):
            texts = [str(t).strip() for t in turns]
            rows += [{"prompt": p, "response": r, "label": file.stem} for p, r in zip(texts, texts[1:], strict=False)
                     if p and r]
    return pd.DataFrame(rows).drop_duplicates(subset="prompt").reset_index(drop=True)


def build_chatterbot_dataset(out_dir: str | Path, *, n_pool: int = 400, n_target: int = 40,
                             target_topic: str = "ai", seed: int = 0, n_shards: int = 2,
                             n_test: int = 20) -> ChatterbotPaths:
    """A pool of `n_pool` pairs of every topic, a target set of `n_target` held-out `target_topic` pairs and a test
    split of `n_test` other ones (no pair in two of them), as parquet under `<out_dir>/pool/`,
    `<out_dir>/targets/<topic>.parquet` and `<out_dir>/test/test.parquet`."""
    pairs = chatterbot_pairs()
    topical = pairs[pairs["label"] == target_topic]
    if len(topical) <= n_target + n_test:
        raise DataError(f"topic {target_topic!r} has {len(topical)} pairs; asked for {n_target} targets and {n_test} "
                        f"tests plus some in the pool (topics: {sorted(pairs['label'].unique())})")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(topical))
    target, test = topical.iloc[order[:n_target]], topical.iloc[order[n_target:n_target + n_test]]
    rest = pairs.drop(index=target.index.append(test.index))
    if len(rest) < n_pool:
        raise DataError(f"the corpus has {len(rest)} pairs outside the target set; asked for {n_pool}")
    pool = rest.iloc[rng.permutation(len(rest))[:n_pool]].reset_index(drop=True)
    pool_dir, shards, target_path, test_path = write_pool_and_target(pool, target, test, out_dir, n_shards,
                                                                     target_topic)
    return ChatterbotPaths(root=Path(out_dir), pool_dir=pool_dir, shards=shards, target=target_path,
                           target_topic=target_topic, n_pool=n_pool, n_target=n_target, test=test_path,
                           n_test=n_test)
