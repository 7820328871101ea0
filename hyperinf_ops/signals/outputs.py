"""What a model says about N examples, kept from a pass that runs anyway (the gradient pass, an evaluation).

    losses   (N,)     the task's per-example loss (classification: cross-entropy of the given class;
                      causal LM: mean next-token cross-entropy over the response)
    logits   (N, C)   tasks with classes only; with the given class ids `targets` (N,)
    exact    (N,)     tasks without classes, when asked for (evaluation.py): whether greedy decoding reproduces
                      the response, i.e. the argmax at every response position, given the gold prefix, is the
                      gold token up to and including the first end-of-sequence token (exact match)

From them: the margin `z_y - max_{c != y} z_c` (margins.py), the class probabilities softmax(z) and whether the
argmax is the given label. Everything on the CPU in float64 (int64 for targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hyperinf_ops.signals.margins import classification_margins

__all__ = ["ExampleOutputs", "exact_matches"]


@dataclass(frozen=True)
class ExampleOutputs:
    """Per-example loss (N,) and, for tasks with classes, logits (N, C) and the given class ids (N,); without
    classes, optionally the exact-match flags (N,)."""

    losses: Tensor
    logits: Tensor | None = None
    targets: Tensor | None = None
    exact: Tensor | None = None

    @classmethod
    def of(cls, losses: Tensor, logits: Tensor | None, targets: Tensor | None) -> ExampleOutputs:
        """Detached CPU copies (float64 / int64); logits and targets only for tasks with classes (2-d logits)."""
        classes = logits is not None and logits.dim() == 2 and targets is not None and targets.dim() == 1
        return cls(losses=losses.detach().double().cpu(),
                   logits=logits.detach().double().cpu() if classes else None,
                   targets=targets.detach().long().cpu() if classes else None)

    @classmethod
    def cat(cls, parts: Sequence[ExampleOutputs]) -> ExampleOutputs:
        if not parts:
            raise ValueError("no outputs to concatenate")
        classes, exact = parts[0].logits is not None, parts[0].exact is not None
        return cls(losses=torch.cat([p.losses for p in parts]),
                   logits=torch.cat([p.logits for p in parts]) if classes else None,
                   targets=torch.cat([p.targets for p in parts]) if classes else None,
                   exact=torch.cat([p.exact for p in parts]) if exact else None)

    def __len__(self) -> int:
        return len(self.losses)

    def select(self, keep: Tensor) -> ExampleOutputs:
        """The rows where the (N,) bool mask `keep` is true."""
        keep = keep.cpu()
        return ExampleOutputs(self.losses[keep], None if self.logits is None else self.logits[keep],
                              None if self.targets is None else self.targets[keep],
                              None if self.exact is None else self.exact[keep])

    @property
    def margins(self) -> Tensor | None:
        """(N,) logit of the given class minus the largest other logit (None without classes)."""
        return None if self.logits is None else classification_margins(self.logits, self.targets)

    @property
    def probabilities(self) -> Tensor | None:
        """(N, C) softmax of the logits (None without classes)."""
        return None if self.logits is None else torch.softmax(self.logits, dim=1)

    @property
    def correct(self) -> Tensor | None:
        """(N,) bool: the argmax is the given class; without classes, the exact match (None when not computed)."""
        return self.exact if self.logits is None else self.logits.argmax(1) == self.targets


def exact_matches(logits: Tensor, targets: Tensor, eos_token_id: int | None, ignore_index: int = -100) -> Tensor:
    """(B,) bool: for next-token logits (B, T, V) and shifted targets (B, T) (`ignore_index` off the response),
    whether the argmax equals the target at every response position up to and including the first target that
    is `eos_token_id` (later targets, e.g. a template's newline after it, are never generated). With an eos id, a
    response without it among its targets (cut at max_length) is not an exact match: its ending was never checked."""
    valid = targets != ignore_index
    complete = valid.any(1)
    if eos_token_id is not None:
        is_eos = (targets == eos_token_id) & valid
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first eos
        valid &= ~after
        complete &= is_eos.any(1)
    hit = logits.argmax(-1) == targets
    return (hit | ~valid).all(1) & complete
