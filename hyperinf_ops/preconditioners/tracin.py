"""TracIn (one checkpoint): no inverse, the preconditioned vector is v itself (a gradient dot product).

Needs no curvature: `from_shapes` prepares it from the matrix shapes alone (damping NaN); `prepare`
records the damping of the given curvature for reference. Every matrix is applied, lambda = 0 or not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from hyperinf_ops.core.curvature import CurvaturePartial
from hyperinf_ops.preconditioners.base import Batch, MatrixDiagnostics, Prepared
from hyperinf_ops.preconditioners.method import Preconditioner, start
from hyperinf_ops.preconditioners.options import EstimatorOptions

__all__ = ["TracIn"]


class TracIn(Preconditioner):
    method = "tracin"
    needs_damping = False
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
        prepared.diagnostics = _diagnostics(prepared.damping)
        return prepared

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, int]], options: EstimatorOptions) -> Prepared:
        """TracIn for matrices name -> (r, d) without curvature: damping NaN."""
        damping = dict.fromkeys(sorted(shapes), math.nan)
        return Prepared(
            method=cls.method,
            options=options,
            shapes={name: tuple(shapes[name]) for name in damping},
            damping=damping,
            operators=dict.fromkeys(damping),
            diagnostics=_diagnostics(damping),
        )

    @staticmethod
    def apply(
        prepared: Prepared, vecs: dict[str, Tensor], train_batches: Iterable[Batch] | None
    ) -> dict[str, Tensor]:
        return {name: v.to(torch.float64) for name, v in vecs.items()}


def _diagnostics(damping: Mapping[str, float]) -> dict[str, MatrixDiagnostics]:
    return {name: MatrixDiagnostics(lam, 0, math.nan, True, math.nan) for name, lam in damping.items()}
