"""HyperINF: the Schulz / hyperpower inverse of each damped GFIM, stored and applied as one matmul.

    prepare   X_l ~ (G_l + lambda_l I)^-1 (d, d) by `inverse.schulz_inverse` in options.dtype, one batched
              call per width d (all matrices of a width invert together); stored as float64
    apply     v X_l for v (K, r, d), in options.dtype (an fp32 inverse round-trips float64 exactly)

Diagnostics per matrix: the Schulz steps of its batch, residual ||I - A X||_F / sqrt(d), converged when
the residual is within the solver's tolerance. A non-converged inverse raises InverseNotConvergedError
unless options.allow_unconverged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor

from hyperinf_ops.core.inverse import InverseResult, schulz_inverse
from hyperinf_ops.errors import InverseNotConvergedError
from hyperinf_ops.preconditioners.base import Batch, Prepared
from hyperinf_ops.preconditioners.method import Factor, Preconditioner, times_operator
from hyperinf_ops.preconditioners.options import EstimatorOptions

__all__ = ["HyperInf", "schulz_with_options"]


def schulz_with_options(a: Tensor, options: EstimatorOptions) -> InverseResult:
    """`schulz_inverse` of (..., d, d) damped GFIMs with the estimator options' solver settings.

    A float64 solve from the scaled start runs its first, long stretch of iterations in float32 (twice the
    matmul speed on CPU, far more on GPU) until float32's rounding floor, then polishes in float64 from there:
    the residual squares every step, so one or two float64 steps take ~1e-4 to the float64 tolerance.
    """
    settings = {"order": options.schulz_order, "max_iter": options.schulz_max_iter, "init": options.init,
                "paper_alpha": options.paper_alpha, "extra_damping": options.paper_extra_damping}
    if a.dtype != torch.float64 or options.init != "scaled":
        return schulz_inverse(a, tol=options.schulz_tol, **settings)
    warm = schulz_inverse(a.float(), **settings)
    polished = schulz_inverse(a, tol=options.schulz_tol, start=warm.inverse, **settings)
    return dataclasses.replace(polished, iterations=warm.iterations + polished.iterations)


class HyperInf(Preconditioner):
    method = "hyperinf"
    supports_self_influence = True

    @classmethod
    def factor(cls, a: Tensor, names: list[str], options: EstimatorOptions) -> list[Factor]:
        result = schulz_with_options(a, options)  # one batched call for the whole width group
        return [Factor(inv.to(torch.float64), result.iterations, res, res <= result.tol)
                for inv, res in zip(result.inverse, result.residual.tolist(), strict=True)]

    @classmethod
    def check(cls, prepared: Prepared) -> Prepared:
        if not prepared.options.allow_unconverged:
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
