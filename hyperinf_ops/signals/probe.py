"""A linear probe of the base model's frozen embeddings: out-of-fold class probabilities of a logistic regression
on mean-pooled hidden states, the cheapest independent view of every label.

For example k with text embedding e_k = mean over its tokens of the base model's last hidden state (no adapter,
L2-normalised) and given class y_k, the probe's probabilities P_k come from a logistic regression trained on the
other folds (stratified, seeded; `folds` of them), so no example is scored by a model that saw its label. It is
the baseline a user writes in twenty lines (cleanlab on a frozen-embedding classifier) and, fused with the
fine-tuned warm-up's loss and influence, a view those do not share: a linear model on pre-trained features
cannot memorise a flipped label the way fine-tuning does. Cost: one forward pass of the pool through the base
model, and `folds` logistic regressions (seconds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hyperinf_ops.progress import ProgressCallback, ProgressMeter, tenths

__all__ = ["frozen_embeddings", "load_tokenizer", "out_of_fold_probe", "token_embeddings"]


def frozen_embeddings(model_path: str | Path, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 64,
                      device: torch.device | str = "cpu", progress: ProgressCallback | None = None) -> np.ndarray:
    """(N, hidden) L2-normalised masked means of the base model's last hidden state over each text's tokens (its
    first max_length)."""
    tokenizer = load_tokenizer(model_path)
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return token_embeddings(model_path, ids, tokenizer.pad_token_id, batch_size=batch_size, device=device,
                            progress=progress)


def load_tokenizer(model_path: str | Path) -> Any:
    """The model's tokenizer, padding with eos (or unk) when it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@torch.no_grad()
def token_embeddings(model_path: str | Path, token_ids: Sequence[Sequence[int]], pad_token_id: int, *,
                     batch_size: int = 64, device: torch.device | str = "cpu",
                     progress: ProgressCallback | None = None) -> np.ndarray:
    """(N, hidden) L2-normalised masked means of the base model's last hidden state over each row of token ids
    (right-padded per batch); `progress` hears about ten times over the pass."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_path).to(device).eval()
    meter = ProgressMeter("embeddings", len(token_ids), progress, every=1, step=tenths(len(token_ids)))
    out = []
    for start in range(0, len(token_ids), batch_size):
        rows = token_ids[start: start + batch_size]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids, dtype=torch.long), 1
        hidden = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float()
        weights = mask.to(device)[..., None].to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        out.append(torch.nn.functional.normalize(pooled, dim=1).cpu())
        meter.update(len(rows))
    meter.finish()
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def out_of_fold_probe(embeddings: np.ndarray, labels: Sequence[Any], classes: Sequence[str], *, folds: int = 5,
                      seed: int = 0) -> np.ndarray:
    """(N, C) out-of-fold logistic-regression probabilities of each example's class, columns in `classes` order
    (stratified folds, fewer when a class has fewer examples than `folds`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    index: Mapping[str, int] = {str(c): i for i, c in enumerate(classes)}
    y = np.array([index[str(label)] for label in labels])
    present = np.unique(y)
    k = int(max(2, min(folds, np.bincount(y)[present].min())))
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    probs = cross_val_predict(LogisticRegression(max_iter=2000), embeddings, y, cv=split, method="predict_proba")
    out = np.zeros((len(y), len(classes)))
    out[:, present] = probs  # a class no example carries gets probability 0
    return out
