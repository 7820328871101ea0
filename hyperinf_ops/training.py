"""Warm-up fine-tune of the LoRA adapter (and the classifier head) on the candidate pool.

Influence needs a trained adapter: peft initialises lora_B to zero, so every lora_A gradient is exactly
zero before training. The warm-up is plain AdamW on the trainable parameters with seeded shuffling
and seeded dropout, so the same seed gives the same adapter on CPU. Given held-out records, it evaluates them
before the first step and after every epoch (evaluation.py): the curve the warm-up check reads.

Precision and memory: the base weights are in the loaded model's dtype (bf16 on CUDA by default), the LoRA
matrices, the classifier head and AdamW's state in float32 (models/lora.py). With `loaded.checkpointing` each
layer's activations are recomputed in the backward. On CUDA an optimizer step whose batch does not fit is
split into micro-batches (sized from the free memory, halved on every out-of-memory) whose losses are weighted
back to the batch's mean, so the step is the configured batch's step (up to dropout's draws and rounding); on
CPU each step is one forward/backward of the configured batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hyperinf_ops.devices import (
    activation_bytes_per_example,
    auto_batch_size,
    free_device_memory,
    is_out_of_memory,
)
from hyperinf_ops.errors import DataError
from hyperinf_ops.evaluation import EvalResult, evaluate_model
from hyperinf_ops.memory import release_memory
from hyperinf_ops.models.checkpointing import activation_checkpointing
from hyperinf_ops.models.lora import LoadedModel
from hyperinf_ops.progress import ProgressCallback, ProgressMeter
from hyperinf_ops.settings import TrainSettings
from hyperinf_ops.signals.margins import MarginHistory, classification_margins
from hyperinf_ops.tasks import IGNORE_INDEX

__all__ = ["TrainStats", "warmup_train"]


@dataclass(frozen=True)
class TrainStats:
    """What the warm-up did. Losses and accuracies are example-weighted means over each epoch (while training,
    dropout on); the held-out ones have one more entry: index 0 is the model before training."""

    epochs: int
    steps: int
    examples: int
    loss_per_epoch: tuple[float, ...]
    accuracy_per_epoch: tuple[float, ...] | None  # tasks with classes only
    seconds: float
    heldout_examples: int = 0
    heldout_loss_per_epoch: tuple[float, ...] = ()
    heldout_accuracy_per_epoch: tuple[float, ...] | None = None
    micro_batch: int = 0  # examples per forward at the end (0 = the whole batch: never split)

    @property
    def examples_per_s(self) -> float:
        return self.epochs * self.examples / self.seconds if self.seconds > 0 else float("nan")


def warmup_train(loaded: LoadedModel, records: Sequence[Mapping[str, Any]], train_cfg: TrainSettings, *,
                 max_length: int = 128, progress: ProgressCallback | None = None,
                 heldout: Sequence[Mapping[str, Any]] = (), margins: MarginHistory | None = None,
                 on_epoch_end: Callable[[int], None] | None = None) -> TrainStats:
    """Train `loaded.model`'s trainable parameters in place; leaves the model in eval mode.

    Records are the prepared examples (`sample_id`, `text`/`label` or `prompt`/`response`); `heldout` records
    (same columns, not trained on) are evaluated before training and after each epoch. Progress events come every
    `train_cfg.log_every` optimizer steps and at the end of each epoch, with the ETA of the whole warm-up.
    `margins` (tasks with classes) receives every example's margin from each training forward (margins.py: the
    AUM, at no extra pass); `on_epoch_end(epoch)` is called after each epoch (1-based), e.g. to keep a checkpoint.
    """
    if not records:
        raise DataError("cannot warm up on an empty pool")
    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    n = len(records)
    total_steps = train_cfg.epochs * math.ceil(n / train_cfg.batch_size)
    # Linear decay to 0 (the usual fine-tuning schedule): late steps refine instead of memorising noise.
    decay = (lambda step: 1.0 - step / total_steps) if train_cfg.schedule == "linear" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    order_rng = np.random.default_rng(train_cfg.seed)
    losses: list[float] = []
    accuracies: list[float] = []
    evals: list[EvalResult] = []
    steps = 0
    micro = [_first_micro_batch(loaded, train_cfg.batch_size, max_length)]
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[loaded.device] if loaded.device.type == "cuda" else []), \
            activation_checkpointing(model, loaded.checkpointing):
        torch.manual_seed(train_cfg.seed)  # LoRA dropout draws from the global generator
        if heldout:
            evals.append(evaluate_model(loaded, heldout, max_length=max_length))
        model.train()
        meter = ProgressMeter("warm-up", n * train_cfg.epochs, progress, every=train_cfg.log_every)
        for epoch in range(train_cfg.epochs):
            shuffled = [records[i] for i in order_rng.permutation(n)]
            loss_sum, correct = 0.0, 0
            for begin in range(0, n, train_cfg.batch_size):
                chunk = shuffled[begin: begin + train_cfg.batch_size]
                loss, step_correct = _accumulate_with_backoff(loaded, chunk, max_length, micro, margins, optimizer)
                torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                if steps % train_cfg.log_every == 0:
                    release_memory()  # batches of varying length fragment the heaps (memory.py)
                loss_sum += loss * len(chunk)
                correct += step_correct
                meter.update(len(chunk), loss=loss, epoch=epoch + 1)
            losses.append(loss_sum / n)
            if loaded.task.has_classes:
                accuracies.append(correct / n)
            if heldout:
                evals.append(evaluate_model(loaded, heldout, max_length=max_length))
            meter.report(epoch=epoch + 1, loss=losses[-1], **({"accuracy": accuracies[-1]} if accuracies else {}),
                         **_heldout_numbers(evals))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
        meter.finish()
        model.eval()
    return TrainStats(epochs=train_cfg.epochs, steps=steps, examples=n, loss_per_epoch=tuple(losses),
                      accuracy_per_epoch=tuple(accuracies) if accuracies else None,
                      seconds=time.perf_counter() - start, heldout_examples=len(heldout),
                      heldout_loss_per_epoch=tuple(e.loss for e in evals),
                      heldout_accuracy_per_epoch=tuple(e.accuracy for e in evals)
                      if evals and loaded.task.has_classes else None,
                      micro_batch=micro[0] if micro[0] < train_cfg.batch_size else 0)


def _first_micro_batch(loaded: LoadedModel, batch_size: int, max_length: int) -> int:
    """Examples per forward of the first step: the batch on CPU, what the free memory fits of it on CUDA."""
    config = getattr(loaded.model, "config", None)
    if loaded.device.type != "cuda" or config is None:
        return batch_size
    per_example = activation_bytes_per_example(config, max_length, loaded.dtype, checkpointing=loaded.checkpointing)
    return auto_batch_size(loaded.device, per_example, fallback=batch_size, cap=batch_size)


def _loss_weights(loaded: LoadedModel, parts: Sequence[dict[str, torch.Tensor]]) -> list[float]:
    """Each micro-batch's share of the batch's mean loss: its examples (classification: the mean over examples) or
    its next-token targets (causal LM: Hugging Face's loss is the mean over the batch's target tokens)."""
    if loaded.task.has_classes:
        counts = [float(len(p["labels"])) for p in parts]
    else:
        counts = [float((p["labels"][:, 1:] != IGNORE_INDEX).sum()) for p in parts]
    total = sum(counts)
    return [c / total for c in counts]


def _accumulate(loaded: LoadedModel, chunk: Sequence[Mapping[str, Any]], max_length: int, size: int,
                margins: MarginHistory | None) -> tuple[float, int]:
    """Forward/backward of `chunk` in micro-batches of `size`, gradients summed into `.grad` as one batch's
    would be; (the batch's mean loss, correct predictions). Margins are recorded once the whole step ran (a
    retried step records each example once)."""
    collate = loaded.task.collate
    parts = [collate(loaded.tokenizer, chunk[i: i + size], loaded.label2id, max_length)
             for i in range(0, len(chunk), size)]
    weights = _loss_weights(loaded, parts) if len(parts) > 1 else [1.0]
    loss_sum, correct, step_margins = 0.0, 0, []
    for part, weight in zip(parts, weights, strict=True):
        batch = {k: v.to(loaded.device) for k, v in part.items()}
        out = loaded.model(**batch)
        if margins is not None and loaded.task.has_classes:
            step_margins.append(classification_margins(out.logits, batch["labels"]))
        (out.loss if weight == 1.0 else out.loss * weight).backward()
        loss_sum += float(out.loss.detach()) * weight
        if loaded.task.has_classes:
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    if step_margins:
        margins.record([str(r["sample_id"]) for r in chunk], _concat(step_margins))
    return loss_sum, correct


def _concat(values: list) -> Any:
    if len(values) == 1:
        return values[0]
    return torch.cat(values) if isinstance(values[0], torch.Tensor) else np.concatenate(values)


def _accumulate_with_backoff(loaded: LoadedModel, chunk: Sequence[Mapping[str, Any]], max_length: int,
                             micro: list[int], margins: MarginHistory | None,
                             optimizer: torch.optim.Optimizer) -> tuple[float, int]:
    """`_accumulate` at `micro[0]` examples per forward; a device out-of-memory (devices.is_out_of_memory) drops
    the step's partial gradients, halves `micro[0]` (kept for later steps) and runs the step again."""
    while True:
        try:
            return _accumulate(loaded, chunk, max_length, micro[0], margins)
        except Exception as err:  # noqa: BLE001 - only an out-of-memory is handled; the rest is re-raised
            if not is_out_of_memory(err) or micro[0] == 1:
                raise
        optimizer.zero_grad(set_to_none=True)
        free_device_memory(loaded.device)
        micro[0] = max(1, min(micro[0], len(chunk)) // 2)


def _heldout_numbers(evals: Sequence[EvalResult]) -> dict[str, float]:
    if not evals:
        return {}
    last = evals[-1]
    return {"heldout_loss": last.loss, **({"heldout_accuracy": last.accuracy} if last.accuracy is not None else {})}
