"""What made a stored gradient row: rows with different fingerprints must never be scored together.

Scores are inner products between stored rows and a query built from the same model, adapter, LoRA
matrices and row compression; mixing any of these silently gives meaningless rankings (peers learned this the
hard way, see docs/tables.md). Damping is a query-time choice and is deliberately not part of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from hyperinf_ops.core.row_format import RowFormat
from hyperinf_ops.core.sketch import row_layout, row_shapes
from hyperinf_ops.errors import FingerprintMismatchError
from hyperinf_ops.settings import CompressionSpec

__all__ = ["Fingerprint", "tensor_hash", "shapes_hash", "model_hashes", "require_match"]


def _update_with_tensor(h: Any, name: str, value: Any) -> None:
    arr = (
        value.detach().cpu().contiguous() if isinstance(value, torch.Tensor) else np.ascontiguousarray(value)
    )
    h.update(f"{name}|{arr.dtype}|{tuple(arr.shape)}|".encode())
    if isinstance(arr, torch.Tensor):
        # bfloat16 has no numpy dtype: hash the raw bytes through a same-width integer view.
        arr = arr.view(torch.int16) if arr.dtype == torch.bfloat16 else arr
        arr = arr.numpy()
    h.update(memoryview(arr).cast("B"))


def tensor_hash(tensors: Any, extra: str = "") -> str:
    """sha256 (hex) of a state dict (or anything with `state_dict()`), over sorted names, dtypes, shapes, bytes.

    `extra` (e.g. a model config as JSON) is hashed in too.
    """
    state = tensors.state_dict() if hasattr(tensors, "state_dict") else tensors
    h = hashlib.sha256(extra.encode())
    for name in sorted(state):
        _update_with_tensor(h, name, state[name])
    return h.hexdigest()


def shapes_hash(shapes: Mapping[str, tuple[int, int]]) -> str:
    """sha256 (hex, 16 chars) of the LoRA matrix names and (r, d) shapes, in sorted order."""
    text = json.dumps([[name, list(shapes[name])] for name in sorted(shapes)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_hashes(model: torch.nn.Module) -> tuple[str, str]:
    """(base hash, adapter hash) of a peft model: base weights + config, and the LoRA weights alone."""
    state = model.state_dict()
    lora = {k: v for k, v in state.items() if "lora_" in k}
    base = {k: v for k, v in state.items() if "lora_" not in k}
    config = getattr(model, "config", None)
    config_json = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else ""
    return tensor_hash(base, extra=config_json), tensor_hash(lora)


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a gradient row. Every field must match for rows and queries to be combined."""

    model_id: str
    model_hash: str
    adapter_hash: str
    task: str
    lora_modules: tuple[str, ...]
    rank: int
    matrices_hash: str
    sketch_dim: int  # per LoRA matrix, as stored (the width rule's when it picked one: sketch_width); 0 = raw
    sketch_seed: int
    row_dtype: str
    row_blocks: tuple[int, ...]  # floats of each matrix's (r, k) block in a row, sorted names
    whitening: str = ""  # digest of the whitening the blocks are stored under ("" = none; whitening.py)
    grad_dtype: str = "float32"
    loss_reduction: str = "mean"
    # the dtype the base weights ran in: a bf16 pass gives other gradients than an fp32 one (devices.py). Left out
    # of the JSON (and so of the digest) when float32, so rows stored before the field existed stay current.
    model_dtype: str = "float32"
    # factor rows' rank (row_format.py; 0 = dense rows). Left out of the JSON when 0, as model_dtype when float32.
    row_rank: int = 0

    def __post_init__(self) -> None:
        # JSON round trips give lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "lora_modules", tuple(self.lora_modules))
        object.__setattr__(self, "row_blocks", tuple(int(b) for b in self.row_blocks))

    @property
    def row_width(self) -> int:
        """Floats a (decoded) row has."""
        return sum(self.row_blocks)

    @property
    def row_format(self) -> RowFormat:
        """How the rows are stored (row_format.py)."""
        return RowFormat(self.row_dtype, self.row_blocks, self.row_rank, self.rank if self.row_rank else 0)

    @classmethod
    def create(
        cls,
        *,
        model_id: str,
        model_hash: str,
        adapter_hash: str,
        task: str,
        lora_modules: tuple[str, ...] | list[str],
        shapes: Mapping[str, tuple[int, int]],
        compression: CompressionSpec,
        whitening: str = "",
        grad_dtype: str = "float32",
        loss_reduction: str = "mean",
        model_dtype: str = "float32",
    ) -> Fingerprint:
        """Fingerprint from the raw matrix shapes (rank read from them), how rows are compressed and the digest
        of the whitening they are stored under (required when `compression.whitened`)."""
        if compression.whitened != bool(whitening):
            raise ValueError(f"compression.whiten = {compression.whiten} but whitening digest {whitening!r}")
        ranks = {int(r) for r, _ in shapes.values()}
        if len(ranks) != 1:
            raise ValueError(f"LoRA matrices disagree on rank: {sorted(ranks)}")
        sketch_dim, row_rank = row_layout(shapes, compression)
        return cls(
            model_id=model_id,
            model_hash=model_hash,
            adapter_hash=adapter_hash,
            task=task,
            lora_modules=tuple(lora_modules),
            rank=ranks.pop(),
            matrices_hash=shapes_hash(shapes),
            sketch_dim=sketch_dim,
            row_rank=row_rank,
            sketch_seed=compression.seed,
            row_dtype=compression.dtype,
            row_blocks=tuple(r * k for r, k in row_shapes(shapes, compression).values()),
            whitening=whitening,
            grad_dtype=grad_dtype,
            loss_reduction=loss_reduction,
            model_dtype=model_dtype,
        )

    def to_json(self) -> str:
        data = asdict(self)
        if data["model_dtype"] == "float32":
            del data["model_dtype"]
        if not data["row_rank"]:
            del data["row_rank"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fingerprint fields {unknown}")
        return cls(**data)

    def digest(self) -> str:
        """Short (16 hex chars) sha256 of the canonical JSON: the value stored on every row."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def diff(self, other: Fingerprint) -> list[str]:
        """Names of the fields whose values differ, in declaration order."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def require_match(expected: Fingerprint, found: Fingerprint | None, where: str) -> None:
    """Raise FingerprintMismatchError naming every differing field with both values (`found` None: unknown)."""
    if found is None:
        raise FingerprintMismatchError(
            f"{where}: rows carry a fingerprint whose description is missing; expected {expected.digest()}"
        )
    names = expected.diff(found)
    if names:
        details = "; ".join(
            f"{n}: expected {getattr(expected, n)!r}, found {getattr(found, n)!r}" for n in names
        )
        raise FingerprintMismatchError(
            f"{where}: fingerprint mismatch ({expected.digest()} vs {found.digest()}) in {details}"
        )
