"""Compressed gradient rows: a seeded sketch of each LoRA matrix's wide side, applied before anything else.

For LoRA matrix l with per-example gradient g_l (r, d_l), the stored and scored gradient is

    c_l = g_l P_l            (r, k),   P_l (d_l, k) with i.i.d. N(0, 1/k) entries,   E[P_l P_l^T] = I

(LoGra's projection of the input side, for LoRA the only wide side). Everything downstream runs in sketch
space as if c_l were the gradient: the GFIM sums (k, k), the damping rule, the Schulz inverse, the mean
target gradient v_l P_l, DataInf, self-influence. So the compressed path is influence computed exactly for
the sketched model, and its scores equal a dense computation in sketch space; how well it ranks like raw
influence is measured (docs/compression.md), not assumed. `sketch_dim = 0`, or k >= d_l, keeps g_l raw.

The width rule (`row_layout`, issue 20): with whitened rows, `sketch_dim = 0` and a `row_budget` (the pipeline's
default: 64 KB), a model whose dense unsketched rows would take more than the budget is stored as factor rows of
rank `row_rank` (row_format.py; the pipeline's default: 2) when `row_rank` is set, else as dense rows, in either
case sketched to the widest k (a multiple of 8; unsketched when that fits) whose rows fit (`RowFormat.row_bytes`:
values, per-group scales, per-block norms, the row's fixed bytes) and whose codec and curvature state
(`state_bytes`) fits the `state_budget`; the whitening is then taken in the sketch space. MiniLM (24 matrices of
(8, 384): 36,960-byte dense int4 rows) keeps dense unsketched rows; SmolLM2-135M (120 matrices, d = 576 / 192) gets
unsketched rank-2 factor rows (64,372 bytes; dense rows would need k = 128); Llama-3-8B with q/v r=8 (128 matrices,
d = 4096 / 1024) gets rank-2 factor rows at k = 424 (61,492 bytes, state 1.0 GB; dense rows: k = 120) instead of 1.7 MB rows.
What each costs in ranking quality is measured in docs/compression.md.

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

from hyperinf_ops.core.row_format import RowFormat
from hyperinf_ops.errors import ConfigError, GradientMismatchError
from hyperinf_ops.settings import CompressionSpec

__all__ = ["SKETCH_ALIGN", "Sketch", "row_format", "row_layout", "row_shapes", "sketch_width", "state_bytes"]

# The width rule picks sketch widths that are multiples of this.
SKETCH_ALIGN = 8


def _stored_width(d: int, k: int) -> int:
    """A (r, d) matrix's stored columns under sketch width k: d when unsketched (k = 0) or k >= d, else k."""
    return d if k == 0 or k >= d else k


def _blocks(shapes: Mapping[str, tuple[int, int]], k: int) -> tuple[int, ...]:
    """Floats of each matrix's stored block under sketch width k (0 = none), sorted names."""
    return tuple(r * _stored_width(d, k) for _, (r, d) in sorted(shapes.items()))


def state_bytes(shapes: Mapping[str, tuple[int, int]], k: int) -> int:
    """Bytes of the codec and curvature state of rows stored at sketch width k (0 = none): per matrix the sketch
    P_l (d, k) float32 when sketched, the whitening (w, w) and its roots (w,) float32 and the curvature sums (w, w)
    float64, w the stored width."""
    total = 0
    for _, d in shapes.values():
        w = _stored_width(d, k)
        total += 4 * d * w * (w < d) + 4 * (w * w + w) + 8 * w * w
    return total


def row_layout(shapes: Mapping[str, tuple[int, int]], spec: CompressionSpec) -> tuple[int, int]:
    """(k, q): the sketch width (0 = none) and factor rank (0 = dense rows) the rows of matrices `shapes`
    (name -> (r, d)) are stored at under `spec`.

    (`spec.sketch_dim`, 0) when it is set, or when the rows are not whitened or have no `row_budget`. Otherwise the
    width rule (module docstring): (0, 0) when dense unsketched rows fit the budget; else, with q = `row_rank`
    (0: dense), the widest k (0 = unsketched, else a multiple of SKETCH_ALIGN below the widest d) whose rows fit
    the row budget and whose `state_bytes` fit `state_budget` (0 = none). ConfigError when not even SKETCH_ALIGN
    fits.
    """
    if spec.sketch_dim or not spec.whitened or not spec.row_budget or not shapes:
        return spec.sketch_dim, 0
    r = next(iter(shapes.values()))[0]
    rank = spec.row_rank if 0 < spec.row_rank < r else 0

    def fits(k: int, q: int) -> bool:
        return (RowFormat(spec.dtype, _blocks(shapes, k), q, r).row_bytes <= spec.row_budget
                and (not spec.state_budget or state_bytes(shapes, k) <= spec.state_budget))
    if fits(0, 0):
        return 0, 0
    if fits(0, rank):
        return 0, rank
    widest, best = max(d for _, d in shapes.values()), 0
    for k in range(SKETCH_ALIGN, widest, SKETCH_ALIGN):  # bytes and state grow with k: stop at the first misfit
        if not fits(k, rank):
            break
        best = k
    if best == 0:
        raise ConfigError(f"compression.row_budget = {spec.row_budget} bytes is too small for {len(shapes)} LoRA "
                          f"matrices: even a sketch of {SKETCH_ALIGN} per matrix in {spec.dtype} takes "
                          f"{RowFormat(spec.dtype, _blocks(shapes, SKETCH_ALIGN), rank, r).row_bytes}"
                          + (f" (state {state_bytes(shapes, SKETCH_ALIGN):,} bytes, state_budget "
                             f"{spec.state_budget:,})" if spec.state_budget else "")
                          + "; raise it or set compression.sketch_dim")
    return best, rank


def sketch_width(shapes: Mapping[str, tuple[int, int]], spec: CompressionSpec) -> int:
    """The sketch width k the rows of matrices `shapes` (name -> (r, d)) are stored at under `spec` (0 = none):
    `row_layout`'s."""
    return row_layout(shapes, spec)[0]


def row_format(shapes: Mapping[str, tuple[int, int]], spec: CompressionSpec) -> RowFormat:
    """How rows of matrices `shapes` (name -> (r, d)) are stored under `spec`: dtype, the (r, k_l) blocks and the
    factor rank (`row_layout`)."""
    k, rank = row_layout(shapes, spec)
    r = next(iter(shapes.values()))[0] if shapes else 0
    return RowFormat(spec.dtype, _blocks(shapes, k), rank, r if rank else 0)


def row_shapes(shapes: Mapping[str, tuple[int, int]], spec: CompressionSpec) -> dict[str, tuple[int, int]]:
    """(r, k_l) of each matrix's stored block: k_l = the sketch width (`sketch_width`: sketch_dim or the width
    rule's), or d_l when unsketched or the width >= d_l."""
    k = sketch_width(shapes, spec)
    return {name: (r, _stored_width(d, k)) for name, (r, d) in sorted(shapes.items())}


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
