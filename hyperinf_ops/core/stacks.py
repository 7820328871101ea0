"""Gradient stacks: `name -> (K, r, d)` tensors, one per LoRA matrix (a GradDict when K = n examples).

The one validation every consumer of such stacks runs (curvature sums, preconditioners, estimators), the
row-wise Frobenius inner product `sum_l <a_l[k], b_l[k]>_F` that turns preconditioned stacks into scores, and
the one rule for which LoRA matrices (stack keys) a `modules` selection keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hyperinf_ops.errors import GradientMismatchError, NonFiniteGradientError

__all__ = ["check_stack", "rowwise_inner", "select_matrices"]


def check_stack(vecs: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]] | None, role: str, *,
                examples: bool = False) -> int:
    """Validate name -> (K, r, d) stacks: one K, finite values, and (when `shapes` is given) the same names and
    (r, d) as shapes name -> (r, d); returns K. Named errors say which matrix and what is wrong; `examples`:
    the stacks are per-example gradients (K = n examples)."""
    axis, unit = ("n", "examples") if examples else ("K", "rows")
    if not vecs:
        raise GradientMismatchError(f"{role} dict is empty: no LoRA matrices")
    if shapes is not None and set(vecs) != set(shapes):
        only_v, only_s = sorted(set(vecs) - set(shapes)), sorted(set(shapes) - set(vecs))
        raise GradientMismatchError(
            f"{role} and prepared inverse disagree on LoRA matrices: only in {role} {only_v}, "
            f"only in the prepared inverse {only_s}"
        )
    k = None
    for name in sorted(vecs):
        x = vecs[name]
        expected = f"({axis}, r, d)" if shapes is None else f"({axis}, {shapes[name][0]}, {shapes[name][1]})"
        if x.ndim != 3 or (shapes is not None and tuple(x.shape[1:]) != tuple(shapes[name])):
            raise GradientMismatchError(f"{role} {name!r} has shape {tuple(x.shape)}, expected {expected}")
        if k is None:
            k = x.shape[0]
        elif x.shape[0] != k:
            raise GradientMismatchError(f"{role} {name!r} holds {x.shape[0]} {unit}, others {k}")
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteGradientError(f"{role} {name!r} holds NaN or inf")
    return k


def rowwise_inner(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """sum_l <a_l[k], b_l[k]>_F per row k of name -> (n, r, d) stacks with the same keys: (n,) float64."""
    names = sorted(a)
    out = torch.zeros(a[names[0]].shape[0], dtype=torch.float64, device=a[names[0]].device)
    for name in names:
        out = out + (a[name] * b[name].to(torch.float64)).sum((1, 2))
    return out


def select_matrices(names: Sequence[str], modules: Sequence[str] | str | None) -> list[str]:
    """The LoRA parameter names that contain one of the `modules` substrings (None = all), sorted.

    GradientMismatchError when nothing is selected. The same rule picks matrices from a live model and from
    an adapter manifest's recorded shapes.
    """
    if modules is None:
        return sorted(names)
    patterns = [modules] if isinstance(modules, str) else list(modules)  # a bare str is one pattern
    selected = sorted(n for n in names if any(p in n for p in patterns))
    if not selected:
        example = f" (e.g. {sorted(names)[0]!r})" if names else ""
        raise GradientMismatchError(f"modules={patterns} selects none of the {len(names)} LoRA matrices{example}")
    return selected
