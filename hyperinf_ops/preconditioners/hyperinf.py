"""HyperINF: the Schulz / hyperpower inverse of each damped GFIM, stored and applied as one matmul.

    prepare   X_l ~ (G_l + lambda_l I)^-1 (d, d) by `inverse.schulz_inverse` in options.dtype, one batched
              call per width d (all matrices of a width invert together); stored as float64
    apply     v X_l for v (K, r, d), in options.dtype (an fp32 inverse round-trips float64 exactly)

Diagnostics per matrix: the Schulz steps of its batch, residual ||I - A X||_F / sqrt(d), converged when
the residual is within the solver's tolerance. A non-converged inverse raises InverseNotConvergedError
unless options.allow_unconverged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from hyperinf_ops.curvature import CurvaturePartial
from hyperinf_ops.errors import InverseNotConvergedError
from hyperinf_ops.inverse import InverseResult, schulz_inverse
from hyperinf_ops.preconditioners.base import Batch, MatrixDiagnostics, Preconditioner, Prepared
from hyperinf_ops.preconditioners.options import EstimatorOptions
from hyperinf_ops.preconditioners.shared import (
    condition_estimates,
    damped_stack,
    finish,
    live_groups,
    start,
    times_operator,
)

__all__ = ["HyperInf", "schulz_with_options"]


def schulz_with_options(a: Tensor, options: EstimatorOptions) -> InverseResult:
    """`schulz_inverse` of (..., d, d) damped GFIMs with the estimator options' solver settings."""
    return schulz_inverse(
        a,
        order=options.schulz_order,
        tol=options.schulz_tol,
        max_iter=options.schulz_max_iter,
        init=options.init,
        paper_alpha=options.paper_alpha,
        extra_damping=options.paper_extra_damping,
    )


class HyperInf(Preconditioner):
    method = "hyperinf"
    supports_self_influence = True

    @classmethod
    def prepare(
        cls,
        curvature: Mapping[str, CurvaturePartial],
        options: EstimatorOptions,
        *,
        device: torch.device | str | None = None,
    ) -> Prepared:
        prepared = start(curvature, options)
        for names in live_groups(prepared):
            a = damped_stack(curvature, names, options, options.torch_dtype, device)
            result = schulz_with_options(a, options)
            residual = result.residual.tolist()
            cond = condition_estimates(a, [prepared.damping[n] for n in names])
            for i, name in enumerate(names):
                prepared.operators[name] = result.inverse[i].to(torch.float64)
                prepared.diagnostics[name] = MatrixDiagnostics(
                    prepared.damping[name], result.iterations, residual[i], residual[i] <= result.tol, cond[i]
                )
        finish(prepared)
        if not options.allow_unconverged:
            _raise_unconverged(prepared)
        return prepared

    @staticmethod
    def apply(
        prepared: Prepared, vecs: dict[str, Tensor], train_batches: Iterable[Batch] | None
    ) -> dict[str, Tensor]:
        return times_operator(prepared, vecs, prepared.options.torch_dtype)


def _raise_unconverged(prepared: Prepared) -> None:
    """InverseNotConvergedError naming the first (sorted) matrix whose inverse missed its tolerance."""
    options = prepared.options
    for name, info in prepared.diagnostics.items():
        if not info.converged:
            hint = (
                "init='paper' diverges when lambda_max > 2 / paper_alpha; use init='scaled'"
                if options.init == "paper"
                else "use dtype=torch.float64, a larger damping_ratio or schulz_max_iter, or method='exact'"
            )
            raise InverseNotConvergedError(
                f"Schulz inverse of {name!r} stopped at relative residual {info.residual:.3g} after "
                f"{info.iterations} iterations (condition estimate {info.condition_estimate:.3g}, "
                f"dtype {options.torch_dtype}); {hint}"
            )
