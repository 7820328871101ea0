"""LiSSA: the truncated Neumann series of each damped GFIM, with the matrix and its scale prepared.

    prepare   A_l = G_l + lambda_l I (d, d) in options.dtype, stored as float64 (exact round trip);
              s_l = options.lissa_scale, or ||A_l||_F >= lambda_max(A_l), which makes I - A_l / s_l a
              contraction on the SPD A_l
    apply     r <- v + r (I - A_l / s_l), lissa_iterations times from r = v, answer r / s_l (options.dtype)

The truncation error -v (I - A_l / s_l)^(t+1) depends on v, so the prepared diagnostics carry residual NaN
and converged=True (nothing has run yet; iterations = the series length, scale = s_l); `measure` replaces
both with the relative solve residual ||x A_l - v||_F / ||v||_F of applied vectors, converged when it is
within the working dtype's tolerance (estimators.precondition reports these, as before).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from hyperinf_ops.core.inverse import default_tol
from hyperinf_ops.preconditioners.base import Batch, MatrixDiagnostics, Prepared
from hyperinf_ops.preconditioners.method import Factor, Preconditioner
from hyperinf_ops.preconditioners.options import EstimatorOptions

__all__ = ["LiSSA"]


class LiSSA(Preconditioner):
    method = "lissa"

    @classmethod
    def factor(cls, a: Tensor, names: list[str], options: EstimatorOptions) -> list[Factor]:
        scales = torch.linalg.matrix_norm(a).tolist() if options.lissa_scale is None else \
            [options.lissa_scale] * len(names)
        return [Factor(m.to(torch.float64), options.lissa_iterations, scale=s) for m, s in zip(a, scales, strict=True)]

    @staticmethod
    def apply(
        prepared: Prepared, vecs: dict[str, Tensor], train_batches: Iterable[Batch] | None
    ) -> dict[str, Tensor]:
        dtype = prepared.options.torch_dtype
        out = {}
        for name, v in vecs.items():
            k, r, d = v.shape
            a = prepared.operators[name].to(device=v.device, dtype=dtype)
            scale = prepared.diagnostics[name].scale
            rhs = v.reshape(k * r, d).to(dtype)
            step = torch.eye(d, dtype=dtype, device=v.device) - a / scale
            acc = rhs
            for _ in range(prepared.options.lissa_iterations):
                acc = torch.addmm(rhs, acc, step)  # r <- v + r (I - A / s)
            out[name] = (acc / scale).reshape(k, r, d).to(torch.float64)
        return out

    @staticmethod
    def measure(
        prepared: Prepared, vecs: Mapping[str, Tensor], out: Mapping[str, Tensor]
    ) -> dict[str, MatrixDiagnostics]:
        dtype = prepared.options.torch_dtype
        tol = default_tol(dtype)
        diagnostics = dict(prepared.diagnostics)
        for name, a64 in prepared.operators.items():
            if a64 is None:
                continue
            d = a64.shape[0]
            # In the working dtype, where the series ran (out is its exact float64 image).
            rhs = vecs[name].reshape(-1, d).to(dtype)
            x = out[name].reshape(-1, d).to(dtype)
            a = a64.to(device=rhs.device, dtype=dtype)
            denom = float(torch.linalg.matrix_norm(rhs))
            residual = float(torch.linalg.matrix_norm(x @ a - rhs)) / denom if denom > 0 else 0.0
            diagnostics[name] = dataclasses.replace(
                diagnostics[name], residual=residual, converged=residual <= tol
            )
        return diagnostics
