"""Mergeable GFIM curvature: per-matrix partial sums that add up exactly across shards.

HyperINF's curvature for a LoRA matrix l with per-example gradients g_k of shape (r, d) is

    G_l = (1/n) sum_k g_k^T g_k            (d, d)
    lambda_l = ratio * mean over k and entries of g_k^2

Both are ratios of plain sums, so a shard keeps only the sums and a count; merging shards adds them.
This is what makes incremental refresh and distributed curvature exact. For tiny models the exact
full Fisher (1/n) sum_k vec(g_k) vec(g_k)^T of shape (r*d, r*d) is kept the same way; `vec` is the
row-major flatten of (r, d), index i*d + j, as `Tensor.reshape` gives.

Every estimator inverts the damped GFIM G_l + lambda_l I built by `damped_gfim` (exact_full: the damped full
Fisher, `full=True`, same lambda_l): the one place damping is added, `CurvaturePartial.damping` the one formula.

Everything is accumulated in float64 on the gradients' device, whatever the gradients' dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hyperinf_ops.core.stacks import check_stack
from hyperinf_ops.errors import EmptyTargetSetError, GradientMismatchError

__all__ = ["CurvaturePartial", "curvature_partials", "damped_gfim", "merge_curvature"]


@dataclass
class CurvaturePartial:
    """Curvature sums of one LoRA matrix over a set of examples.

    gfim_sum: (d, d) float64, sum_k g_k^T g_k.
    sq_sum:   sum over examples and entries of g^2 (the damping numerator).
    count:    number of examples summed.
    numel:    r * d, entries per example gradient.
    full_sum: (r*d, r*d) float64, sum_k vec(g_k) vec(g_k)^T, or None (only kept for tiny models).
    """

    gfim_sum: Tensor
    sq_sum: float
    count: int
    numel: int
    full_sum: Tensor | None = None

    def merge(self, other: CurvaturePartial) -> CurvaturePartial:
        """Sums of both parts (a new object; neither input changes). Both must describe the same matrix."""
        return self._combine(other, 1)

    def subtract(self, other: CurvaturePartial) -> CurvaturePartial:
        """These sums without the examples of `other`, which must be among them (a new object).

        What keeps a shard's sums current when examples leave it (deleted, or edited: their old content) without
        summing the examples that stay again; float64 cancellation leaves ~1e-16 of the removed terms' size."""
        if other.count > self.count:
            raise GradientMismatchError(f"cannot take {other.count} examples out of sums over {self.count}")
        return self._combine(other, -1)

    def _combine(self, other: CurvaturePartial, sign: int) -> CurvaturePartial:
        """self + sign * other, sums and count alike (sign: 1 or -1)."""
        if self.gfim_sum.shape != other.gfim_sum.shape or self.numel != other.numel:
            raise GradientMismatchError(
                f"cannot merge curvature of shape {tuple(self.gfim_sum.shape)} (numel {self.numel}) with "
                f"{tuple(other.gfim_sum.shape)} (numel {other.numel})"
            )
        if (self.full_sum is None) != (other.full_sum is None):
            # Merging would silently drop the examples of the part without a full Fisher.
            raise GradientMismatchError("cannot merge a curvature part with full_sum and one without")
        full = None
        if self.full_sum is not None and other.full_sum is not None:
            full = self.full_sum + sign * other.full_sum.to(self.full_sum.device)
        return CurvaturePartial(
            gfim_sum=self.gfim_sum + sign * other.gfim_sum.to(self.gfim_sum.device),
            sq_sum=self.sq_sum + sign * other.sq_sum,
            count=self.count + sign * other.count,
            numel=self.numel,
            full_sum=full,
        )

    def gfim(self) -> Tensor:
        """G = gfim_sum / count, (d, d) float64."""
        self._check_count()
        return self.gfim_sum / self.count

    def full(self) -> Tensor:
        """Exact full Fisher full_sum / count, (r*d, r*d) float64."""
        if self.full_sum is None:
            raise ValueError("this curvature was computed without the full Fisher (use full=True)")
        self._check_count()
        return self.full_sum / self.count

    def damping(self, ratio: float = 0.1) -> float:
        """lambda = ratio * mean of g^2 over examples and entries (DataInf's rule, used by every method)."""
        self._check_count()
        return ratio * self.sq_sum / (self.count * self.numel)

    def _check_count(self) -> None:
        if self.count <= 0:
            raise EmptyTargetSetError("curvature was summed over no examples")


def damped_gfim(
    part: CurvaturePartial,
    damping_ratio: float,
    *,
    full: bool = False,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """G + lambda I, (d, d) in `dtype` on `device` (default: the sums' device), lambda = part.damping(ratio).

    full=True: the damped exact full Fisher F + lambda I, (r*d, r*d), with the same lambda (needs full=True
    curvature). Cast first, then add lambda in the working dtype: in float32 this rounds as the solvers
    always did.
    """
    matrix = (part.full() if full else part.gfim()).to(device=device, dtype=dtype)
    return matrix + part.damping(damping_ratio) * torch.eye(matrix.shape[0], dtype=dtype, device=matrix.device)


def curvature_partials(grads: Mapping[str, Tensor], *, full: bool = False) -> dict[str, CurvaturePartial]:
    """Curvature sums of every LoRA matrix in `grads` (name -> (n, r, d)), keys in sorted order.

    full=True also keeps the (r*d, r*d) full Fisher sum: quadratic in r*d, tiny models only.
    Raises NonFiniteGradientError naming the matrix, GradientMismatchError on malformed or
    inconsistent shapes (every matrix must hold the same n examples).
    """
    check_stack(grads, None, "gradient", examples=True)
    out: dict[str, CurvaturePartial] = {}
    for name in sorted(grads):
        g = grads[name]
        n, r, d = g.shape
        g64 = g.detach().to(torch.float64)
        rows = g64.reshape(n * r, d)
        # sum_k g_k^T g_k is one (d, n*r) x (n*r, d) product: the rows of all examples stacked.
        part = CurvaturePartial(
            gfim_sum=rows.T @ rows, sq_sum=float(rows.square().sum()), count=n, numel=r * d
        )
        if full:
            flat = g64.reshape(n, r * d)
            part.full_sum = flat.T @ flat
        out[name] = part
    return out


def merge_curvature(parts: Iterable[Mapping[str, CurvaturePartial]]) -> dict[str, CurvaturePartial]:
    """Merge per-shard curvature dicts (all with the same keys) into one, keys in sorted order."""
    merged: dict[str, CurvaturePartial] | None = None
    for part in parts:
        if merged is None:
            merged = {name: part[name] for name in sorted(part)}
            continue
        if set(part) != set(merged):
            missing, extra = sorted(set(merged) - set(part)), sorted(set(part) - set(merged))
            raise GradientMismatchError(
                f"curvature parts disagree on matrices: missing {missing}, extra {extra}"
            )
        for name in merged:
            try:
                merged[name] = merged[name].merge(part[name])
            except GradientMismatchError as err:
                raise GradientMismatchError(f"{name!r}: {err}") from err
    if merged is None:
        raise EmptyTargetSetError("no curvature parts to merge")
    return merged
