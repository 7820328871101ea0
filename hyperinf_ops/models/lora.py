"""A model with a LoRA adapter, fresh or saved, and what is needed to feed it batches.

`load_lora_model` builds the task's head model (`tasks.Task.load_model`) with a peft LoRA adapter: fresh
(seeded; `LoraSettings` decide its shape and modules) or loaded from a saved adapter folder (including the
classifier head, which peft saves as `modules_to_save`). `adapter_hash` identifies the adapter's tensors.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from hyperinf_ops.devices import resolve_device, resolve_dtype, use_checkpointing
from hyperinf_ops.errors import ConfigError, DataError, ModelLoadError
from hyperinf_ops.fingerprint import tensor_hash
from hyperinf_ops.models.pooling import pooling_of, use_mean_pooling
from hyperinf_ops.models.registry import resolve_model
from hyperinf_ops.settings import LoraSettings, ModelSpec
from hyperinf_ops.tasks import Task, get_task

__all__ = ["LoadedModel", "adapter_hash", "adapter_parameters", "batches", "load_lora_model"]

# Attention query/value projections under their usual names (BERT, Llama, GPT-2, DistilBERT):
# the first family fully present in a model is the LoRA default when `lora.modules` is not set.
DEFAULT_MODULE_FAMILIES = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",), ("q_lin", "v_lin"))


@dataclass
class LoadedModel:
    """A LoRA-wrapped model ready for training or gradients, and what is needed to feed it."""

    model: PeftModel
    tokenizer: Any
    label2id: dict[str, int]  # empty for causal LM
    task: Task
    device: torch.device
    model_path: Path
    lora_modules: tuple[str, ...]
    pooling: str = "model"  # what the classifier head reads: "mean" (masked token mean) or the model's own
    dtype: torch.dtype = torch.float32  # the base weights' (LoRA weights and the classifier head: float32)
    checkpointing: bool = False  # recompute layer activations in the backward (models/checkpointing.py)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def load_lora_model(spec: ModelSpec, labels: Sequence[str], *, lora: LoraSettings | None = None,
                    adapter_dir: Path | None = None, seed: int = 0, cache_dir: Path | None = None) -> LoadedModel:
    """`spec`'s model with a LoRA adapter: loaded from `adapter_dir`, or fresh with `lora`'s shape (seeded).

    Classification needs the `labels` (their order fixes the class ids: pass them sorted); a fresh adapter
    gets a new classifier head, trained as a peft `modules_to_save`. A saved adapter brings its own LoRA
    settings; `lora` describes new adapters only. The base weights are loaded in `spec.precision`
    (devices.resolve_dtype); the LoRA matrices and the classifier head are float32 whatever it is (the head casts
    its input up), so the optimizer and the per-example gradients work in float32.
    """
    if (lora is None) == (adapter_dir is None):
        raise ValueError("pass exactly one of `lora` (a fresh adapter) or `adapter_dir` (a saved one)")
    path = resolve_model(spec.name, cache_dir=cache_dir)
    task = get_task(spec.task)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.precision, device)
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load a tokenizer from {path}: {err}") from err
        if tokenizer.pad_token is None:  # decoder tokenizers often have none; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if task.has_classes and len(labels) < 2:
            raise DataError(f"classification needs at least 2 labels, the pool has {list(labels)}")
        label2id = {str(name): i for i, name in enumerate(labels)} if task.has_classes else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the fresh head and LoRA A are seeded, without touching the global RNG
            try:
                base = task.load_model(path, list(label2id), dtype=dtype)
            except (OSError, ValueError, KeyError) as err:
                raise ModelLoadError(f"cannot load a {task.name} model from {path}: {err}") from err
            pooling = "model"
            if task.has_classes:
                base.config.pad_token_id = tokenizer.pad_token_id
                pooling = "mean" if pooling_of(path) == "mean" and use_mean_pooling(base) else "model"
                if dtype != torch.float32:
                    _float32_heads(base)  # before peft copies the head: a saved fp32 head loads without rounding
            model, modules = _with_adapter(base, task, lora, adapter_dir)
            _float32_adapter(model)
    return LoadedModel(model=model.to(device), tokenizer=tokenizer, label2id=label2id, task=task, device=device,
                       model_path=path, lora_modules=modules, pooling=pooling, dtype=dtype,
                       checkpointing=use_checkpointing(spec.gradient_checkpointing, spec.max_length))


# The classifier heads peft trains as `modules_to_save` for sequence classification (peft's SEQ_CLS list).
_HEAD_NAMES = ("classifier", "score")


def _float_inputs(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def _float32_heads(base: nn.Module) -> None:
    """Cast the classifier head to float32 and make it cast its (half-precision) input up, so the head trains and
    its logits come out in float32 under half-precision base weights."""
    for name, mod in base.named_modules():
        if name.rsplit(".", 1)[-1] in _HEAD_NAMES:
            mod.float()
            mod.register_forward_pre_hook(_float_inputs)


def _float32_adapter(model: nn.Module) -> None:
    """LoRA matrices in float32 (peft already upcasts the LoRA weights of a half-precision model; this covers every
    other path), so AdamW and the per-example gradients never work in bf16 (peft casts a LoRA input up)."""
    for name, param in model.named_parameters():
        if "lora_" in name and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def _with_adapter(base: nn.Module, task: Task, lora: LoraSettings | None,
                  adapter_dir: Path | None) -> tuple[PeftModel, tuple[str, ...]]:
    if adapter_dir is not None:
        try:
            model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise ModelLoadError(f"adapter {adapter_dir} does not fit the model: {err}") from err
        saved = model.peft_config["default"].target_modules
        return model, ((saved,) if isinstance(saved, str) else tuple(sorted(saved)))
    modules = lora.modules or _default_modules(base)
    _check_modules(base, modules)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(modules),
                        lora_dropout=lora.dropout, task_type=task.peft_task_type)
    return get_peft_model(base, config), tuple(modules)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars for one load, then restore its settings.

    The report always lists the classifier head as "newly initialized": expected here, since the head
    is trained by the warm-up or restored from the adapter. Real load errors still raise."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _linear_names(model: nn.Module) -> list[str]:
    """Full names of the layers LoRA can wrap."""
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear | Conv1D)]


def _default_modules(model: nn.Module) -> tuple[str, ...]:
    leaves = {name.rsplit(".", 1)[-1] for name in _linear_names(model)}
    for family in DEFAULT_MODULE_FAMILIES:
        if set(family) <= leaves:
            return family
    raise ConfigError(f"lora.modules: no default for {type(model).__name__}; name its attention projections "
                      f"from {sorted(leaves)}")


def _check_modules(model: nn.Module, modules: Sequence[str]) -> None:
    """peft's own error for a wrong module name does not say which names exist; this one does.

    A module name matches as peft matches it: the full layer name or a dotted suffix of it."""
    names = _linear_names(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    missing = [m for m in modules if not any(n == m or n.endswith(f".{m}") for n in names)]
    if missing:
        hints = [f"{m!r}" + "".join(f" (did you mean {c!r}?)" for c in difflib.get_close_matches(m, leaves, n=1))
                 for m in missing]
        raise ConfigError(f"lora.modules: {', '.join(hints)} match no linear layer of {type(model).__name__}; "
                          f"layer names: {leaves}")


def batches(loaded: LoadedModel, records: Sequence[Mapping[str, Any]], batch_size: int, max_length: int,
            ) -> Iterator[tuple[Sequence[Mapping[str, Any]], dict[str, Tensor]]]:
    """(records, batch on the model's device) in the given order, `batch_size` at a time."""
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        batch = loaded.task.collate(loaded.tokenizer, chunk, loaded.label2id, max_length)
        yield chunk, {k: v.to(loaded.device) for k, v in batch.items()}


def adapter_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's own tensors: LoRA matrices and peft `modules_to_save` copies (the classifier head)."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n or ".modules_to_save." in n}


def adapter_hash(model: nn.Module) -> str:
    """sha256 over the LoRA and modules_to_save tensors (names, dtypes, shapes, bytes)."""
    params = adapter_parameters(model)
    if not params:
        raise ModelLoadError(f"{type(model).__name__} has no LoRA parameters to hash")
    return tensor_hash(params)
