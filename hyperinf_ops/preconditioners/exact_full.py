"""Exact full Fisher: the fp64 inverse of the damped full (r*d, r*d) Fisher, what the GFIM approximates.

    prepare   A_l = F_l + lambda_l I (r*d, r*d) float64, F_l = (1/n) sum_k vec(g_k) vec(g_k)^T (curvature
              computed with full=True), same lambda_l as the GFIM; M_l = A_l^-1 by Cholesky
    apply     vec(v) M_l for v (K, r, d), vec the row-major flatten, in float64

Quadratic memory in r*d: tiny models only. Diagnostics: residual ||I - A M||_F / sqrt(r*d).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from hyperinf_ops.curvature import CurvaturePartial, damped_full_fisher
from hyperinf_ops.inverse import default_tol
from hyperinf_ops.preconditioners.base import Batch, MatrixDiagnostics, Preconditioner, Prepared
from hyperinf_ops.preconditioners.exact import cholesky_inverses
from hyperinf_ops.preconditioners.options import EstimatorOptions
from hyperinf_ops.preconditioners.shared import condition_estimates, finish, start

__all__ = ["ExactFull"]


class ExactFull(Preconditioner):
    method = "exact_full"
    supports_self_influence = True

    @classmethod
    def prepare(
        cls,
        curvature: Mapping[str, CurvaturePartial],
        options: EstimatorOptions,
        *,
        device: torch.device | str | None = None,
    ) -> Prepared:
        missing = sorted(name for name, part in curvature.items() if part.full_sum is None)
        if missing:
            raise ValueError(f"exact_full needs the full Fisher: curvature of {missing} has no full_sum")
        prepared = start(curvature, options)
        tol = default_tol(torch.float64)
        # Widths r*d differ between matrices and each is quadratic in memory: one matrix at a time.
        for name, lam in prepared.damping.items():
            if lam > 0:
                a = damped_full_fisher(curvature[name], options.damping_ratio, device=device)[None]
                inverse, residual = cholesky_inverses(a, [name], "damped full Fisher")
                prepared.operators[name] = inverse[0]
                prepared.diagnostics[name] = MatrixDiagnostics(
                    lam, 0, residual[0], residual[0] <= tol, condition_estimates(a, [lam])[0]
                )
        return finish(prepared)

    @staticmethod
    def apply(
        prepared: Prepared, vecs: dict[str, Tensor], train_batches: Iterable[Batch] | None
    ) -> dict[str, Tensor]:
        out = {}
        for name, v in vecs.items():
            k = v.shape[0]
            m = prepared.operators[name].to(v.device)
            out[name] = (v.reshape(k, -1).to(torch.float64) @ m).reshape(v.shape)
        return out
