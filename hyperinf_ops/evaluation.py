"""How well a LoRA model fits held-out examples: mean loss, accuracy and the majority-class baseline.

For N examples with per-example losses l_k (the task's own loss: cross-entropy of the class id, or the mean
next-token cross-entropy of the response tokens) `loss = (1/N) sum_k l_k`; for tasks with classes
`accuracy = (1/N) #{k : argmax logits_k = y_k}` (causal LM: the exact match, the share of examples whose
greedy decoding reproduces the response, outputs.exact_matches) and the majority baseline is the accuracy of a model that
learned only the class prior of its training rows: the share of the evaluated examples whose label is the
training rows' most common label. A warm-up "learns" when its held-out accuracy beats that baseline
(classification) or its held-out loss falls below the untrained model's (causal LM).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hyperinf_ops.models.lora import LoadedModel, batches
from hyperinf_ops.signals.outputs import ExampleOutputs, exact_matches

__all__ = ["EvalResult", "MajorityBaseline", "evaluate_model", "example_losses", "example_outputs", "majority_baseline"]


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and accuracy (causal LM: exact match) of a model over `examples` records."""

    examples: int
    loss: float
    accuracy: float | None


@dataclass(frozen=True)
class MajorityBaseline:
    """The training rows' most common label and the share of evaluated examples that carry it."""

    label: str
    accuracy: float


@torch.no_grad()
def example_outputs(loaded: LoadedModel, records: Sequence[Mapping[str, Any]], *, batch_size: int = 64,
                    max_length: int = 128) -> ExampleOutputs:
    """What `loaded.model` says about each of `records` in eval mode (dropout off): per-example loss (N,) and, for
    tasks with classes, logits (N, C) and the given class ids, else the exact-match flags; the model's mode is
    restored."""
    if not records:
        raise ValueError("nothing to evaluate: no records")
    model, task = loaded.model, loaded.task
    was_training = model.training
    model.eval()
    parts = []
    try:
        for _, batch in batches(loaded, records, batch_size, max_length):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            targets = task.loss_targets(model, batch["labels"], batch["attention_mask"])
            out = ExampleOutputs.of(task.per_example_losses(logits, targets), logits, targets)
            if out.logits is None:
                out = ExampleOutputs(out.losses, exact=exact_matches(logits, targets,
                                                                     loaded.tokenizer.eos_token_id).cpu())
            parts.append(out)
    finally:
        model.train(was_training)
    return ExampleOutputs.cat(parts)


def example_losses(loaded: LoadedModel, records: Sequence[Mapping[str, Any]], *, batch_size: int = 64,
                   max_length: int = 128) -> tuple[Tensor, Tensor | None]:
    """Per-example loss (N,) of `loaded.model` on `records` (`example_outputs`), and for tasks with classes
    whether its argmax is the record's label (N,) bool."""
    out = example_outputs(loaded, records, batch_size=batch_size, max_length=max_length)
    return out.losses, out.correct


def evaluate_model(loaded: LoadedModel, records: Sequence[Mapping[str, Any]], *, batch_size: int = 64,
                   max_length: int = 128) -> EvalResult:
    """Mean loss and accuracy (`example_losses`) of `loaded.model` on `records`."""
    losses, correct = example_losses(loaded, records, batch_size=batch_size, max_length=max_length)
    return EvalResult(examples=len(records), loss=float(losses.mean()),
                      accuracy=None if correct is None else float(correct.double().mean()))


def majority_baseline(train_labels: Sequence[str], eval_labels: Sequence[str]) -> MajorityBaseline:
    """The constant predictor of the most common training label (ties: the first in sorted order), scored on
    `eval_labels`."""
    if not train_labels or not eval_labels:
        raise ValueError("the majority baseline needs training and evaluated labels")
    counts = Counter(map(str, train_labels))
    label = min(counts, key=lambda c: (-counts[c], c))
    return MajorityBaseline(label=label, accuracy=sum(str(y) == label for y in eval_labels) / len(eval_labels))
