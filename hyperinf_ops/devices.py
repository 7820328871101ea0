"""The one rule for where tensors go: `auto` (or None) = CUDA when available, else CPU."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` / None = CUDA when `torch.cuda.is_available()`, else CPU; anything else as torch spells it.

    Raises ValueError for a CUDA device on a machine without CUDA, instead of torch's assertion deep in a run.
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} was asked for, but this torch build sees no CUDA device; "
                         "use `device: auto` or `cpu`")
    return device
