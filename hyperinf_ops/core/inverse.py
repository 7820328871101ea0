"""Batched Schulz / hyperpower inverse of SPD matrices, with a start that provably converges.

Order-p hyperpower step: X <- X (I + R + ... + R^{p-1}) with R = I - A X (p = 2 is Schulz,
X <- X (2I - A X)). From X_0 = alpha I the residual obeys R_{t+1} = R_t^p exactly, so the iteration
converges iff the spectral radius of I - alpha A is below 1, i.e. 0 < alpha < 2 / lambda_max(A).

init="scaled" (default) takes alpha = 1 / u with u >= lambda_max(A) a cheap upper bound:
u = ||A||_F * ||B^4||_F^(1/4), B = A / ||A||_F, which exceeds lambda_max by at most d^(1/8) (two
batched matmuls; the Frobenius norm alone can exceed it by sqrt(d)). Every eigenvalue of I - alpha A
then lies in [0, 1), for any scale of A, and about log2(kappa) + log2(ln(1/tol)) steps reach `tol`.

The stop is on the relative residual ||I - A X||_F / sqrt(d), computed every step anyway (R is part
of the update), per matrix: a matrix stops when it is below `tol`, or when a step fails to lower its
residual. For SPD A the residual falls monotonically in exact arithmetic, so a rise means either the
rounding floor (measured about 5e-17 * cond(A) in fp64 and 2e-8 * cond(A) in fp32, so the default tol
holds up to cond ~1e7 in fp64 and only up to cond ~3e3 in fp32) or an indefinite / singular A (an
eigenvalue of R at or above 1 in modulus). Either way the best iterate is kept and reported with
converged=False: never a silent wrong inverse.

init="paper" reproduces the reference code: X_0 = paper_alpha * I, a fixed number of steps (default 20)
with no residual stop. It diverges whenever lambda_max(A + extra_damping I) > 2 / paper_alpha (40,000 for
the default 5e-5), and with few steps leaves small-eigenvalue directions uninverted.

All work is batched matmuls in the input dtype on the input's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hyperinf_ops.errors import NonFiniteGradientError, NotPositiveDefiniteError

__all__ = ["InverseResult", "default_tol", "schulz_inverse", "spectral_upper_bound"]

# Residual tolerance per dtype. Measured floors (d 64..512, log-spaced spectra): fp64 ~5e-17 * cond, so
# 1e-9 holds up to cond ~1e7; fp32 ~2e-8 * cond, so 1e-4 holds only up to cond ~3e3 (beyond: converged=False).
_DEFAULT_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
_DEFAULT_MAX_ITER = {"scaled": 60, "paper": 20}


@dataclass
class InverseResult:
    """inverse: same shape as the input; iterations: steps run (the batch's maximum);
    residual: (...) per-matrix ||I - A X||_F / sqrt(d) of the returned X, in the input dtype;
    converged: every matrix reached `tol`; tol: the tolerance applied."""

    inverse: Tensor
    iterations: int
    residual: Tensor
    converged: bool
    tol: float


def default_tol(dtype: torch.dtype) -> float:
    """Residual tolerance used when schulz_inverse gets tol=None."""
    _check_dtype(dtype)
    return _DEFAULT_TOL[dtype]


def spectral_upper_bound(a: Tensor) -> Tensor:
    """Upper bound u >= max |eigenvalue| of each symmetric matrix in a (..., d, d); shape (...).

    u = ||A||_F * ||B^4||_F^(1/4) with B = A / ||A||_F: at most d^(1/8) * lambda_max. Normalising first
    keeps the fourth power from overflowing fp32 at any scale. A zero matrix gets u = 0.
    """
    fro = torch.linalg.matrix_norm(a)
    b = a / torch.where(fro > 0, fro, torch.ones_like(fro))[..., None, None]
    b2 = b @ b
    return fro * torch.linalg.matrix_norm(b2 @ b2).clamp(max=1.0) ** 0.25


def schulz_inverse(
    a: Tensor,
    *,
    order: int = 2,
    tol: float | None = None,
    max_iter: int | None = None,
    init: str = "scaled",
    paper_alpha: float = 5e-5,
    extra_damping: float = 0.0,
    start: Tensor | None = None,
) -> InverseResult:
    """Inverse of each SPD matrix in a (..., d, d), float32 or float64, by the order-`order` hyperpower method.

    tol: relative residual target (default: default_tol(a.dtype), 1e-9 fp64, 1e-4 fp32).
    max_iter: step cap (default 60 for init="scaled", 20 for init="paper", where it is the fixed count).
    extra_damping: added to the diagonal first (the reference code's absolute 0.001 I, for parity).
    start: an approximate inverse to continue from (init="scaled" only), e.g. a float32 solve to polish in
    float64; a matrix whose start has residual >= 1 (no convergence guarantee) starts scaled instead.
    Raises NonFiniteGradientError on NaN/inf, NotPositiveDefiniteError if not square or not symmetric.
    An indefinite or singular matrix is not an error here: it is returned with converged=False.
    """
    _check_dtype(a.dtype)
    if order < 2:
        raise ValueError(f"hyperpower order must be >= 2, got {order}")
    if init not in _DEFAULT_MAX_ITER:
        raise ValueError(f"init must be one of {tuple(_DEFAULT_MAX_ITER)}, got {init!r}")
    _check_square_symmetric_finite(a)
    tol = default_tol(a.dtype) if tol is None else float(tol)
    max_iter = _DEFAULT_MAX_ITER[init] if max_iter is None else int(max_iter)

    shape, d = a.shape, a.shape[-1]
    a = a.reshape(-1, d, d)
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    if extra_damping:
        a = a + extra_damping * eye
    if init == "paper":
        alpha = torch.full(a.shape[:1], paper_alpha, dtype=a.dtype, device=a.device)
    else:
        upper = spectral_upper_bound(a)
        # A zero matrix has no inverse; any alpha makes it fail visibly (residual stays 1).
        alpha = 1.0 / torch.where(upper > 0, upper, torch.ones_like(upper))
    x = alpha[:, None, None] * eye
    resid_mat, res = _residual(a, x, eye)
    if start is not None and init == "scaled":
        given = start.reshape(-1, d, d).to(device=a.device, dtype=a.dtype)
        given_mat, given_res = _residual(a, given, eye)
        use = given_res < torch.minimum(res, torch.ones_like(res))
        x = torch.where(use[:, None, None], given, x)
        resid_mat = torch.where(use[:, None, None], given_mat, resid_mat)
        res = torch.where(use, given_res, res)

    if init == "paper":
        # Reference parity: fixed step count, no stop and no divergence guard.
        for _ in range(max_iter):
            x = _hyperpower_step(x, resid_mat, order)
            resid_mat, res = _residual(a, x, eye)
        steps = max_iter
    else:
        active = ~(res <= tol)
        steps = 0
        while steps < max_iter and bool(active.any()):
            x_new = _hyperpower_step(x, resid_mat, order)
            r_new, res_new = _residual(a, x_new, eye)
            # Accept a step only where it lowers the residual; a rise is the rounding floor or an
            # indefinite matrix, and that matrix stops with its best iterate.
            take = active & (res_new < res)
            if bool(take.all()):  # the usual step: no (B, d, d) selects to copy
                x, resid_mat, res = x_new, r_new, res_new
            else:
                x = torch.where(take[:, None, None], x_new, x)
                resid_mat = torch.where(take[:, None, None], r_new, resid_mat)
                res = torch.where(take, res_new, res)
            active = take & (res > tol)
            steps += 1
    converged = bool((res <= tol).all())
    return InverseResult(
        inverse=x.reshape(shape),
        iterations=steps,
        residual=res.reshape(shape[:-2]),
        converged=converged,
        tol=tol,
    )


def _hyperpower_step(x: Tensor, resid_mat: Tensor, order: int) -> Tensor:
    """X (I + R + ... + R^{order-1}) = X + X (R (I + R (I + ...))), Horner form: `order` - 1 matmuls."""
    poly = resid_mat
    for _ in range(order - 2):
        poly = torch.baddbmm(resid_mat, resid_mat, poly)
    return torch.baddbmm(x, x, poly)


def _residual(a: Tensor, x: Tensor, eye: Tensor) -> tuple[Tensor, Tensor]:
    """R = I - A X (B, d, d) and ||R||_F / sqrt(d) per matrix (B,); NaN/inf read as an infinite residual."""
    resid_mat = torch.baddbmm(eye, a, x, alpha=-1.0)
    res = torch.linalg.matrix_norm(resid_mat) / math.sqrt(a.shape[-1])
    return resid_mat, torch.nan_to_num(res, nan=math.inf)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _DEFAULT_TOL:
        raise TypeError(f"Schulz inverse runs in float32 or float64, got {dtype}; cast the matrix first")


def _check_square_symmetric_finite(a: Tensor) -> None:
    if a.ndim < 2 or a.shape[-1] != a.shape[-2] or a.shape[-1] == 0:
        raise NotPositiveDefiniteError(
            f"expected (..., d, d) square matrices with d >= 1, got {tuple(a.shape)}"
        )
    finite = torch.isfinite(a).flatten(-2).all(-1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().tolist()[:5]
        raise NonFiniteGradientError(f"matrix holds NaN or inf (batch index {bad})")
    # Relative asymmetry: loose enough for X^T X products rounded in the given dtype.
    sym_tol = max(1e-6, 100 * torch.finfo(a.dtype).eps)
    asym = torch.linalg.matrix_norm(a - a.transpose(-1, -2)) > sym_tol * torch.linalg.matrix_norm(a)
    if bool(asym.any()):
        bad = asym.nonzero().tolist()[:5]
        raise NotPositiveDefiniteError(f"matrix is not symmetric (batch index {bad})")
