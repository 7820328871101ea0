"""Whitened rows: each LoRA matrix's block stored in the eigenbasis of a pilot GFIM, scaled per direction.

For matrix l with blocks b (r, k) (the raw gradient, or its sketch), a pilot sample of the pool gives
G_l = U_l S_l U_l^T (the GFIM of the pilot's blocks) and lambda_l = PILOT_DAMPING * mean(b^2) (the damping rule of
curvature.py). The stored block is

    h = b W_l,      W_l = U_l (S_l + lambda_l I)^-p           W_l^-1 = (S_l + lambda_l I)^p U_l^T

W_l is invertible, so whitening alone loses nothing: b = h W_l^-1. What it changes is where a coordinate-wise
quantizer's error goes. HyperINF multiplies by (G + lambda I)^-1, which amplifies the small-eigenvalue
directions of G; a raw block carries almost no energy there, so int4 codes of it lose those directions to
rounding. Scaled by (S + lambda)^-p, every direction carries comparable energy and comparable relative error
(p = 1/4 measured best, docs/compression.md). Everything downstream stays in block space:

    score   <pv, b> = <pv W^-T, h>          a query maps once: `to_rows(pv) = (pv U) (S + lambda)^p`
    blocks  b = h W^-1                      `undo`: DataInf, self-influence and the agreement check read these

The curvature is summed from the exact blocks in the gradient pass, never from stored rows. The pilot fixes W
for every later shard: it is stored once per (adapter, compression) and its digest is part of the rows'
fingerprint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from hyperinf_ops.core.curvature import CurvaturePartial
from hyperinf_ops.errors import GradientMismatchError

__all__ = ["PILOT_DAMPING", "Whitening"]

# lambda_l of the whitening: the product's default damping ratio, fixed here so that a query-time damping
# change never changes the stored rows.
PILOT_DAMPING = 0.1


@dataclass(frozen=True)
class Whitening:
    """W_l = U_l diag(1 / roots_l) for every matrix name: bases (k, k) float32 orthonormal U_l, roots (k,) float32
    (S_l + lambda_l)^p > 0. `power` is p."""

    power: float
    bases: dict[str, Tensor]
    roots: dict[str, Tensor]

    @classmethod
    def from_curvature(cls, curvature: Mapping[str, CurvaturePartial], power: float) -> Whitening:
        """From the curvature sums of a pilot sample's blocks (one CurvaturePartial per matrix)."""
        if not 0 < power <= 1:
            raise ValueError(f"whitening power must be in (0, 1], got {power}")
        bases, roots = {}, {}
        for name in sorted(curvature):
            part = curvature[name]
            values, vectors = torch.linalg.eigh(part.gfim().cpu())
            damped = values.clamp_min(0) + part.damping(PILOT_DAMPING)
            if not bool(damped.min() > 0):
                raise GradientMismatchError(f"the pilot's blocks of {name!r} are all zero: nothing to whiten by")
            bases[name] = vectors.to(torch.float32).contiguous()
            roots[name] = damped.pow(power).to(torch.float32)
        return cls(power=power, bases=bases, roots=roots)

    @property
    def widths(self) -> dict[str, int]:
        """name -> k, the block width each W_l acts on."""
        return {name: u.shape[0] for name, u in self.bases.items()}

    def _check(self, blocks: Mapping[str, Tensor]) -> None:
        widths = {name: int(t.shape[-1]) for name, t in blocks.items()}
        if widths != self.widths:
            raise GradientMismatchError(f"blocks of widths {widths} under a whitening of {self.widths}")

    def apply(self, blocks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """name -> (..., r, k) blocks b -> the stored blocks h = b U / roots, float32 on the blocks' device."""
        self._check(blocks)
        return {name: (b.to(torch.float32) @ self.bases[name].to(b.device)) / self.roots[name].to(b.device)
                for name, b in blocks.items()}

    def undo(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """name -> (..., r, k) stored blocks h -> the blocks b = (h * roots) U^T, float32 on their device."""
        self._check(rows)
        return {name: (h.to(torch.float32) * self.roots[name].to(h.device)) @ self.bases[name].to(h.device).T
                for name, h in rows.items()}

    def to_rows(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A block-space vector name -> (r, k) (a preconditioned query) -> its row-space form pv W^-T, so that
        <to_rows(pv), h> = <pv, b>; float64."""
        self._check(v)
        return {name: (t.to(torch.float64) @ self.bases[name].to(t.device, torch.float64))
                * self.roots[name].to(t.device, torch.float64) for name, t in v.items()}

    def digest(self) -> str:
        """16 hex chars of sha256 over the power and every matrix's basis and roots (sorted names)."""
        h = hashlib.sha256(f"whitening|{self.power!r}".encode())
        for name in sorted(self.bases):
            h.update(name.encode())
            h.update(self.bases[name].numpy().tobytes())
            h.update(self.roots[name].numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """One safetensors file (written to a temporary name, then renamed: never half written)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"basis/{n}": t for n, t in self.bases.items()} | {f"roots/{n}": t for n, t in self.roots.items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"power": repr(self.power)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Whitening:
        with safe_open(str(path), framework="pt") as fh:
            power = float(fh.metadata()["power"])
        tensors = load_file(str(path))
        bases = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("basis/")}
        roots = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("roots/")}
        return cls(power=power, bases=dict(sorted(bases.items())), roots=dict(sorted(roots.items())))
