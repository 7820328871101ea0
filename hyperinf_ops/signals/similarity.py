"""Embedding similarity to a target set: the plain baseline a user tries before gradients (the strongest
non-gradient baseline of the LESS paper, representation-based selection).

For example k with e_k the L2-normalised masked mean of the base model's last hidden state over its text
(signals/probe.py `frozen_embeddings`; a causal LM's text is prompt, newline, response) and a target set T,

    similarity_k = < e_k , c_T >,      c_T = mean_{t in T} e_t / || mean_{t in T} e_t ||

the cosine to the target set's mean direction (equal, up to a positive factor, to the mean cosine to its
examples). Higher = more like the target set = kept first, the sign convention of `scores`. No adapter, no
label: it sees what a pair is about, not whether its answer is right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hyperinf_ops.errors import DataError

__all__ = ["embed_records", "example_text", "target_similarity"]


def example_text(record: Mapping[str, Any], task: str) -> str:
    """The text of one record that is embedded: `text` (classification), or `prompt`, newline, `response`."""
    return f"{record['prompt']}\n{record['response']}" if task == "causal_lm" else str(record["text"])


def target_similarity(pool: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N,) cosine of each L2-normalised pool embedding (N, h) to the mean direction of the target's (M, h)."""
    if target.ndim != 2 or pool.ndim != 2 or len(target) == 0 or target.shape[1] != pool.shape[1]:
        raise DataError(f"similarity needs pool (N, h) and target (M >= 1, h) embeddings, got {pool.shape} and "
                        f"{target.shape}")
    centre = target.astype(np.float64).mean(0)
    norm = float(np.linalg.norm(centre))
    if norm == 0:
        raise DataError("the target set's embeddings cancel out: no direction to compare with")
    return pool.astype(np.float64) @ (centre / norm)


def embed_records(model_path: Any, records: Sequence[Mapping[str, Any]], task: str, max_length: int) -> np.ndarray:
    """(N, h) frozen embeddings of `records` (`example_text` of each)."""
    from hyperinf_ops.signals.probe import frozen_embeddings

    return frozen_embeddings(model_path, [example_text(r, task) for r in records], max_length=max_length)
