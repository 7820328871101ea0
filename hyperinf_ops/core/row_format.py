"""How a gradient row is stored, and read back as float32.

A row is the float32 concatenation of its blocks, one per LoRA matrix in sorted name order (`blocks`: their
sizes r * k_l; raw, sketched or whitened, that is the caller's business). Stored, per `dtype`:

    float32   the row itself                                  grad_scale = 1
    float16   row / max|row|                                   grad_scale = max|row|
    int8      round(x / step_l), step_l = max|block_l| / 127   block_scales[l] = step_l
    int4      the same with 7 levels, two codes a byte         block_scales[l] = max|block_l| / 7

float16 rows carry their scale because LoRA gradient rows of well-fit examples underflow float16 (6e-8) otherwise.
Integer codes are symmetric round-to-nearest (error at most half a step), scaled per block because blocks differ
in magnitude; int4 codes are stored as code + 8 (1..15), value 2i in the low nibble of byte i, value 2i + 1 in
the high one (an odd row ends in a zero nibble). What integer codes cost in ranking quality, and why whitening the
blocks first is what makes 4 bits enough, is measured in docs/compression.md.

Factor rows (`rank` q > 0, issue 20): each (r, k) block h is stored as its best rank-q approximation
h_q = U_q U_q^T h, the factors U_q (r, q) (the top-q eigenvectors of h h^T, orthonormal columns) and
B = U_q^T h (q, k) (= S_q V_q^T), q (r + k) values instead of r k. A LoRA matrix's per-example gradient is nearly
rank 2 (SmolLM2 on the LLM demo: 96% of its energy in the top 2 of 8 singular values), so at r = 8 this keeps
d = 576 unsketched where dense rows would need a sketch to k = 128. Quantization `groups` (one step each for
integer codes): U_q, and every row of B cut into FACTOR_GROUP values (B's rows differ in scale by the singular
values, and in the whitened eigenbasis the scale drifts along a row). Decoding multiplies the factors back: every
reader sees dense (r, k) blocks. Measured in docs/compression.md ("Factor rows").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import get_args

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from hyperinf_ops.errors import DataError, NonFiniteGradientError
from hyperinf_ops.settings import StorageDtype

__all__ = ["FACTOR_GROUP", "INT_LEVELS", "ROW_OVERHEAD", "STORAGE_DTYPES", "EncodedRows", "RowFormat"]

# Bytes a stored row has besides its vector and per-block floats: grad_scale, the fingerprint digest, sample_id and
# shard (README "Measured": 37,071-37,094 bytes on disk for MiniLM's 36,960-byte vectors). `RowFormat.row_bytes`.
ROW_OVERHEAD = 4 + 16 + 24 + 8

STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)
INT_LEVELS = {"int8": 127, "int4": 7}
# Values of a factor row's B that share one integer step: 96 fits SmolLM2's rank-2 unsketched rows in 64 KB
# (64,372 bytes) and costs hyperinf 0.003 Spearman against 32 (docs/compression.md, "Factor rows").
FACTOR_GROUP = 96
_VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "int4": pa.uint8()}


@dataclass
class EncodedRows:
    """n rows as stored: values (n, stored_width) of the format's value type, grad_scale (n,) float32,
    block_scales (n, G) float32 for integer codes, one per quantization group (None for floats)."""

    values: np.ndarray
    grad_scale: np.ndarray
    block_scales: np.ndarray | None


@dataclass(frozen=True)
class RowFormat:
    """The storage of rows whose blocks have sizes `blocks`, as `dtype` (see the module docstring); `rank` > 0:
    factor rows of that rank, every block having `lora_rank` rows (r)."""

    dtype: str
    blocks: tuple[int, ...]
    rank: int = 0
    lora_rank: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"row dtype {self.dtype!r} is not one of {STORAGE_DTYPES}")
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.rank and not (0 < self.rank < self.lora_rank and all(b % self.lora_rank == 0 for b in self.blocks)):
            raise ValueError(f"factor rows of rank {self.rank} need blocks of lora_rank > {self.rank} rows; got "
                             f"lora_rank {self.lora_rank} and blocks {self.blocks}")

    @property
    def width(self) -> int:
        """Floats a decoded row has."""
        return sum(self.blocks)

    @cached_property  # read on every encode / decode: computed once per format (not a field: eq and hash ignore it)
    def groups(self) -> tuple[int, ...]:
        """Sizes of the quantization groups, in stored order: the blocks themselves for dense rows; for factor rows,
        per block U_q (r q values) then each of B's q rows in FACTOR_GROUP pieces."""
        if not self.rank:
            return self.blocks
        out: list[int] = []
        for size in self.blocks:
            k = size // self.lora_rank
            out.append(self.lora_rank * self.rank)
            for _ in range(self.rank):
                out.extend([FACTOR_GROUP] * (k // FACTOR_GROUP) + ([k % FACTOR_GROUP] if k % FACTOR_GROUP else []))
        return tuple(out)

    @property
    def values(self) -> int:
        """Values a stored row holds before packing (the width, or the factors' q (r + k) per block)."""
        return sum(self.groups)

    @property
    def stored_width(self) -> int:
        """Values a stored row has (int4: two a byte)."""
        return (self.values + 1) // 2 if self.dtype == "int4" else self.values

    @property
    def value_type(self) -> pa.DataType:
        return _VALUE_TYPES[self.dtype]

    @property
    def integer(self) -> bool:
        return self.dtype in INT_LEVELS

    @property
    def row_bytes(self) -> int:
        """Bytes one stored row takes: its values, the squared norm of every block (float32) and, for integer
        codes, every quantization group's step (float32), plus ROW_OVERHEAD. The count `hyperinf plan` prints and
        the compression row budget (`sketch.row_layout`) is checked against."""
        steps = 4 * len(self.groups) if self.integer else 0
        return self.stored_width * self.value_type.bit_width // 8 + steps + 4 * len(self.blocks) + ROW_OVERHEAD

    @staticmethod
    def _slices(sizes: tuple[int, ...]) -> list[slice]:
        out, start = [], 0
        for size in sizes:
            out.append(slice(start, start + size))
            start += size
        return out

    def _factors(self, x: Tensor) -> Tensor:
        """(n, width) dense rows -> (n, values) factor values: per block U_q (r, q) then B = U_q^T h (q, k),
        row-major. U_q from the eigenvectors of the (r, r) Gram h h^T in float64 (sign fixed: each column's
        largest entry positive, so equal rows give equal codes)."""
        r, q, n = self.lora_rank, self.rank, len(x)
        out = torch.empty((n, self.values), dtype=torch.float32)
        start = 0
        for cols in self._slices(self.blocks):
            h = x[:, cols].reshape(n, r, -1).to(torch.float64)
            u = torch.linalg.eigh(h @ h.transpose(1, 2))[1][:, :, -q:].flip(2)  # (n, r, q), largest first
            sign = torch.sign(u.gather(1, u.abs().argmax(1, keepdim=True)))
            u = u * torch.where(sign == 0, 1.0, sign)
            b = u.transpose(1, 2) @ h  # (n, q, k)
            out[:, start: start + r * q] = u.reshape(n, -1)
            out[:, start + r * q: start + r * q + b[0].numel()] = b.reshape(n, -1)
            start += r * q + b[0].numel()
        return out

    def _expand(self, v: Tensor, out: Tensor) -> Tensor:
        """(b, values) factor values -> (b, width) dense rows U_q B, into `out`."""
        r, q, b = self.lora_rank, self.rank, len(v)
        start = 0
        for cols in self._slices(self.blocks):
            k = (cols.stop - cols.start) // r
            u = v[:, start: start + r * q].reshape(b, r, q)
            factor = v[:, start + r * q: start + r * q + q * k].reshape(b, q, k)
            out[:, cols].view(b, r, k).copy_(torch.bmm(u, factor))
            start += r * q + q * k
        return out

    def encode(self, rows: np.ndarray | Tensor) -> EncodedRows:
        """(n, width) float32 rows -> EncodedRows; DataError on another width, NonFiniteGradientError on a
        non-finite value."""
        x = torch.as_tensor(rows, dtype=torch.float32)
        n = len(x)
        if x.ndim != 2 or x.shape[1] != self.width:
            raise DataError(f"gradient rows of {self.width} floats expected, got shape {tuple(x.shape)}")
        # max |x| per row without a temporary; NaN / inf propagate into it, so it doubles as the finiteness check.
        absmax = torch.maximum(x.amax(1), -x.amin(1)) if n else torch.zeros(0)
        if not bool(torch.isfinite(absmax).all()):
            raise NonFiniteGradientError("non-finite gradient rows")
        ones = np.ones(n, np.float32)
        if self.rank:
            x = self._factors(x)
        if self.dtype == "float32":
            return EncodedRows(x.numpy(), ones, None)
        if self.dtype == "float16":
            scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            out = torch.empty((n, self.values), dtype=torch.float16)
            torch.mul(x, (1 / scale)[:, None], out=out)  # torch converts ~5x faster than numpy here
            return EncodedRows(out.numpy(), scale.numpy(), None)
        levels = INT_LEVELS[self.dtype]
        codes = torch.empty((n, self.values), dtype=torch.int8)
        steps = torch.empty((n, len(self.groups)), dtype=torch.float32)
        for j, cols in enumerate(self._slices(self.groups)):
            block = x[:, cols]
            step = block.abs().amax(1) / levels
            step = torch.where(step > 0, step, torch.ones_like(step))
            steps[:, j] = step
            codes[:, cols] = torch.round(block / step[:, None]).clamp_(-levels, levels).to(torch.int8)
        if self.dtype == "int8":
            return EncodedRows(codes.numpy(), ones, steps.numpy())
        nibbles = torch.full((n, 2 * self.stored_width), 8, dtype=torch.uint8)  # 8 = code 0 (the padding)
        nibbles[:, : self.values] = (codes + 8).to(torch.uint8)
        packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        return EncodedRows(packed.numpy(), ones, steps.numpy())

    def decode(self, values: Tensor, grad_scale: Tensor, block_scales: Tensor | None = None, *,
               out: Tensor | None = None) -> Tensor:
        """Stored (b, stored_width) values (any device) -> (b, width) float32 rows, written into `out` when
        given (a (>= b, width) float32 buffer on the values' device; its first b rows are returned)."""
        b = len(values)
        out = torch.empty((b, self.width), dtype=torch.float32, device=values.device) if out is None else out[:b]
        # factor rows decode their values into a buffer and multiply the factors out into `out`
        flat = torch.empty((b, self.values), dtype=torch.float32, device=values.device) if self.rank else out
        if not self.integer:
            flat.copy_(values)
            flat.mul_(grad_scale.to(out.device, torch.float32)[:, None])
            return self._expand(flat, out) if self.rank else out
        if block_scales is None:
            raise DataError(f"{self.dtype} rows need their block_scales")
        if self.dtype == "int8":
            flat.copy_(values)
        else:
            low, high = values & 15, values >> 4
            flat.copy_(torch.stack((low, high), dim=2).reshape(b, -1)[:, : self.values])
            flat.sub_(8)
        steps = block_scales.to(out.device, torch.float32)
        for j, cols in enumerate(self._slices(self.groups)):
            flat[:, cols].mul_(steps[:, j: j + 1])
        return self._expand(flat, out) if self.rank else out
