"""Influence estimators: HyperINF and the baselines, one sign convention, one damping rule.

For a target set with mean gradient v_l per LoRA matrix l, training example k scores

    score(k) = -I(k) = sum_l < v_l (G_l + lambda_l I)^-1 , g_{k,l} >_F

**higher = more helpful to the target set; most negative = most harmful.** Methods differ only in how
they apply the inverse (`precondition`):
    hyperinf    batched Schulz / hyperpower inverse of the damped GFIM (inverse.py), fp64 by default
    exact       Cholesky solve of the same damped GFIM in fp64 (the ground truth for hyperinf)
    lissa       truncated Neumann series r <- v + r - r (G + lambda I) / s, answer r / s
    tracin      no inverse: v itself (gradient dot product)
    datainf     DataInf's closed form on flattened gradients (needs the training gradients):
                v^T (F + lambda I)^-1 ~ (1/(n lambda)) sum_i (v - (v.g_i) / (lambda + |g_i|^2) g_i)
    exact_full  Cholesky solve of the damped exact full Fisher F = (1/n) sum vec(g) vec(g)^T + lambda I
                (r*d x r*d, tiny models; measures what the GFIM approximation costs)
lambda_l = damping_ratio * mean of g^2 over examples and entries of matrix l, for every method.

Preconditioned vectors and scores are float64; the solve runs in `EstimatorOptions.dtype` (exact and
exact_full always in fp64). Tensors stay on the device of the gradients.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hyperinf_ops.curvature import CurvaturePartial, curvature_partials
from hyperinf_ops.errors import (
    EmptyTargetSetError,
    GradientMismatchError,
    InverseNotConvergedError,
    NonFiniteGradientError,
    NotPositiveDefiniteError,
)
from hyperinf_ops.inverse import InverseResult, default_tol, schulz_inverse, spectral_upper_bound

__all__ = [
    "METHODS",
    "EstimatorOptions",
    "Preconditioned",
    "influence_scores",
    "mean_target_gradient",
    "precondition",
    "score_gradients",
    "self_influence",
]

METHODS = ("hyperinf", "datainf", "lissa", "tracin", "exact", "exact_full")


@dataclass
class EstimatorOptions:
    """How to apply (G_l + lambda_l I)^-1.

    damping_ratio: lambda_l = damping_ratio * mean(g_l^2), > 0.
    schulz_*: passed to schulz_inverse (None = its per-dtype defaults); init="paper" is reference-code
        parity (X_0 = paper_alpha I, fixed steps, paper_extra_damping added) and usually does not converge.
    allow_unconverged: return a non-converged Schulz inverse instead of raising InverseNotConvergedError
        (diagnostics still say converged=False); meant for paper-parity comparisons only.
    lissa_iterations: Neumann terms. lissa_scale: s for every matrix (must exceed lambda_max / 2 of each
        damped GFIM to converge); None = per matrix ||G + lambda I||_F, which always exceeds lambda_max.
    dtype: working dtype of the hyperinf, lissa, datainf solves (float64 or float32).
    """

    method: str = "hyperinf"
    damping_ratio: float = 0.1
    schulz_order: int = 2
    schulz_tol: float | None = None
    schulz_max_iter: int | None = None
    init: str = "scaled"
    paper_alpha: float = 5e-5
    paper_extra_damping: float = 0.0
    allow_unconverged: bool = False
    lissa_iterations: int = 1000
    lissa_scale: float | None = None
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown influence method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.damping_ratio > 0:
            raise ValueError(f"damping_ratio must be > 0, got {self.damping_ratio}")
        if self.lissa_iterations < 1:
            raise ValueError(f"lissa_iterations must be >= 1, got {self.lissa_iterations}")
        if self.lissa_scale is not None and not self.lissa_scale > 0:
            raise ValueError(f"lissa_scale must be > 0, got {self.lissa_scale}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")


@dataclass
class Preconditioned:
    """vectors: name -> (r, d) float64, v_l (G_l + lambda_l I)^-1 (or the method's approximation).

    diagnostics: name -> {damping, iterations, residual, converged, condition_estimate}. residual is
    ||I - A X||_F / sqrt(d) for hyperinf, the relative solve residual ||x A - v||_F / ||v||_F for exact,
    lissa and exact_full, NaN for tracin and datainf (nothing solved); converged means residual below
    the working dtype's tolerance (always True for tracin and datainf). condition_estimate is an upper
    bound on cond(G + lambda I): spectral upper bound / lambda (NaN without curvature).
    """

    vectors: dict[str, Tensor]
    diagnostics: dict[str, dict] = field(default_factory=dict)


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
    """vectors[l] ~ v_l (G_l + lambda_l I)^-1 for v: name -> (r, d). See the module docstring per method.

    curvature may be None only for tracin; datainf needs train_grads (name -> (n, r, d)); exact_full
    needs curvature computed with full=True. Raises InverseNotConvergedError (hyperinf), named
    mismatch / non-finite errors on bad input.
    """
    for name, vec in v.items():
        if vec.ndim != 2:
            raise GradientMismatchError(f"vector {name!r} has shape {tuple(vec.shape)}, expected (r, d)")
        if not bool(torch.isfinite(vec).all()):
            raise NonFiniteGradientError(f"vector {name!r} holds NaN or inf")
    vectors, diagnostics = _apply_inverse(
        {name: vec[None] for name, vec in v.items()}, curvature, options, train_grads
    )
    return Preconditioned({name: vec[0] for name, vec in vectors.items()}, diagnostics)


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
    # TracIn needs no curvature: skip the O(n r d^2) pass.
    curvature = None if method == "tracin" else curvature_partials(train_grads, full=method == "exact_full")
    pv = precondition(v, curvature, options, train_grads=train_grads)
    return score_gradients(pv, train_grads)


def self_influence(
    train_grads: Mapping[str, Tensor],
    method: str = "hyperinf",
    damping_ratio: float = 0.1,
    **option_overrides,
) -> Tensor:
    """sum_l <g_{k,l} (G_l + lambda_l I)^-1, g_{k,l}>_F per training example, (n,) float64.

    Curvature comes from train_grads; every example is preconditioned (lissa: n * r Neumann rows).
    option_overrides are EstimatorOptions fields, as for influence_scores.
    """
    options = EstimatorOptions(method=method, damping_ratio=damping_ratio, **option_overrides)
    n = _check_grads(train_grads, "train")
    if n == 0:
        raise EmptyTargetSetError("training pool has no examples")
    curvature = None if method == "tracin" else curvature_partials(train_grads, full=method == "exact_full")
    vectors, _ = _apply_inverse(train_grads, curvature, options, train_grads)
    out = torch.zeros(n, dtype=torch.float64, device=next(iter(train_grads.values())).device)
    for name, vec in vectors.items():
        out = out + (vec * train_grads[name].to(torch.float64)).sum((1, 2))
    return out


def _apply_inverse(
    vecs: Mapping[str, Tensor],
    curvature: Mapping[str, CurvaturePartial] | None,
    options: EstimatorOptions,
    train_grads: Mapping[str, Tensor] | None,
) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Stacks of row vectors name -> (K, r, d) times (G_l + lambda_l I)^-1, float64, plus diagnostics."""
    method = options.method
    names = sorted(vecs)
    if curvature is None:
        if method != "tracin":
            raise ValueError(f"method {method!r} needs curvature (only tracin works without)")
    else:
        _check_same_keys(vecs, curvature, "vectors", "curvature")
        for name in names:
            r, d = vecs[name].shape[1:]
            part = curvature[name]
            if tuple(part.gfim_sum.shape) != (d, d) or part.numel != r * d:
                raise GradientMismatchError(
                    f"{name!r}: vectors of shape {(r, d)} vs curvature {tuple(part.gfim_sum.shape)} "
                    f"(numel {part.numel})"
                )
            if method == "exact_full" and part.full_sum is None:
                raise ValueError(f"exact_full needs the full Fisher: curvature of {name!r} has no full_sum")
    if method == "datainf":
        if train_grads is None:
            raise ValueError("datainf needs train_grads (its closed form sums over training examples)")
        _check_grads(train_grads, "train")
        _check_same_keys(vecs, train_grads, "vectors", "train gradients")
        for name in names:
            if train_grads[name].shape[1:] != vecs[name].shape[1:]:
                raise GradientMismatchError(
                    f"{name!r}: vectors {tuple(vecs[name].shape[1:])} vs train gradients "
                    f"{tuple(train_grads[name].shape[1:])}"
                )

    out: dict[str, Tensor] = {}
    diag: dict[str, dict] = {}
    if method == "tracin":
        for name in names:
            out[name] = vecs[name].to(torch.float64)
            lam = curvature[name].damping(options.damping_ratio) if curvature is not None else math.nan
            diag[name] = _diagnostics(lam, 0, math.nan, True, math.nan)
        return out, diag

    lams = {name: curvature[name].damping(options.damping_ratio) for name in names}
    live = []
    for name in names:
        if lams[name] > 0:
            live.append(name)
        else:
            # Every training gradient of this matrix is zero, so its score term is zero whatever the
            # inverse; (G + 0 I) is singular, and zeros are the only consistent answer.
            out[name] = torch.zeros_like(vecs[name], dtype=torch.float64)
            diag[name] = _diagnostics(0.0, 0, math.nan, True, math.nan)

    if method == "datainf":
        for name in live:
            out[name], diag[name] = _datainf(
                vecs[name], train_grads[name], lams[name], curvature[name], options
            )
    elif method == "exact_full":
        for name in live:
            out[name], diag[name] = _exact_full(vecs[name], curvature[name], lams[name])
    else:
        # Matrices of equal width d share one batched inverse (a single kernel per step on GPU).
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name in live:
            groups[(vecs[name].shape[-1], vecs[name].device)].append(name)
        dtype = torch.float64 if method == "exact" else options.dtype
        for (d, device), group in groups.items():
            eye = torch.eye(d, dtype=dtype, device=device)
            a = torch.stack(
                [curvature[n].gfim().to(device=device, dtype=dtype) + lams[n] * eye for n in group]
            )
            cond = (spectral_upper_bound(a) / torch.tensor([lams[n] for n in group], device=device)).tolist()
            solver = {"hyperinf": _hyperinf, "exact": _exact, "lissa": _lissa}[method]
            results = solver([vecs[n] for n in group], a, options)
            for i, name in enumerate(group):
                vec, iterations, residual, converged = results[i]
                out[name] = vec.to(torch.float64)
                diag[name] = _diagnostics(lams[name], iterations, residual, converged, cond[i])
        if method == "hyperinf" and not options.allow_unconverged:
            for name in names:
                info = diag[name]
                if not info["converged"]:
                    hint = (
                        "init='paper' diverges when lambda_max > 2 / paper_alpha; use init='scaled'"
                        if options.init == "paper"
                        else "use dtype=torch.float64, a larger damping_ratio or schulz_max_iter, or method='exact'"
                    )
                    raise InverseNotConvergedError(
                        f"Schulz inverse of {name!r} stopped at relative residual {info['residual']:.3g} after "
                        f"{info['iterations']} iterations (condition estimate {info['condition_estimate']:.3g}, "
                        f"dtype {options.dtype}); {hint}"
                    )
    return {name: out[name] for name in names}, {name: diag[name] for name in names}


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


def _hyperinf(vecs: list[Tensor], a: Tensor, options: EstimatorOptions) -> list[tuple]:
    result = schulz_with_options(a, options)
    residual = result.residual.tolist()
    return [
        (vec.to(a.dtype) @ result.inverse[i], result.iterations, residual[i], residual[i] <= result.tol)
        for i, vec in enumerate(vecs)
    ]


def _exact(vecs: list[Tensor], a: Tensor, options: EstimatorOptions) -> list[tuple]:
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        raise NotPositiveDefiniteError("damped GFIM is not positive definite (Cholesky failed)")
    results = []
    for i, vec in enumerate(vecs):
        k, r, d = vec.shape
        rhs = vec.reshape(k * r, d).to(a.dtype)
        # x A = v with A symmetric is A x^T = v^T.
        x = torch.cholesky_solve(rhs.T, chol[i]).T
        residual = _solve_residual(x, a[i], rhs)
        results.append((x.reshape(k, r, d), 0, residual, residual <= default_tol(a.dtype)))
    return results


def _lissa(vecs: list[Tensor], a: Tensor, options: EstimatorOptions) -> list[tuple]:
    # s > lambda_max(A) makes I - A/s a contraction on the SPD A; ||A||_F always qualifies.
    scales = (
        torch.linalg.matrix_norm(a).tolist()
        if options.lissa_scale is None
        else [options.lissa_scale] * len(vecs)
    )
    results = []
    for i, vec in enumerate(vecs):
        k, r, d = vec.shape
        rhs = vec.reshape(k * r, d).to(a.dtype)
        step = torch.eye(d, dtype=a.dtype, device=a.device) - a[i] / scales[i]
        acc = rhs
        for _ in range(options.lissa_iterations):
            acc = torch.addmm(rhs, acc, step)  # r <- v + r (I - A / s)
        x = acc / scales[i]
        residual = _solve_residual(x, a[i], rhs)
        results.append(
            (x.reshape(k, r, d), options.lissa_iterations, residual, residual <= default_tol(a.dtype))
        )
    return results


def _datainf(vecs: Tensor, train: Tensor, lam: float, part: CurvaturePartial, options: EstimatorOptions):
    k = vecs.shape[0]
    n = train.shape[0]
    dtype = options.dtype
    g = train.reshape(n, -1).to(device=vecs.device, dtype=dtype)
    rhs = vecs.reshape(k, -1).to(dtype)
    # Sherman-Morrison per example, averaged: (1/lam) (v - (1/n) sum_i c_i g_i), c_i = v.g_i / (lam + |g_i|^2).
    coef = (rhs @ g.T) / (lam + g.square().sum(1))
    x = (rhs - coef @ g / n) / lam
    cond = _condition(part.gfim().to(device=vecs.device), lam)
    return x.reshape(vecs.shape).to(torch.float64), _diagnostics(lam, 0, math.nan, True, cond)


def _exact_full(vecs: Tensor, part: CurvaturePartial, lam: float):
    k = vecs.shape[0]
    full = part.full().to(vecs.device)
    a = full + lam * torch.eye(full.shape[0], dtype=full.dtype, device=full.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise NotPositiveDefiniteError("damped full Fisher is not positive definite (Cholesky failed)")
    rhs = vecs.reshape(k, -1).to(torch.float64)
    x = torch.cholesky_solve(rhs.T, chol).T
    residual = _solve_residual(x, a, rhs)
    cond = float(spectral_upper_bound(a)) / lam
    return x.reshape(vecs.shape), _diagnostics(lam, 0, residual, residual <= default_tol(torch.float64), cond)


def _solve_residual(x: Tensor, a: Tensor, rhs: Tensor) -> float:
    """||x A - rhs||_F / ||rhs||_F (0 for a zero right-hand side)."""
    denom = float(torch.linalg.matrix_norm(rhs))
    return float(torch.linalg.matrix_norm(x @ a - rhs)) / denom if denom > 0 else 0.0


def _condition(gfim: Tensor, lam: float) -> float:
    eye = torch.eye(gfim.shape[0], dtype=gfim.dtype, device=gfim.device)
    return float(spectral_upper_bound(gfim + lam * eye)) / lam


def _diagnostics(damping: float, iterations: int, residual: float, converged: bool, cond: float) -> dict:
    return {
        "damping": float(damping),
        "iterations": int(iterations),
        "residual": float(residual),
        "converged": bool(converged),
        "condition_estimate": float(cond),
    }


def _check_grads(grads: Mapping[str, Tensor], role: str) -> int:
    """Validate name -> (n, r, d) with one n and finite values; returns n."""
    if not grads:
        raise GradientMismatchError(f"{role} gradient dict is empty: no LoRA matrices")
    n = None
    for name in sorted(grads):
        g = grads[name]
        if g.ndim != 3:
            raise GradientMismatchError(
                f"{role} gradient {name!r} has shape {tuple(g.shape)}, expected (n, r, d)"
            )
        if n is None:
            n = g.shape[0]
        elif g.shape[0] != n:
            raise GradientMismatchError(f"{role} gradient {name!r} holds {g.shape[0]} examples, others {n}")
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteGradientError(f"{role} gradient {name!r} holds NaN or inf")
    return n


def _check_same_keys(a: Mapping, b: Mapping, a_role: str, b_role: str) -> None:
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise GradientMismatchError(
            f"{a_role} and {b_role} disagree on LoRA matrices: only in {a_role} "
            f"{only_a}, only in {b_role} {only_b}"
        )
