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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from hyperinf_ops.errors import DataError, NonFiniteGradientError
from hyperinf_ops.settings import StorageDtype

__all__ = ["INT_LEVELS", "ROW_OVERHEAD", "STORAGE_DTYPES", "EncodedRows", "RowFormat"]

# Bytes a stored row has besides its vector and per-block floats: grad_scale, the fingerprint digest, sample_id and
# shard (README "Measured": 37,071-37,094 bytes on disk for MiniLM's 36,960-byte vectors). `RowFormat.row_bytes`.
ROW_OVERHEAD = 4 + 16 + 24 + 8

STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)
INT_LEVELS = {"int8": 127, "int4": 7}
_VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "int4": pa.uint8()}


@dataclass
class EncodedRows:
    """n rows as stored: values (n, stored_width) of the format's value type, grad_scale (n,) float32,
    block_scales (n, L) float32 for integer codes (None for floats)."""

    values: np.ndarray
    grad_scale: np.ndarray
    block_scales: np.ndarray | None


@dataclass(frozen=True)
class RowFormat:
    """The storage of rows whose blocks have sizes `blocks`, as `dtype` (see the module docstring)."""

    dtype: str
    blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"row dtype {self.dtype!r} is not one of {STORAGE_DTYPES}")
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))

    @property
    def width(self) -> int:
        """Floats a decoded row has."""
        return sum(self.blocks)

    @property
    def stored_width(self) -> int:
        """Values a stored row has (int4: two a byte)."""
        return (self.width + 1) // 2 if self.dtype == "int4" else self.width

    @property
    def value_type(self) -> pa.DataType:
        return _VALUE_TYPES[self.dtype]

    @property
    def integer(self) -> bool:
        return self.dtype in INT_LEVELS

    @property
    def row_bytes(self) -> int:
        """Bytes one stored row takes: its values, the squared norm of every block (float32) and, for integer
        codes, every block's step (float32), plus ROW_OVERHEAD. The count `hyperinf plan` prints and the
        compression row budget (`sketch.sketch_width`) is checked against."""
        per_block = 4 * (2 if self.integer else 1)
        return self.stored_width * self.value_type.bit_width // 8 + per_block * len(self.blocks) + ROW_OVERHEAD

    def _slices(self) -> list[slice]:
        out, start = [], 0
        for size in self.blocks:
            out.append(slice(start, start + size))
            start += size
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
        if self.dtype == "float32":
            return EncodedRows(x.numpy(), ones, None)
        if self.dtype == "float16":
            scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            out = torch.empty((n, self.width), dtype=torch.float16)
            torch.mul(x, (1 / scale)[:, None], out=out)  # torch converts ~5x faster than numpy here
            return EncodedRows(out.numpy(), scale.numpy(), None)
        levels = INT_LEVELS[self.dtype]
        codes = torch.empty((n, self.width), dtype=torch.int8)
        steps = torch.empty((n, len(self.blocks)), dtype=torch.float32)
        for j, cols in enumerate(self._slices()):
            block = x[:, cols]
            step = block.abs().amax(1) / levels
            step = torch.where(step > 0, step, torch.ones_like(step))
            steps[:, j] = step
            codes[:, cols] = torch.round(block / step[:, None]).clamp_(-levels, levels).to(torch.int8)
        if self.dtype == "int8":
            return EncodedRows(codes.numpy(), ones, steps.numpy())
        nibbles = torch.full((n, 2 * self.stored_width), 8, dtype=torch.uint8)  # 8 = code 0 (the padding)
        nibbles[:, : self.width] = (codes + 8).to(torch.uint8)
        packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        return EncodedRows(packed.numpy(), ones, steps.numpy())

    def decode(self, values: Tensor, grad_scale: Tensor, block_scales: Tensor | None = None, *,
               out: Tensor | None = None) -> Tensor:
        """Stored (b, stored_width) values (any device) -> (b, width) float32 rows, written into `out` when
        given (a (>= b, width) float32 buffer on the values' device; its first b rows are returned)."""
        b = len(values)
        out = torch.empty((b, self.width), dtype=torch.float32, device=values.device) if out is None else out[:b]
        if not self.integer:
            out.copy_(values)
            return out.mul_(grad_scale.to(out.device, torch.float32)[:, None])
        if block_scales is None:
            raise DataError(f"{self.dtype} rows need their block_scales")
        if self.dtype == "int8":
            out.copy_(values)
        else:
            low, high = values & 15, values >> 4
            out.copy_(torch.stack((low, high), dim=2).reshape(b, -1)[:, : self.width])
            out.sub_(8)
        steps = block_scales.to(out.device, torch.float32)
        for j, cols in enumerate(self._slices()):
            out[:, cols].mul_(steps[:, j: j + 1])
        return out
