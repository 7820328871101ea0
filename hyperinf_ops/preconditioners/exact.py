"""Exact: the fp64 Cholesky inverse of each damped GFIM, the ground truth for HyperINF.

    prepare   A_l = G_l + lambda_l I (d, d) float64; L_l = cholesky(A_l); M_l = A_l^-1 = cholesky_inverse(L_l),
              one batched factorisation per width d
    apply     v M_l for v (K, r, d), in float64

Diagnostics per matrix: residual ||I - A M||_F / sqrt(d), converged when within the fp64 tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor

from hyperinf_ops.core.inverse import default_tol
from hyperinf_ops.errors import NotPositiveDefiniteError
from hyperinf_ops.preconditioners.base import Batch, Prepared
from hyperinf_ops.preconditioners.method import Factor, Preconditioner, times_operator
from hyperinf_ops.preconditioners.options import EstimatorOptions

__all__ = ["Exact", "cholesky_inverses"]


def cholesky_inverses(a: Tensor, names: list[str], what: str) -> tuple[Tensor, list[float]]:
    """Inverses (B, m, m) of the SPD float64 stack a (B, m, m) and their residuals ||I - A X||_F / sqrt(m).

    Raises NotPositiveDefiniteError naming the matrices (`names`, one per batch entry) whose `what`
    (e.g. "damped GFIM") has no Cholesky factor.
    """
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        bad = [names[i] for i in (info != 0).nonzero().flatten().tolist()]
        raise NotPositiveDefiniteError(f"{what} of {bad} is not positive definite (Cholesky failed)")
    # Row-major like every stored operator: the batched result is column-major, and a matmul's rounding
    # depends on the layout, so a reloaded (row-major) artifact would not apply bitwise the same.
    inverse = torch.cholesky_inverse(chol).contiguous()
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    residual = torch.linalg.matrix_norm(eye - a @ inverse) / math.sqrt(a.shape[-1])
    return inverse, residual.tolist()


class Exact(Preconditioner):
    method = "exact"
    supports_self_influence = True

    always_fp64 = True
    what: ClassVar[str] = "damped GFIM"

    @classmethod
    def factor(cls, a: Tensor, names: list[str], options: EstimatorOptions) -> list[Factor]:
        inverse, residual = cholesky_inverses(a, names, cls.what)  # one batched factorisation per width
        tol = default_tol(torch.float64)
        return [Factor(inv, 0, res, res <= tol) for inv, res in zip(inverse, residual, strict=True)]

    @staticmethod
    def apply(
        prepared: Prepared, vecs: dict[str, Tensor], train_batches: Iterable[Batch] | None
    ) -> dict[str, Tensor]:
        return times_operator(prepared, vecs, torch.float64)
