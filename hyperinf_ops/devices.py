"""Where tensors go and in which precision, and how many examples fit on the device at once.

Devices: `auto` (or None) = CUDA when available, else CPU. Precision of the base model's weights: `auto` =
bfloat16 on a CUDA device that supports it, float32 elsewhere (LoRA weights, the classifier head, optimizer
state and per-example gradients are float32 whatever it is). Batches: on CUDA an `auto` batch is chosen from
`torch.cuda.mem_get_info()` and an estimate per example, and any batch that runs out of memory is halved and
retried (`run_with_backoff`); on CPU the configured size is kept.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

__all__ = ["BASE_DTYPES", "activation_bytes_per_example", "auto_batch_size", "free_device_memory", "is_out_of_memory", "resolve_device", "resolve_dtype",
           "resolve_dtype_name", "run_with_backoff", "use_checkpointing"]

BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# `gradient_checkpointing: auto` turns it on from this many tokens per example: the activations of a 1024-token
# example of a 30-layer model are ~2 GB in bf16 (a batch of them fills the card), while the recompute costs ~1/3
# of a forward.
CHECKPOINTING_FROM_TOKENS = 1024
MAX_AUTO_BATCH = 256
_FREE_SHARE = 0.7  # of the free device memory an `auto` batch may plan for (fragmentation, the allocator's slack)

T = TypeVar("T")
R = TypeVar("R")


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


def resolve_dtype_name(precision: str, device: str | torch.device | None = "auto") -> str:
    """The base weights' dtype name (`float32` / `bfloat16`) of a `precision` setting on `device`: `auto` =
    bfloat16 on a CUDA device with bf16 support, float32 elsewhere (CPU, MPS, older GPUs)."""
    if precision != "auto":
        if precision not in BASE_DTYPES:
            raise ValueError(f"precision {precision!r}: choose auto, float32 or bfloat16")
        return precision
    if str(device) in ("cpu", "mps"):
        return "float32"  # without asking torch about CUDA (config checks stay cheap)
    resolved = resolve_device(device)
    if resolved.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def resolve_dtype(precision: str, device: str | torch.device | None = "auto") -> torch.dtype:
    """`resolve_dtype_name` as a torch dtype."""
    return BASE_DTYPES[resolve_dtype_name(precision, device)]


def use_checkpointing(setting: bool | str, max_length: int) -> bool:
    """Whether to recompute activations in the backward: `auto` = from `CHECKPOINTING_FROM_TOKENS` tokens."""
    if setting == "auto":
        return max_length >= CHECKPOINTING_FROM_TOKENS
    return bool(setting)


def is_out_of_memory(err: BaseException) -> bool:
    """A device allocation failure (CUDA's OutOfMemoryError, or the RuntimeError older builds and MPS raise)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_device_memory(device: torch.device) -> None:
    """Collect garbage and hand CUDA's cached blocks back (after an out-of-memory)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def auto_batch_size(device: torch.device, bytes_per_example: float, *, fallback: int = 32,
                    cap: int = MAX_AUTO_BATCH) -> int:
    """Examples per batch that fit `_FREE_SHARE` of the device's free memory at `bytes_per_example` on CUDA: `cap`
    when that many fit, else the largest power of two that does (at least 1); `fallback` on CPU and other
    devices, where memory is the host's."""
    if device.type != "cuda":
        return fallback
    free, _total = torch.cuda.mem_get_info(device)
    fit = int(free * _FREE_SHARE // max(bytes_per_example, 1.0))
    if fit >= cap:
        return cap
    size = 1
    while size * 2 <= fit:
        size *= 2
    return size


def activation_bytes_per_example(config: Any, tokens: int, dtype: torch.dtype, *, checkpointing: bool,
                                 rank: int = 8, lora_per_layer: int = 2) -> float:
    """Rough device memory one example of `tokens` tokens needs in a forward + backward of a transformer with
    this Hugging Face `config` (what `auto_batch_size` divides by): saved activations (~34 values per hidden
    unit and token per layer without checkpointing, after Korthikanti et al. 2022; the layer inputs plus one
    layer's worth with it), the hooked LoRA inputs / outputs of the gradient pass, and the fp32 logits with
    their gradient. An estimate: `run_with_backoff` halves a batch it was wrong about."""
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 768))
    layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 12))
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 12))
    width = torch.finfo(dtype).bits // 8
    per_layer = 34 * tokens * hidden * width + 5 * heads * tokens * tokens * width
    saved = (layers * 2 * tokens * hidden * width + per_layer) if checkpointing else layers * per_layer
    lora = layers * lora_per_layer * tokens * (2 * hidden + rank) * 4  # x (and its grad side) kept in fp32
    logits = 3 * tokens * vocab * 4 if getattr(config, "is_decoder", False) or vocab > 1000 else 0
    return float(saved + lora + logits)


def run_with_backoff(items: Sequence[T], batch_size: int, fn: Callable[[Sequence[T]], R], *,
                     device: torch.device, on_backoff: Callable[[int, int], None] | None = None,
                     ) -> Iterator[tuple[Sequence[T], R]]:
    """(chunk, fn(chunk)) over `items` in order, `batch_size` at a time; when `fn` runs out of device memory the
    same chunk is retried at half the size (down to 1, then the error is raised) and the smaller size is kept.

    A chunk is yielded only once `fn` returned for it, so no item is skipped or yielded twice whatever fails;
    `on_backoff(old, new)` is told each halving."""
    start, size = 0, max(1, int(batch_size))
    while start < len(items):
        chunk = items[start: start + size]
        try:
            result = fn(chunk)
        except Exception as err:  # noqa: BLE001 - only an out-of-memory is handled; the rest is re-raised
            if not is_out_of_memory(err) or size == 1:
                raise
            free_device_memory(device)
            new = max(1, min(size, len(chunk)) // 2)
            if on_backoff is not None:
                on_backoff(size, new)
            size = new
            continue
        yield chunk, result
        start += len(chunk)
