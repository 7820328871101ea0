"""Classification margins and the area under the margin (AUM) of the warm-up.

For an example with logits z (C,) and given label y, the margin is

    m = z_y - max_{c != y} z_c

(> 0 when the model predicts the given label, < 0 when it prefers another). AUM (Pleiss et al., NeurIPS 2020,
"Identifying Mislabeled Data using the Area Under the Margin Ranking") is the mean of an example's margins over
the training steps that saw it: a mislabeled example is pulled towards its given label only by memorisation,
so its margin stays low or negative through training while a clean example's grows early. Recorded during the
warm-up from the logits of the training forward pass itself (dropout on, before the step's update): no extra
pass. Higher = more likely correct, so `aum` is stored as the score as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

__all__ = ["MarginHistory", "classification_margins"]


def classification_margins(logits: Tensor, targets: Tensor) -> Tensor:
    """(B,) margins `z_y - max_{c != y} z_c` of logits (B, C) at the given class ids targets (B,), in float64."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"margins need (B, C >= 2) logits, got shape {tuple(logits.shape)}")
    z = logits.detach().double()
    given = z.gather(1, targets.view(-1, 1)).squeeze(1)
    others = z.scatter(1, targets.view(-1, 1), float("-inf")).amax(1)
    return given - others


class MarginHistory:
    """Every margin each example had while the warm-up trained on it (sample_id -> running sum and count)."""

    def __init__(self) -> None:
        self._sum: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def record(self, sample_ids: Sequence[str], margins: Tensor) -> None:
        """Add one training step's margins (B,) of the examples `sample_ids` (B,)."""
        for sample_id, margin in zip(sample_ids, margins.tolist(), strict=True):
            key = str(sample_id)
            self._sum[key] = self._sum.get(key, 0.0) + margin
            self._count[key] = self._count.get(key, 0) + 1

    def __len__(self) -> int:
        return len(self._sum)

    def aum(self) -> Mapping[str, float]:
        """sample_id -> mean margin over the steps that trained on it (the AUM)."""
        return {key: total / self._count[key] for key, total in self._sum.items()}
