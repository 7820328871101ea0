"""The prepared inverse: built once from merged curvature, applied to any number of vectors.

For LoRA matrix l with damped GFIM A_l = G_l + lambda_l I ((d, d), `curvature.damped_gfim`), a method turns
row vectors v of shape (r, d) into v A_l^-1 or its approximation. `prepare` does all the work that does
not depend on v and keeps it in a `Prepared`; `Prepared.apply` is then cheap and solves nothing:

    hyperinf, exact   operator M_l = A_l^-1 (d, d) float64;    apply  v M_l
    exact_full        operator M_l = (F_l + lambda_l I)^-1 (r*d, r*d), F_l the full Fisher;  apply  vec(v) M_l
    lissa             operator A_l itself, scale s_l in the diagnostics;
                      apply  r <- v + r (I - A_l / s_l), lissa_iterations times, answer r / s_l
    datainf           no operator; apply streams the training gradients g_i (r, d):
                      (1 / (n lambda_l)) (n v - sum_i c_i g_i),  c_i = <v, g_i>_F / (lambda_l + |g_i|_F^2)
    tracin            no operator; apply returns v

A matrix with lambda_l = 0 has only zero training gradients, so its score term is zero whatever the
inverse (and G_l + 0 I is singular): it has no operator and every method but tracin maps it to zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from hyperinf_ops.core.stacks import check_stack, rowwise_inner
from hyperinf_ops.errors import GradientMismatchError, UnsupportedMethodError
from hyperinf_ops.preconditioners.options import EstimatorOptions

__all__ = ["Batch", "MatrixDiagnostics", "Prepared"]

Batch = Mapping[str, Tensor]


@dataclass(frozen=True)
class MatrixDiagnostics:
    """Health of one matrix's prepared inverse.

    damping: lambda_l (NaN for tracin without curvature). iterations: Schulz steps (hyperinf) or series
    terms (lissa), 0 otherwise. residual: ||I - A X||_F / sqrt(d) of the stored inverse X (hyperinf, exact;
    exact_full with d = r*d), NaN where nothing is inverted at prepare time (tracin, datainf, lissa, whose
    relative solve residual depends on the vector: `Prepared.measure`). converged: residual within the
    working dtype's tolerance (True where nothing is iterated at prepare time: tracin, datainf, and lissa
    until `measure`). condition_estimate: upper bound on
    cond(A) = spectral upper bound / lambda (NaN without curvature). scale: lissa's s, else None.
    """

    damping: float
    iterations: int
    residual: float
    converged: bool
    condition_estimate: float
    scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python values; scale only where a method sets it."""
        out = asdict(self)
        if self.scale is None:
            del out["scale"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MatrixDiagnostics:
        """Inverse of `to_dict`."""
        return cls(**data)


@dataclass
class Prepared:
    """The prepared inverse of one method for every LoRA matrix (see the module docstring per method).

    shapes: name -> (r, d) of the gradients it applies to. damping: name -> lambda_l.
    operators: name -> the stored matrix (float64, or None). diagnostics: name -> MatrixDiagnostics.
    Every dict has the same keys, in sorted order.
    """

    method: str
    options: EstimatorOptions
    shapes: dict[str, tuple[int, int]]
    damping: dict[str, float]
    operators: dict[str, Tensor | None]
    diagnostics: dict[str, MatrixDiagnostics]

    def __post_init__(self) -> None:
        if self.method != self.options.method:
            raise ValueError(
                f"prepared method {self.method!r} differs from its options' {self.options.method!r}"
            )

    def to(self, device: torch.device | str) -> Prepared:
        """This artifact with its operators on `device` (apply moves them per call otherwise)."""
        return dataclasses.replace(self, operators={
            name: None if op is None else op.to(device) for name, op in self.operators.items()})

    @property
    def converged(self) -> bool:
        """Every matrix's inverse met its tolerance."""
        return all(info.converged for info in self.diagnostics.values())

    def apply(
        self, vecs: Mapping[str, Tensor], *, train_batches: Iterable[Batch] | None = None
    ) -> dict[str, Tensor]:
        """name -> (K, r, d) stacks of row vectors times (G_l + lambda_l I)^-1: name -> (K, r, d) float64.

        train_batches (datainf only): the training gradients as name -> (b, r, d) batches, read once, one
        batch at a time. Raises GradientMismatchError if names or shapes differ from `shapes`.
        """
        check_stack(vecs, self.shapes, "vectors")
        method = _preconditioner(self.method)
        live = [name for name in self.shapes if not method.needs_damping or self.damping[name] > 0]
        out = method.apply(self, {name: vecs[name] for name in live}, train_batches)
        return {
            name: out[name] if name in out else torch.zeros_like(vecs[name], dtype=torch.float64)
            for name in self.shapes
        }

    def apply_one(
        self, v: Mapping[str, Tensor], *, train_batches: Iterable[Batch] | None = None
    ) -> dict[str, Tensor]:
        """`apply` for one vector per matrix: name -> (r, d) in, name -> (r, d) float64 out."""
        for name, vec in v.items():
            if vec.ndim != 2:
                raise GradientMismatchError(f"vector {name!r} has shape {tuple(vec.shape)}, expected (r, d)")
        out = self.apply({name: vec[None] for name, vec in v.items()}, train_batches=train_batches)
        return {name: vec[0] for name, vec in out.items()}

    def measure(self, vecs: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> dict[str, MatrixDiagnostics]:
        """Diagnostics of `out = apply(vecs)`: lissa's measured relative solve residual ||x A - v||_F / ||v||_F
        over the stack (its truncation error depends on v); the prepared diagnostics for other methods."""
        return _preconditioner(self.method).measure(self, vecs, out)

    def self_influence(self, grads: Mapping[str, Tensor]) -> Tensor:
        """sum_l <g_l M_l, g_l>_F per row of grads (name -> (n, r, d)): (n,) float64.

        M_l is the stored inverse (hyperinf, exact, exact_full) or the identity (tracin). lissa would run its
        series once per gradient row and datainf needs the training set: UnsupportedMethodError.
        """
        self.require_self_influence()
        return rowwise_inner(self.apply(grads), grads)

    def require_self_influence(self) -> None:
        """UnsupportedMethodError unless `self_influence` works for this method (checked before any scan)."""
        if not _preconditioner(self.method).supports_self_influence:
            raise UnsupportedMethodError(
                f"self-influence from a prepared {self.method!r} is not supported: it needs a stored inverse "
                "(hyperinf, exact, exact_full) or tracin; estimators.self_influence runs any method"
            )


def _preconditioner(method: str):
    # Imported here: the registry imports every method module, and each of those imports this one.
    from hyperinf_ops.preconditioners import PRECONDITIONERS

    return PRECONDITIONERS[method]
