"""Influence estimators: HyperINF and the baselines, one sign convention, one damping rule.

For a target set with mean gradient v_l per LoRA matrix l, training example k scores

    score(k) = -I(k) = sum_l < v_l (G_l + lambda_l I)^-1 , g_{k,l} >_F

**higher = more helpful to the target set; most negative = most harmful.** Methods differ only in how
they apply the inverse; each is a preconditioner (hyperinf_ops.preconditioners, formulas there):
    hyperinf    batched Schulz / hyperpower inverse of the damped GFIM (inverse.py), fp64 by default
    exact       Cholesky inverse of the same damped GFIM in fp64 (the ground truth for hyperinf)
    lissa       truncated Neumann series r <- v + r - r (G + lambda I) / s, answer r / s
    tracin      no inverse: v itself (gradient dot product)
    datainf     DataInf's closed form on flattened gradients (needs the training gradients):
                v^T (F + lambda I)^-1 ~ (1/(n lambda)) sum_i (v - (v.g_i) / (lambda + |g_i|^2) g_i)
    exact_full  Cholesky inverse of the damped exact full Fisher F = (1/n) sum vec(g) vec(g)^T + lambda I
                (r*d x r*d, tiny models; measures what the GFIM approximation costs)
lambda_l = damping_ratio * mean of g^2 over examples and entries of matrix l, for every method.

This module is the library API on top: every function is `prepare` (once) + `Prepared.apply`.
Preconditioned vectors and scores are float64; the solve runs in `EstimatorOptions.dtype` (exact and
exact_full always in fp64), on the device of the vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hyperinf_ops.core.curvature import CurvaturePartial, curvature_partials
from hyperinf_ops.core.stacks import check_stack, rowwise_inner
from hyperinf_ops.errors import EmptyTargetSetError, GradientMismatchError, NonFiniteGradientError
from hyperinf_ops.preconditioners import (
    METHODS,
    EstimatorOptions,
    MatrixDiagnostics,
    Prepared,
    prepare,
    schulz_with_options,
)
from hyperinf_ops.preconditioners.tracin import TracIn

__all__ = [
    "METHODS",
    "EstimatorOptions",
    "Preconditioned",
    "influence_scores",
    "mean_target_gradient",
    "precondition",
    "schulz_with_options",
    "score_gradients",
    "self_influence",
]


@dataclass
class Preconditioned:
    """vectors: name -> (r, d) float64, v_l (G_l + lambda_l I)^-1 (or the method's approximation).

    diagnostics: name -> MatrixDiagnostics of the prepared inverse (see preconditioners.base); for lissa
    the residual is the relative solve residual ||x A - v||_F / ||v||_F measured on v.
    """

    vectors: dict[str, Tensor]
    diagnostics: dict[str, MatrixDiagnostics] = field(default_factory=dict)


def mean_target_gradient(target_grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """v_l = mean over target examples of g_l: name -> (r, d) float64, keys sorted."""
    m = _check_grads(target_grads, "target")
    if m == 0:
        raise EmptyTargetSetError("target set has no examples")
    return {name: target_grads[name].sum(0, dtype=torch.float64) / m for name in sorted(target_grads)}


def precondition(
    v: Mapping[str, Tensor],
    curvature: Mapping[str, CurvaturePartial] | None,
    options: EstimatorOptions,
    *,
    train_grads: Mapping[str, Tensor] | None = None,
) -> Preconditioned:
    """vectors[l] ~ v_l (G_l + lambda_l I)^-1 for v: name -> (r, d), prepared on the device of v.

    curvature may be None only for tracin; datainf needs train_grads (name -> (n, r, d)); exact_full
    needs curvature computed with full=True. Raises InverseNotConvergedError (hyperinf), named
    mismatch / non-finite errors on bad input.
    """
    for name, vec in v.items():
        if vec.ndim != 2:
            raise GradientMismatchError(f"vector {name!r} has shape {tuple(vec.shape)}, expected (r, d)")
        if not bool(torch.isfinite(vec).all()):
            raise NonFiniteGradientError(f"vector {name!r} holds NaN or inf")
    stacks = {name: vec[None] for name, vec in v.items()}
    prepared = _prepare(curvature, options, stacks)
    out = prepared.apply(stacks, train_batches=None if train_grads is None else [train_grads])
    return Preconditioned({name: vec[0] for name, vec in out.items()}, prepared.measure(stacks, out))


def score_gradients(pv: Preconditioned | Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> Tensor:
    """score(k) = sum_l <pv_l, g_{k,l}>_F for pv: name -> (r, d), grads: name -> (n, r, d); (n,) float64."""
    if isinstance(pv, Preconditioned):
        pv = pv.vectors
    n = _check_grads(grads, "train")
    _check_same_keys(pv, grads, "preconditioned vectors", "gradients")
    scores = None
    for name in sorted(grads):
        g = grads[name]
        if tuple(pv[name].shape) != tuple(g.shape[1:]):
            raise GradientMismatchError(
                f"{name!r}: preconditioned vector {tuple(pv[name].shape)} vs gradients {tuple(g.shape[1:])}"
            )
        term = g.reshape(n, -1).to(torch.float64) @ pv[name].reshape(-1).to(
            device=g.device, dtype=torch.float64
        )
        scores = term if scores is None else scores + term
    return scores


def influence_scores(
    train_grads: Mapping[str, Tensor],
    target_grads: Mapping[str, Tensor],
    method: str = "hyperinf",
    damping_ratio: float = 0.1,
    **option_overrides,
) -> Tensor:
    """score(k) = -I(k) for every training example, (n,) float64: higher = more helpful to the target set.

    Curvature comes from train_grads (full Fisher only for exact_full); option_overrides are
    EstimatorOptions fields (e.g. schulz_order=3, dtype=torch.float32).
    """
    options = EstimatorOptions(method=method, damping_ratio=damping_ratio, **option_overrides)
    n = _check_grads(train_grads, "train")
    if n == 0:
        raise EmptyTargetSetError("training pool has no examples")
    _check_grads(target_grads, "target")
    _check_same_keys(train_grads, target_grads, "train gradients", "target gradients")
    for name in sorted(train_grads):
        if train_grads[name].shape[1:] != target_grads[name].shape[1:]:
            raise GradientMismatchError(
                f"{name!r}: train gradients {tuple(train_grads[name].shape[1:])} vs target "
                f"{tuple(target_grads[name].shape[1:])}"
            )
    v = mean_target_gradient(target_grads)
    pv = precondition(v, _curvature(train_grads, options), options, train_grads=train_grads)
    return score_gradients(pv, train_grads)


def self_influence(
    train_grads: Mapping[str, Tensor],
    method: str = "hyperinf",
    damping_ratio: float = 0.1,
    **option_overrides,
) -> Tensor:
    """sum_l <g_{k,l} (G_l + lambda_l I)^-1, g_{k,l}>_F per training example, (n,) float64.

    Curvature comes from train_grads; every example is preconditioned (lissa: n * r Neumann rows), so any
    method works here, where `Prepared.self_influence` takes only those with a stored inverse.
    option_overrides are EstimatorOptions fields, as for influence_scores.
    """
    options = EstimatorOptions(method=method, damping_ratio=damping_ratio, **option_overrides)
    n = _check_grads(train_grads, "train")
    if n == 0:
        raise EmptyTargetSetError("training pool has no examples")
    prepared = _prepare(_curvature(train_grads, options), options, train_grads)
    return rowwise_inner(prepared.apply(train_grads, train_batches=[train_grads]), train_grads)


def _curvature(
    train_grads: Mapping[str, Tensor], options: EstimatorOptions
) -> dict[str, CurvaturePartial] | None:
    # TracIn needs no curvature: skip the O(n r d^2) pass.
    if options.method == "tracin":
        return None
    return curvature_partials(train_grads, full=options.method == "exact_full")


def _prepare(
    curvature: Mapping[str, CurvaturePartial] | None, options: EstimatorOptions, stacks: Mapping[str, Tensor]
) -> Prepared:
    """Prepared inverse on the device of the (K, r, d) stacks it will be applied to."""
    if curvature is None:
        if options.method != "tracin":
            raise ValueError(f"method {options.method!r} needs curvature (only tracin works without)")
        return TracIn.from_shapes({name: tuple(x.shape[1:]) for name, x in stacks.items()}, options)
    return prepare(curvature, options, device=next(iter(stacks.values())).device)


def _check_grads(grads: Mapping[str, Tensor], role: str) -> int:
    """Validate name -> (n, r, d) with one n and finite values; returns n."""
    return check_stack(grads, None, f"{role} gradient", examples=True)


def _check_same_keys(a: Mapping, b: Mapping, a_role: str, b_role: str) -> None:
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise GradientMismatchError(
            f"{a_role} and {b_role} disagree on LoRA matrices: only in {a_role} "
            f"{only_a}, only in {b_role} {only_b}"
        )
