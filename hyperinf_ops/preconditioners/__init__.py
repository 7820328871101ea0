"""Preconditioners: the inverse of the damped GFIM as a prepared artifact (prepare once, apply many times).

    prepared = prepare(curvature, EstimatorOptions(method="hyperinf"))   # the O(d^3) work, once
    pv = prepared.apply_one(v)                                          # v (G + lambda I)^-1 per matrix
    pvs = prepared.apply(stacks)                                        # name -> (K, r, d), no solve

One module per method; base.py has the artifact (`Prepared`) and the formulas, method.py the template every
method's `prepare` follows; serialize.py stores a Prepared as an Arrow table, one row per LoRA matrix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hyperinf_ops.core.curvature import CurvaturePartial
from hyperinf_ops.preconditioners.base import MatrixDiagnostics, Prepared
from hyperinf_ops.preconditioners.datainf import DataInf
from hyperinf_ops.preconditioners.exact import Exact
from hyperinf_ops.preconditioners.exact_full import ExactFull
from hyperinf_ops.preconditioners.hyperinf import HyperInf, schulz_with_options
from hyperinf_ops.preconditioners.lissa import LiSSA
from hyperinf_ops.preconditioners.method import Preconditioner
from hyperinf_ops.preconditioners.options import METHODS, EstimatorOptions, Method
from hyperinf_ops.preconditioners.serialize import options_key, prepared_from_table, prepared_to_table
from hyperinf_ops.preconditioners.tracin import TracIn

__all__ = [
    "METHODS",
    "PRECONDITIONERS",
    "EstimatorOptions",
    "MatrixDiagnostics",
    "Method",
    "Preconditioner",
    "Prepared",
    "options_key",
    "prepare",
    "prepared_from_table",
    "prepared_to_table",
    "schulz_with_options",
]

PRECONDITIONERS: dict[str, type[Preconditioner]] = {
    cls.method: cls for cls in (HyperInf, DataInf, LiSSA, TracIn, Exact, ExactFull)
}


def prepare(
    curvature: Mapping[str, CurvaturePartial],
    options: EstimatorOptions,
    *,
    device: torch.device | str | None = None,
) -> Prepared:
    """The method's Prepared for merged curvature name -> CurvaturePartial, on `device` (default: the
    curvature's). Raises InverseNotConvergedError (hyperinf), NotPositiveDefiniteError (exact, exact_full)."""
    return PRECONDITIONERS[options.method].prepare(curvature, options, device=device)
