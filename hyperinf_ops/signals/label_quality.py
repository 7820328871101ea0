"""Label quality from predicted probabilities, scored by the `cleanlab` library (not a copy of it).

Given each example's given class id y_k and predicted class probabilities P_k (C,), cleanlab's
`get_label_quality_scores` gives a score in [0, 1] (its default `self_confidence`: P_k[y_k]; higher = the label is
more likely right) and `find_label_issues` a boolean mask of the examples whose label is likely wrong (confident
learning: per-class thresholds on the probabilities, the joint of given and likely-true labels estimated from them,
and the examples to prune by the estimated noise rates). The suggested label is argmax_c P_k[c].

The probabilities must be out-of-sample (cross_fit.py: each example predicted by a model that did not train on
it); in-sample probabilities of a model that memorised its labels make every label look right.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["LabelQuality", "assess_labels"]


@dataclass(frozen=True)
class LabelQuality:
    """Per example (N,): cleanlab's label-quality score (higher = keep), whether cleanlab marks the label as an
    issue, the suggested class id and its probability."""

    quality: np.ndarray
    issues: np.ndarray
    suggested: np.ndarray
    suggested_probability: np.ndarray


def assess_labels(labels: np.ndarray, pred_probs: np.ndarray) -> LabelQuality:
    """cleanlab's label quality of class ids `labels` (N,) under probabilities `pred_probs` (N, C) (rows sum to 1).

    Classes the pool has but no probability column covers are an error; a class no example carries is allowed
    (cleanlab needs every class among the labels for its noise estimate: without that, issues fall back to
    "the suggested label differs from the given one with probability > 0.5")."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(pred_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != len(labels) or probs.shape[1] < 2:
        raise ValueError(f"pred_probs must be (N={len(labels)}, C >= 2), got {probs.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must be class ids in [0, {probs.shape[1]}), got {labels.min()}..{labels.max()}")
    if not np.isfinite(probs).all() or np.abs(probs.sum(1) - 1).max(initial=0) > 1e-3:
        raise ValueError("pred_probs must be finite probabilities whose rows sum to 1")
    probs = probs / probs.sum(1, keepdims=True)
    suggested = probs.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns about small classes; the fallback below covers them
        quality = get_label_quality_scores(labels, probs)
        if len(np.unique(labels)) == probs.shape[1] and np.bincount(labels).min() >= 2:
            # n_jobs=1: cleanlab's default forks a multiprocessing pool, and a fork of a process holding torch's
            # and Dagster's threads can deadlock (seen under a Dagster step); one process is fast enough here
            issues = find_label_issues(labels, probs, n_jobs=1)
        else:
            issues = (suggested != labels) & (probs.max(1) > 0.5)
    return LabelQuality(quality=np.asarray(quality, dtype=np.float64), issues=np.asarray(issues, dtype=bool),
                        suggested=suggested, suggested_probability=probs[np.arange(len(labels)), suggested])
