"""Seeded block Johnson-Lindenstrauss projection of LoRA gradients and preconditioned queries.

Scoring needs only `<P(v)_l, g_{k,l}>` summed over LoRA matrices l. Storing `Phi_l vec(g_{k,l})` instead of
`g_{k,l}` keeps those inner products in expectation (`E[Phi^T Phi] = I`) with an error that shrinks as
`1/sqrt(D)`. One independent Gaussian block per matrix (rather than one dense matrix over the concatenated
gradient) keeps the projection cheap and lets DataInf be computed per matrix in projected space.

Matrix l (in sorted name order) gets `D_l` of the `D` output slots, proportional to `r*d_l`, at least 1,
summing exactly to `D`; `Phi_l` is `(D_l, r*d_l)` with N(0, 1/D_l) entries drawn on the CPU from a
`torch.Generator` seeded by `(seed, l)`, so the same spec gives the same matrices on any machine or device.
`vec` is the row-major flatten of `(r, d)`. `dim = 0` is raw mode: the exact concatenated gradients.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from hyperinf_ops.errors import GradientMismatchError
from hyperinf_ops.settings import ProjectionSpec

__all__ = ["ProjectionSpec", "BlockProjector", "allocate_slots"]

def allocate_slots(sizes: list[int], dim: int) -> list[int]:
    """Split `dim` output slots over blocks of `sizes` entries: proportional, each >= 1, summing to `dim`.

    Largest-remainder rounding, ties broken by block order, so the split is deterministic.
    """
    if dim < len(sizes):
        raise ValueError(f"projection dim {dim} is smaller than the number of LoRA matrices {len(sizes)}")
    total = sum(sizes)
    quotas = [dim * s / total for s in sizes]
    alloc = [max(1, math.floor(q)) for q in quotas]
    short = dim - sum(alloc)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    for i in by_remainder[: max(short, 0)]:
        alloc[i] += 1
    # Clamping tiny blocks up to 1 can overshoot: take the excess back from the largest blocks.
    while sum(alloc) > dim:
        i = max(range(len(alloc)), key=lambda j: (alloc[j], -j))
        alloc[i] -= 1
    return alloc


def _block_seed(seed: int, index: int) -> int:
    # A hash, not seed + index, so that (seed, l) and (seed + 1, l - 1) do not share a matrix.
    digest = hashlib.sha256(f"hyperinf-projection:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BlockProjector:
    """Block JL projector for one set of LoRA matrices.

    shapes: name -> (r, d); blocks follow sorted name order. `out_dim` is `spec.dim`, or the total number
    of gradient entries in raw mode. `slices[name]` is the matrix's slot range in an output row.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        spec: ProjectionSpec | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not shapes:
            raise GradientMismatchError("no LoRA matrices to project")
        self.spec = spec or ProjectionSpec()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.names: list[str] = sorted(shapes)
        self.shapes: dict[str, tuple[int, int]] = {
            n: (int(shapes[n][0]), int(shapes[n][1])) for n in self.names
        }
        sizes = [r * d for r, d in self.shapes.values()]
        widths = sizes if self.spec.raw else allocate_slots(sizes, self.spec.dim)
        self.slices: dict[str, slice] = {}
        start = 0
        for name, width in zip(self.names, widths, strict=True):
            self.slices[name] = slice(start, start + width)
            start += width
        self.out_dim = start
        self._phi: dict[str, Tensor] = {}
        if not self.spec.raw:
            for index, (name, size, width) in enumerate(zip(self.names, sizes, widths, strict=True)):
                gen = torch.Generator(device="cpu").manual_seed(_block_seed(self.spec.seed, index))
                phi = torch.randn((width, size), generator=gen, dtype=torch.float32) / math.sqrt(width)
                self._phi[name] = phi.to(self.device)

    def phi(self, name: str) -> Tensor:
        """Phi_l, (D_l, r*d_l) float32 on the projector's device (raw mode has none)."""
        if self.spec.raw:
            raise ValueError("raw mode (dim 0) has no projection matrix")
        return self._phi[name]

    def _check(self, tensors: Mapping[str, Tensor], batched: bool) -> None:
        if set(tensors) != set(self.names):
            missing, extra = sorted(set(self.names) - set(tensors)), sorted(set(tensors) - set(self.names))
            raise GradientMismatchError(f"projector matrices differ: missing {missing}, extra {extra}")
        for name in self.names:
            shape = tuple(tensors[name].shape[1:] if batched else tensors[name].shape)
            if shape != self.shapes[name]:
                raise GradientMismatchError(
                    f"{name!r} has shape {shape}, projector expects {self.shapes[name]}"
                )

    def project(self, grads: Mapping[str, Tensor]) -> Tensor:
        """Per-example gradients name -> (n, r, d)  ->  (n, out_dim) float32 on the projector's device."""
        self._check(grads, batched=True)
        n = grads[self.names[0]].shape[0]
        out = torch.empty((n, self.out_dim), dtype=torch.float32, device=self.device)
        for name in self.names:
            flat = grads[name].detach().reshape(n, -1).to(self.device, torch.float32)
            out[:, self.slices[name]] = flat if self.spec.raw else flat @ self._phi[name].T
        return out

    def project_vector(self, vectors: Mapping[str, Tensor]) -> Tensor:
        """One vector per matrix name -> (r, d)  ->  (out_dim,) float32 (same map as `project`)."""
        self._check(vectors, batched=False)
        return self.project({name: v.unsqueeze(0) for name, v in vectors.items()})[0]

    @staticmethod
    def sq_norms(grads: Mapping[str, Tensor]) -> Tensor:
        """Exact per-matrix squared Frobenius norms, name -> (n, r, d)  ->  (n, L) float64, sorted order."""
        return torch.stack(
            [grads[name].detach().to(torch.float64).square().sum(dim=(1, 2)) for name in sorted(grads)], dim=1
        )
