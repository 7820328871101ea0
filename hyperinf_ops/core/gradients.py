"""Per-example LoRA gradients from ONE batched forward/backward.

For a linear map ``y = x W^T`` applied at every token, the gradient of example b's loss is
``dL_b/dW = sum_t dy_{b,t}^T x_{b,t}``. Example b's loss depends only on row b of the batch (model in eval
mode: no dropout, and transformers have no cross-example layers), so backpropagating the SUM of the
per-example losses gives every row ``dy_b = dL_b/dy_b``; one einsum over tokens then yields all per-example
weight gradients. Forward hooks on each selected ``lora_A`` / ``lora_B`` ``nn.Linear`` capture the input
``x (B, T, d_in)`` and keep the output ``y (B, T, d_out)`` in the graph; ``torch.autograd.grad`` on those
outputs returns ``dy`` without computing (or touching) any parameter ``.grad``. peft multiplies the
``lora_B`` output by ``scaling`` after the hooked module, so ``dy`` already carries the scaling.

Precision: with half-precision base weights (bf16 on CUDA) peft keeps the LoRA matrices in float32 and casts
their input up, so ``x`` and ``dy`` are float32 and so are the gradients; half-precision ones (a model cast
whole) are cast up before the einsum: the gradients are always summed and returned in float32 or wider.
Activation checkpointing (``checkpointing=True``, models/checkpointing.py) recomputes each layer in the backward;
the hooks capture only during the forward, so the recompute adds nothing and the gradients are the same.

Supported: peft LoRA on ``nn.Linear`` layers (``lora.Linear``; GPT-2 ``Conv1D`` with ``fan_in_fan_out``
also works because its ``lora_A`` / ``lora_B`` are plain ``nn.Linear``), for
``*ForSequenceClassification`` (single-label) and ``*ForCausalLM`` / ``*LMHeadModel`` heads. Not supported
(clear error): LoRA variants (DoRA, ...), convolution LoRA, merged or disabled adapters. Embedding LoRA
(``lora_embedding_A/B``) and a ``lora_bias`` bias are not lora_A / lora_B weights and are never returned.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from hyperinf_ops.core.stacks import select_matrices
from hyperinf_ops.errors import DataError, GradientMismatchError
from hyperinf_ops.signals.outputs import ExampleOutputs
from hyperinf_ops.tasks import Task, task_for_model

GradDict = dict[str, Tensor]


@dataclass(frozen=True)
class _LoraMatrix:
    name: str  # full parameter name, e.g. "...query.lora_A.default.weight"
    module: nn.Module
    is_b: bool  # lora_B weight is (d_out, r); returned transposed as (r, d_out)

    def shape(self) -> tuple[int, int]:
        """(r, d): (r, d_in) for lora_A, (r, d_out) for lora_B."""
        rows, cols = self.module.weight.shape
        return (cols, rows) if self.is_b else (rows, cols)


def _lora_matrices(model: nn.Module, modules: Sequence[str] | str | None) -> list[_LoraMatrix]:
    """The selected lora_A / lora_B matrices of the active adapters, sorted by parameter name."""
    found: list[_LoraMatrix] = []
    variants: dict[str, str] = {}
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter in layer.active_adapters:
            for kind, container in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                if adapter in container:
                    name = f"{layer_name}.{kind}.{adapter}.weight"
                    found.append(_LoraMatrix(name, container[adapter], kind == "lora_B"))
                    if adapter in getattr(layer, "lora_variant", {}):
                        variants[name] = type(layer.lora_variant[adapter]).__name__
    if not found:
        raise GradientMismatchError(
            f"{type(model).__name__} has no LoRA matrices (lora_A / lora_B of an active adapter); "
            "wrap it with peft LoRA first"
        )
    chosen = set(select_matrices([m.name for m in found], modules))
    selected = [m for m in found if m.name in chosen]
    for m in selected:
        if m.name in variants:
            raise GradientMismatchError(
                f"{m.name}: LoRA variant {variants[m.name]} (e.g. DoRA) is not supported"
            )
        if not isinstance(m.module, nn.Linear):
            raise GradientMismatchError(
                f"{m.name}: only nn.Linear LoRA matrices are supported, got {type(m.module).__name__}"
            )
    return sorted(selected, key=lambda m: m.name)


def lora_matrix_shapes(
    model: nn.Module, modules: Sequence[str] | str | None = None
) -> dict[str, tuple[int, int]]:
    """Parameter name -> (r, d) of each selected LoRA matrix, sorted by name (the per-example grad shape)."""
    return {m.name: m.shape() for m in _lora_matrices(model, modules)}


def _base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a peft wrapper (or the model itself when LoRA was injected directly)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _padding_aware_positions(base: nn.Module) -> bool:
    """True for RoBERTa-style models: a position table with a padding row means the model derives
    padding-aware, offset positions from ``input_ids`` itself, so 0-based ``position_ids`` would be wrong."""
    return any(
        name.endswith("position_embeddings") and isinstance(mod, nn.Embedding) and mod.padding_idx is not None
        for name, mod in base.named_modules()
    )


def _prepare(
    base: nn.Module, batch: Mapping[str, Tensor], task: Task, device: torch.device
) -> tuple[dict[str, Tensor | bool], Tensor, Tensor]:
    """Validate ``batch``; return the forward kwargs, the loss targets (the task's: class ids or shifted
    tokens) and the token mask (B, T), all on ``device``."""
    if batch.get("input_ids") is None:
        raise DataError("batch has no 'input_ids'")
    if batch.get("labels") is None:
        raise DataError("batch has no 'labels': per-example gradients need the loss on the given label")
    ids = batch["input_ids"].to(device)
    if ids.dim() != 2:
        raise DataError(f"input_ids must be (B, T), got shape {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    labels = task.loss_targets(base, batch["labels"].to(device), mask)

    kwargs: dict[str, Tensor | bool] = {"input_ids": ids, "attention_mask": mask}
    accepted = inspect.signature(base.forward).parameters
    if batch.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = batch["token_type_ids"].to(device)
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"].to(device)
    elif "position_ids" in accepted and not _padding_aware_positions(base):
        # positions count real tokens only, so a left-padded row sees the positions it has unpadded (rotary!)
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    if "use_cache" in accepted:
        kwargs["use_cache"] = False  # a KV cache is pure overhead for a single scoring pass
    return kwargs, labels, mask


def _capture(store: list[tuple[Tensor, Tensor]], active: list[bool]) -> Callable[[nn.Module, tuple, Tensor], None]:
    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        if active[0]:  # off once the forward is done: a checkpointed backward calls the module again
            store.append((args[0].detach(), output))  # output stays in the graph: autograd.grad targets it

    return hook


def _linear_per_example_grad(x: Tensor, dy: Tensor, mask: Tensor, m: _LoraMatrix) -> Tensor:
    """Per-example weight grad of ``y = x W^T``: (B, r, d_in) for lora_A, (B, r, d_out) for lora_B.

    x: (B, T, d_in) or (B, d_in); dy: (B, T, d_out) or (B, d_out); mask: (B, T) token mask. Half-precision
    inputs are cast up: the sum over tokens is float32.
    """
    if x.dtype in (torch.float16, torch.bfloat16) or dy.dtype in (torch.float16, torch.bfloat16):
        x, dy = x.float(), dy.float()
    if x.dim() == 2 and x.shape[0] == mask.shape[0]:
        x, dy = x[:, None], dy[:, None]  # one vector per example (e.g. a pooler): no token axis to mask
    elif x.dim() == 3 and x.shape[:2] == mask.shape:
        # zero padded tokens on the rank-r side (the smaller tensor) so padding cannot contribute
        if m.is_b:
            x = x * mask[..., None].to(x.dtype)
        else:
            dy = dy * mask[..., None].to(dy.dtype)
    else:
        raise GradientMismatchError(
            f"{m.name}: input of shape {tuple(x.shape)} does not line up with the batch {tuple(mask.shape)}"
        )
    if m.is_b:
        return torch.einsum("btr,bto->bro", x, dy)
    return torch.einsum("btr,btd->brd", dy, x)


def _checkpointing(model: nn.Module, enabled: bool) -> AbstractContextManager:
    if not enabled:
        return nullcontext()
    # imported here: hyperinf_ops.models imports the core modules, and most passes do not checkpoint
    from hyperinf_ops.models.checkpointing import activation_checkpointing

    return activation_checkpointing(model)


def per_example_lora_gradients(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    modules: Sequence[str] | str | None = None,
    dtype: torch.dtype | None = None,
    checkpointing: bool = False,
) -> GradDict:
    """Gradient of each example's own loss w.r.t. each selected LoRA matrix, from one forward/backward
    (`lora_gradients_and_outputs` without the outputs)."""
    return lora_gradients_and_outputs(model, batch, modules=modules, dtype=dtype, checkpointing=checkpointing)[0]


def lora_gradients_and_outputs(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    modules: Sequence[str] | str | None = None,
    dtype: torch.dtype | None = None,
    checkpointing: bool = False,
) -> tuple[GradDict, ExampleOutputs]:
    """Gradient of each example's own loss w.r.t. each selected LoRA matrix, from one forward/backward, and
    what that forward said about each example (its loss; logits and given class for classification heads).

    Args:
        model: a peft LoRA model with a ``*ForSequenceClassification`` (single-label cross-entropy) or
            ``*ForCausalLM`` / ``*LMHeadModel`` head (loss = mean over the example's valid next-token
            targets).
        batch: ``input_ids`` (B, T), ``attention_mask`` (B, T) (optional, default all ones), ``labels``:
            (B,) class ids or (B, T) token ids with -100 ignored; optional ``token_type_ids`` /
            ``position_ids`` are passed on. Left or right padding (padded tokens never contribute); models
            that pool the first token (BERT, RoBERTa) need right padding, as they do for training.
        modules: substrings of the parameter names selecting LoRA matrices (e.g. ``["query"]``,
            ``["layers.5."]``); None = all lora_A / lora_B matrices of the active adapters.
        dtype: optional dtype of the returned grads (computed in the LoRA matrices' dtype, float32 at least).
        checkpointing: recompute each transformer layer's activations in the backward (models/checkpointing.py):
            less memory for long sequences, the same gradients.

    Returns:
        name -> (B, r, d) on the model's device, keys sorted; ``lora_A`` as (r, d_in), ``lora_B``
        transposed to (r, d_out); and the batch's `ExampleOutputs` (CPU). The model runs in eval mode (LoRA dropout off); its train/eval modes,
        ``requires_grad`` flags and ``.grad`` fields are left as they were.
    """
    matrices = _lora_matrices(model, modules)
    base = _base_model(model)
    task = task_for_model(base)
    inputs, labels, mask = _prepare(base, batch, task, matrices[0].module.weight.device)

    captures: dict[str, list[tuple[Tensor, Tensor]]] = {m.name: [] for m in matrices}
    active = [True]
    modes = {mod: mod.training for mod in model.modules()}
    # a frozen LoRA matrix's output carries no graph: enable its weight for the pass (.grad stays untouched)
    frozen = [m.module.weight for m in matrices if not m.module.weight.requires_grad]
    handles = [m.module.register_forward_hook(_capture(captures[m.name], active)) for m in matrices]
    try:
        model.eval()
        for w in frozen:
            w.requires_grad_(True)
        with torch.enable_grad(), _checkpointing(model, checkpointing):
            logits = model(**inputs).logits
            active[0] = False
            losses = task.per_example_losses(logits, labels)
            unused = [name for name, calls in captures.items() if not calls]
            if unused:
                raise GradientMismatchError(
                    f"LoRA matrices not used in the forward pass (merged or disabled adapter?): {unused[:3]}"
                )
            outputs = [y for m in matrices for _, y in captures[m.name]]
            # a layer the loss does not depend on gets exact zeros instead of an error
            douts = iter(
                torch.autograd.grad(losses.sum(), outputs, allow_unused=True, materialize_grads=True)
            )
        grads: GradDict = {}
        for m in matrices:
            # a module called several times per forward (shared layers) sums its calls' contributions
            g = sum(_linear_per_example_grad(x, next(douts), mask, m) for x, _ in captures[m.name])
            grads[m.name] = g if dtype is None else g.to(dtype)
        return grads, ExampleOutputs.of(losses, logits, labels)
    finally:
        for h in handles:
            h.remove()
        for w in frozen:
            w.requires_grad_(False)
        for mod, training in modes.items():
            mod.training = training
        captures.clear()  # drop activations and the graph now, not when the caller's frame ends
