"""Compressed gradient rows: a seeded sketch of each LoRA matrix's wide side, applied before anything else.

For LoRA matrix l with per-example gradient g_l (r, d_l), the stored and scored gradient is

    c_l = g_l P_l            (r, k),   P_l (d_l, k) with i.i.d. N(0, 1/k) entries,   E[P_l P_l^T] = I

(LoGra's projection of the input side, for LoRA the only wide side). Everything downstream runs in sketch
space as if c_l were the gradient: the GFIM sums (k, k), the damping rule, the Schulz inverse, the mean
target gradient v_l P_l, DataInf, self-influence. So the compressed path is influence computed exactly for
the sketched model, and its scores equal a dense computation in sketch space; how well it ranks like raw
influence is measured (docs/compression.md), not assumed. `sketch_dim = 0`, or k >= d_l, keeps g_l raw.

P_l is drawn on the CPU in float32 from a `torch.Generator` seeded by sha256 of (seed, l's index in sorted
name order), so any machine and device builds the same matrices. A row is every matrix's c_l flattened
row-major and concatenated in sorted name order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from hyperinf_ops.errors import GradientMismatchError
from hyperinf_ops.settings import CompressionSpec

__all__ = ["Sketch", "row_shapes"]


def row_shapes(shapes: Mapping[str, tuple[int, int]], spec: CompressionSpec) -> dict[str, tuple[int, int]]:
    """(r, k_l) of each matrix's stored block: k_l = sketch_dim, or d_l when raw or sketch_dim >= d_l."""
    return {name: (r, d if spec.raw or spec.sketch_dim >= d else spec.sketch_dim)
            for name, (r, d) in sorted(shapes.items())}


def _seed(seed: int, index: int) -> int:
    # A hash, not seed + index, so that (seed, l) and (seed + 1, l - 1) do not share a matrix.
    digest = hashlib.sha256(f"hyperinf-sketch:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Sketch:
    """The sketch of one set of LoRA matrices. shapes: name -> (r, d) of the raw gradients.

    `row_shapes[name]` is (r, k_l); `slices[name]` the block's columns in a row of `width` floats.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], spec: CompressionSpec | None = None,
                 device: torch.device | str | None = None) -> None:
        if not shapes:
            raise GradientMismatchError("no LoRA matrices to sketch")
        self.spec = spec or CompressionSpec()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.shapes = {name: (int(r), int(d)) for name, (r, d) in sorted(shapes.items())}
        self.row_shapes = row_shapes(self.shapes, self.spec)
        self.slices: dict[str, slice] = {}
        self._p: dict[str, Tensor | None] = {}
        start = 0
        for index, (name, (r, d)) in enumerate(self.shapes.items()):
            k = self.row_shapes[name][1]
            self.slices[name] = slice(start, start + r * k)
            start += r * k
            if k == d:
                self._p[name] = None  # raw: the identity, applied as nothing
                continue
            gen = torch.Generator(device="cpu").manual_seed(_seed(self.spec.seed, index))
            self._p[name] = (torch.randn((d, k), generator=gen, dtype=torch.float32) / math.sqrt(k)).to(self.device)
        self.width = start

    def matrix(self, name: str) -> Tensor | None:
        """P_l (d, k) float32 on the sketch's device, or None for a matrix kept raw."""
        return self._p[name]

    def apply(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-example gradients name -> (n, r, d) -> their sketches name -> (n, r, k) (float32 when sketched;
        a raw matrix is returned as it is)."""
        if set(grads) != set(self.shapes):
            missing, extra = sorted(set(self.shapes) - set(grads)), sorted(set(grads) - set(self.shapes))
            raise GradientMismatchError(f"sketch matrices differ: missing {missing}, extra {extra}")
        out = {}
        for name in self.shapes:
            g = grads[name]
            if tuple(g.shape[1:]) != self.shapes[name]:
                raise GradientMismatchError(f"{name!r} has shape {tuple(g.shape[1:])}, sketch expects "
                                            f"{self.shapes[name]}")
            p = self._p[name]
            out[name] = g if p is None else g.to(p.device, torch.float32) @ p
        return out

    def apply_one(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One vector per matrix name -> (r, d) -> name -> (r, k) (the same map as `apply`)."""
        return {name: t[0] for name, t in self.apply({name: x[None] for name, x in v.items()}).items()}

    def flatten(self, stacks: Mapping[str, Tensor]) -> Tensor:
        """Row-space stacks name -> (n, r, k) -> stored rows (n, width) float32 on the sketch's device."""
        n = next(iter(stacks.values())).shape[0]
        out = torch.empty((n, self.width), dtype=torch.float32, device=self.device)
        for name, sl in self.slices.items():
            out[:, sl] = stacks[name].detach().reshape(n, -1).to(self.device, torch.float32)
        return out

    @staticmethod
    def sq_norms(stacks: Mapping[str, Tensor]) -> Tensor:
        """Per-matrix squared Frobenius norms, name -> (n, r, k) -> (n, L) float64, sorted order."""
        return torch.stack([stacks[name].detach().to(torch.float64).square().sum(dim=(1, 2))
                            for name in sorted(stacks)], dim=1)
