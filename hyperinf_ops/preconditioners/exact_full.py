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

from hyperinf_ops.core.curvature import CurvaturePartial, damped_gfim
from hyperinf_ops.preconditioners.base import Batch, Prepared
from hyperinf_ops.preconditioners.exact import Exact
from hyperinf_ops.preconditioners.options import EstimatorOptions

__all__ = ["ExactFull"]


class ExactFull(Exact):
    """Exact's Cholesky inverse, of the damped full Fisher instead of the GFIM."""

    method = "exact_full"
    what = "damped full Fisher"

    @classmethod
    def prepare(cls, curvature: Mapping[str, CurvaturePartial], options: EstimatorOptions, *,
                device: torch.device | str | None = None) -> Prepared:
        missing = sorted(name for name, part in curvature.items() if part.full_sum is None)
        if missing:
            raise ValueError(f"exact_full needs the full Fisher: curvature of {missing} has no full_sum")
        return super().prepare(curvature, options, device=device)

    @staticmethod
    def width(shape: tuple[int, int]) -> int:
        return shape[0] * shape[1]

    @classmethod
    def damped(cls, curvature: Mapping[str, CurvaturePartial], names: list[str], options: EstimatorOptions,
               device: torch.device | str | None) -> Tensor:
        """(len(names), r*d, r*d) damped full Fishers of one r*d."""
        return torch.stack([damped_gfim(curvature[n], options.damping_ratio, full=True, device=device) for n in names])

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
