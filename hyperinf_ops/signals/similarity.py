"""Embedding similarity to a target set: the plain baseline a user tries before gradients (the strongest
non-gradient baseline of the LESS paper, representation-based selection).

For example k with e_k the L2-normalised masked mean of the base model's last hidden state over its text
(signals/probe.py; a causal LM's pair as its training sees it: prompt then response in the model's chat template,
an over-long pair's prompt end and response start) and a target set T,

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
from hyperinf_ops.progress import ProgressCallback

__all__ = ["EMBEDDING_VERSION", "embed_records", "target_similarity"]

# In the similarity signal's source key: a new version recomputes stored values (2: a causal LM's pair embedded as
# its training sees it, where 1 embedded "prompt\nresponse" cut at its end).
EMBEDDING_VERSION = 2


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


def embed_records(model_path: Any, records: Sequence[Mapping[str, Any]], task: str, max_length: int, *,
                  progress: ProgressCallback | None = None) -> np.ndarray:
    """(N, h) frozen embeddings of `records`: a classifier's `text` (its first max_length tokens); a causal LM's
    prompt and response tokens as its training sees them (the model's chat template, eos, and an over-long pair's
    prompt end and response start: `CausalLM.fitted_ids`). `progress`: as `probe.token_embeddings`."""
    from hyperinf_ops.signals.probe import frozen_embeddings, load_tokenizer, token_embeddings

    if task != "causal_lm":
        return frozen_embeddings(model_path, [str(r["text"]) for r in records], max_length=max_length,
                                 progress=progress)
    from hyperinf_ops.tasks import CausalLM

    tokenizer = load_tokenizer(model_path)
    ids = [sum(CausalLM.fitted_ids(tokenizer, r, max_length), []) for r in records]
    return token_embeddings(model_path, ids, tokenizer.pad_token_id, progress=progress)
