"""How a method builds its Prepared: the template every method follows, and the helpers it uses.

`Preconditioner.prepare` = `start` (shapes name -> (r, d) and lambda_l from the curvature) -> for each group of
`live_groups` (the matrices with lambda_l > 0, one width d) the damped stack (`damped`, `curvature.damped_gfim`
in the method's working dtype) -> the method's `factor` of that stack (the operators it stores and the solver's
facts: one batched solve per width, in stacks of at most STACK_BYTES) -> `finish` (the lambda_l = 0 matrices:
no operator, nothing inverted, converged; every dict in sorted key order) -> `check` (hyperinf refuses a
non-converged inverse).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hyperinf_ops.core.curvature import CurvaturePartial, damped_gfim
from hyperinf_ops.core.inverse import spectral_upper_bound
from hyperinf_ops.errors import GradientMismatchError
from hyperinf_ops.preconditioners.base import Batch, MatrixDiagnostics, Prepared
from hyperinf_ops.preconditioners.options import EstimatorOptions

__all__ = ["Factor", "Preconditioner", "condition_estimates", "damped_stack", "finish", "live_groups", "start",
           "times_operator"]


@dataclass(frozen=True)
class Factor:
    """What a method keeps of one damped matrix: its stored operator (None: nothing stored) and the solver's
    iterations, residual, convergence and (lissa) scale."""

    operator: Tensor | None = None
    iterations: int = 0
    residual: float = math.nan
    converged: bool = True
    scale: float | None = None


# The largest float64 stack one batched solve takes: a solve holds ~6 working copies of its stack (Schulz in
# float32 then float64). SmolLM2's 90 q/v matrices of 576 in one stack (239 MB) peaked at +1.7 GB; in stacks of
# 64 MB the same solves take the same time. MiniLM's 24 matrices of 384 (28 MB) stay one stack.
STACK_BYTES = 64 << 20

_UNDAMPED = MatrixDiagnostics(
    damping=0.0, iterations=0, residual=math.nan, converged=True, condition_estimate=math.nan
)



class Preconditioner(ABC):
    """One influence method: `prepare` builds a Prepared, `apply` uses it. The state lives in the Prepared."""

    method: ClassVar[str]
    # The method divides by lambda: a matrix with lambda = 0 gets zeros (base.py's module docstring).
    needs_damping: ClassVar[bool] = True
    # Prepared.self_influence is one matmul per matrix (a stored inverse or the identity).
    supports_self_influence: ClassVar[bool] = False
    # Solves in float64 whatever options.dtype says (exact, exact_full, datainf's prepare).
    always_fp64: ClassVar[bool] = False

    @classmethod
    def prepare(cls, curvature: Mapping[str, CurvaturePartial], options: EstimatorOptions, *,
                device: torch.device | str | None = None) -> Prepared:
        """Everything v-independent, on `device` (default: the curvature's). Keys sorted."""
        prepared = start(curvature, options)
        for names in live_groups(prepared, cls.width):
            a = cls.damped(curvature, names, options, device)
            lams = [prepared.damping[n] for n in names]
            factors = cls.factor(a, names, options)
            for name, lam, cond, f in zip(names, lams, condition_estimates(a, lams), factors, strict=True):
                prepared.operators[name] = f.operator
                prepared.diagnostics[name] = MatrixDiagnostics(lam, f.iterations, f.residual, f.converged, cond,
                                                               f.scale)
        return cls.check(finish(prepared))

    @staticmethod
    def width(shape: tuple[int, int]) -> int:
        """The side of the matrix the method inverts for gradients of this (r, d) shape: d."""
        return shape[1]

    @classmethod
    def damped(cls, curvature: Mapping[str, CurvaturePartial], names: list[str], options: EstimatorOptions,
               device: torch.device | str | None) -> Tensor:
        """(len(names), d, d) damped GFIMs of one width, in the method's working dtype."""
        return damped_stack(curvature, names, options, torch.float64 if cls.always_fp64 else options.torch_dtype,
                            device)

    @classmethod
    def factor(cls, a: Tensor, names: list[str], options: EstimatorOptions) -> list[Factor]:
        """The method's work on a damped stack a (B, m, m): one Factor per matrix. Default: nothing stored."""
        return [Factor() for _ in names]

    @classmethod
    def check(cls, prepared: Prepared) -> Prepared:
        """Refuse a Prepared that must not be used (default: every Prepared is usable)."""
        return prepared

    @staticmethod
    @abstractmethod
    def apply(prepared: Prepared, vecs: dict[str, Tensor], train_batches: Iterable[Batch] | None
              ) -> dict[str, Tensor]:
        """vecs: the validated (K, r, d) stacks of the matrices to solve; float64 (K, r, d) each."""

    @staticmethod
    def measure(prepared: Prepared, vecs: Mapping[str, Tensor], out: Mapping[str, Tensor]
                ) -> dict[str, MatrixDiagnostics]:
        """Diagnostics of out = apply(vecs); the prepared ones unless the method can measure on vectors."""
        return dict(prepared.diagnostics)


def start(curvature: Mapping[str, CurvaturePartial], options: EstimatorOptions) -> Prepared:
    """A Prepared with shapes name -> (r, d) and damping from `curvature` (keys sorted), no operators and
    no diagnostics yet."""
    if not curvature:
        raise GradientMismatchError("curvature dict is empty: no LoRA matrices")
    shapes, damping = {}, {}
    for name in sorted(curvature):
        part = curvature[name]
        d = part.gfim_sum.shape[-1]
        if part.gfim_sum.shape != (d, d) or d == 0 or part.numel % d:
            raise GradientMismatchError(
                f"curvature of {name!r}: sums of shape {tuple(part.gfim_sum.shape)} do not fit "
                f"{part.numel} entries"
            )
        shapes[name] = (part.numel // d, d)
        damping[name] = part.damping(options.damping_ratio)
    return Prepared(options.method, options, shapes, damping, dict.fromkeys(shapes), {})


def live_groups(prepared: Prepared, width: Callable[[tuple[int, int]], int] = lambda shape: shape[1],
                ) -> list[list[str]]:
    """Names with lambda > 0, grouped by the inverted side `width(shape)` (ascending; default d), so each group
    stacks into one batched solve; a group whose float64 stack would pass STACK_BYTES is split into stacks of
    at most that size (sorted name order), so a solve's working copies stay bounded however many matrices a
    model has."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, shape in prepared.shapes.items():
        if prepared.damping[name] > 0:
            groups[width(shape)].append(name)
    out = []
    for w in sorted(groups):
        size = max(1, STACK_BYTES // (8 * w * w))
        out += [groups[w][i: i + size] for i in range(0, len(groups[w]), size)]
    return out


def damped_stack(
    curvature: Mapping[str, CurvaturePartial],
    names: list[str],
    options: EstimatorOptions,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    """(len(names), d, d) stack of the damped GFIMs of `names` (one width) in `dtype` on `device`."""
    return torch.stack(
        [damped_gfim(curvature[n], options.damping_ratio, dtype=dtype, device=device) for n in names]
    )


def condition_estimates(a: Tensor, lams: list[float]) -> list[float]:
    """spectral_upper_bound(A_i) / lambda_i >= cond(A_i) for A_i = G_i + lambda_i I, G_i PSD; a: (B, m, m)."""
    return (spectral_upper_bound(a) / torch.tensor(lams, dtype=a.dtype, device=a.device)).tolist()


def finish(prepared: Prepared) -> Prepared:
    """The lambda = 0 matrices' diagnostics (those `live_groups` skipped), every dict in sorted key order."""
    prepared.operators = {name: prepared.operators[name] for name in prepared.shapes}
    prepared.diagnostics = {name: prepared.diagnostics.get(name, _UNDAMPED) for name in prepared.shapes}
    return prepared


def times_operator(prepared: Prepared, vecs: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """v M_l for every stack v (K, r, d) and stored (d, d) operator M_l, computed in `dtype`; float64 out."""
    return {
        name: (v.to(dtype) @ prepared.operators[name].to(device=v.device, dtype=dtype)).to(torch.float64)
        for name, v in vecs.items()
    }
