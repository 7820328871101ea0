"""Activation (gradient) checkpointing of a transformer's layers, in train and in eval mode alike.

Hugging Face's own `gradient_checkpointing_enable` only acts in training mode, but the gradient pass runs the
model in eval mode (no dropout). `activation_checkpointing(model)` instead wraps each decoder / encoder layer's
`forward` in `torch.utils.checkpoint.checkpoint(use_reentrant=False)` for the duration of a `with` block: the
forward keeps only each layer's inputs, and the backward recomputes the layer (with the RNG state of the forward,
so dropout masks repeat). The non-reentrant variant keeps one autograd graph, so `torch.autograd.grad` on tensors
inside a layer (the gradient pass's LoRA outputs) still works, and the gradients equal those without it. Forward
hooks on modules inside a layer fire again during the recompute: `core/gradients.py` stops capturing before it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["activation_checkpointing", "checkpoint_layers"]

_LAYER_LISTS = ("layers", "layer", "h", "blocks")


def checkpoint_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer layers of `model` (Hugging Face `GradientCheckpointingLayer`s, else the elements
    of a `ModuleList` named layers / layer / h / blocks), outermost first, none nested in another."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers
        GradientCheckpointingLayer = ()  # noqa: N806
    found = [m for m in model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    if not found:
        for name, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LISTS and len(mod):
                found.extend(mod)
    inner = {id(sub) for m in found for sub in m.modules() if sub is not m}
    return [m for m in found if id(m) not in inner]


# A KV cache written in the forward would be written again by the recompute (as Hugging Face, drop it: training
# and the gradient pass never read it).
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)  # no backward to recompute for (evaluation)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    for key in _CACHE_KWARGS:
        if kwargs.get(key) is not None:
            kwargs[key] = None
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Checkpoint every layer of `checkpoint_layers(model)` inside the block; yields how many (0 when disabled or
    the model has no recognisable layers: it then runs as usual)."""
    layers = checkpoint_layers(model) if enabled else []
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)  # the instance attribute shadows the class's
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward
