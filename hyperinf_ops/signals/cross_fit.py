"""Out-of-fold class probabilities: K warm-ups, each trained on K - 1 folds of the pool and predicting the fold
it did not see.

Folds are stratified by label and seeded, and decided by the sorted sample ids (not the order the records come
in): example k is in fold f(k), and its probabilities P_k = softmax(z_k) come from the model trained on every
other fold, with the warm-up's recipe (same model, LoRA shape, optimizer, epochs, seed) so the K models are the
warm-up adapter's peers. Cost: K warm-ups on (K - 1) / K of the pool each, plus one forward pass of the pool.
These probabilities are what cleanlab needs (label_quality.py): a model never scores an example it memorised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from hyperinf_ops.errors import DataError
from hyperinf_ops.settings import LoraSettings, ModelSpec, TrainSettings

__all__ = ["fold_assignment", "out_of_fold_probabilities"]


def fold_assignment(sample_ids: Sequence[str], labels: Sequence[Any], folds: int, seed: int = 0) -> np.ndarray:
    """(N,) fold index in [0, folds) of each example: within each label, the examples (sorted by sample id,
    then permuted by `seed`) are dealt to the folds in turn, so every fold holds ~1/folds of every label."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    if len(sample_ids) != len(labels):
        raise ValueError(f"{len(sample_ids)} sample ids for {len(labels)} labels")
    if len(sample_ids) < folds:
        raise DataError(f"{len(sample_ids)} examples cannot be split into {folds} folds")
    order = sorted(range(len(sample_ids)), key=lambda i: str(sample_ids[i]))
    rng = np.random.default_rng(seed)
    fold = np.empty(len(sample_ids), dtype=np.int64)
    offset = 0
    for label in sorted({str(labels[i]) for i in order}):
        members = np.array([i for i in order if str(labels[i]) == label])
        members = members[rng.permutation(len(members))]
        fold[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)  # the next label starts where this one stopped: fold sizes stay even
    return fold


def out_of_fold_probabilities(spec: ModelSpec, lora: LoraSettings, train: TrainSettings, classes: Sequence[str],
                              records: Sequence[Mapping[str, Any]], folds: int, *,
                              log: Callable[[str], Any] | None = None) -> np.ndarray:
    """(N, C) class probabilities of every record (columns in `classes` order) from the fold model that did not
    train on it (module docstring); `records` are prepared pool records (sample_id, text, label)."""
    from hyperinf_ops.evaluation import example_outputs
    from hyperinf_ops.memory import release_memory
    from hyperinf_ops.models import load_lora_model
    from hyperinf_ops.training import warmup_train

    fold = fold_assignment([r["sample_id"] for r in records], [r["label"] for r in records], folds, train.seed)
    probs = np.full((len(records), len(classes)), np.nan)
    for f in range(folds):
        fit = [r for r, g in zip(records, fold, strict=True) if g != f]
        held = np.flatnonzero(fold == f)
        if log:
            log(f"cross-fit fold {f + 1}/{folds}: training on {len(fit)} examples, predicting {len(held)}")
        loaded = load_lora_model(spec, list(classes), lora=lora, seed=train.seed)
        warmup_train(loaded, fit, train, max_length=spec.max_length,
                     progress=(lambda e, f=f: log(f"  fold {f + 1}: {e}")) if log else None)
        out = example_outputs(loaded, [records[i] for i in held], max_length=spec.max_length)
        probs[held] = out.probabilities.numpy()
        del loaded
        release_memory()
    return probs
