"""Helpers the method modules share to build a Prepared from merged curvature, and to apply a stored matrix.

A method's `prepare` is: `start` (shapes name -> (r, d) and lambda_l from the curvature), then per group of
`live_groups` (matrices with lambda_l > 0 and one width d) a batched solve on `damped_stack`, then `finish`
(the lambda_l = 0 matrices: no operator, nothing inverted, converged; every dict in sorted key order).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import Tensor

from hyperinf_ops.curvature import CurvaturePartial, damped_gfim
from hyperinf_ops.errors import GradientMismatchError
from hyperinf_ops.inverse import spectral_upper_bound
from hyperinf_ops.preconditioners.base import MatrixDiagnostics, Prepared
from hyperinf_ops.preconditioners.options import EstimatorOptions

__all__ = ["condition_estimates", "damped_stack", "finish", "live_groups", "start", "times_operator"]

_UNDAMPED = MatrixDiagnostics(
    damping=0.0, iterations=0, residual=math.nan, converged=True, condition_estimate=math.nan
)


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


def live_groups(prepared: Prepared) -> list[list[str]]:
    """Names with lambda > 0, grouped by width d (ascending), so each group stacks into one batched solve."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, (_, d) in prepared.shapes.items():
        if prepared.damping[name] > 0:
            groups[d].append(name)
    return [groups[d] for d in sorted(groups)]


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
