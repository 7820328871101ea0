"""Warm-up fine-tune of the LoRA adapter (and the classifier head) on the candidate pool.

Influence needs a trained adapter: peft initialises lora_B to zero, so every lora_A gradient is exactly
zero before training. The warm-up is plain AdamW on the trainable parameters with seeded shuffling
and seeded dropout, so the same seed gives the same adapter on CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hyperinf_ops.errors import DataError
from hyperinf_ops.memory import release_memory
from hyperinf_ops.models.lora import LoadedModel, batches
from hyperinf_ops.progress import ProgressCallback, ProgressMeter
from hyperinf_ops.settings import TrainSettings

__all__ = ["TrainStats", "warmup_train"]


@dataclass(frozen=True)
class TrainStats:
    """What the warm-up did. Losses and accuracies are example-weighted means over each epoch."""

    epochs: int
    steps: int
    examples: int
    loss_per_epoch: tuple[float, ...]
    accuracy_per_epoch: tuple[float, ...] | None  # tasks with classes only
    seconds: float

    @property
    def examples_per_s(self) -> float:
        return self.epochs * self.examples / self.seconds if self.seconds > 0 else float("nan")


def warmup_train(loaded: LoadedModel, records: Sequence[Mapping[str, Any]], train_cfg: TrainSettings, *,
                 max_length: int = 128, progress: ProgressCallback | None = None) -> TrainStats:
    """Train `loaded.model`'s trainable parameters in place; leaves the model in eval mode.

    Records are the prepared examples (`text`/`label` or `prompt`/`response`). Progress events come
    every `train_cfg.log_every` optimizer steps and at the end of each epoch.
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
    steps = 0
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[loaded.device] if loaded.device.type == "cuda" else []):
        torch.manual_seed(train_cfg.seed)  # LoRA dropout draws from the global generator
        model.train()
        for epoch in range(train_cfg.epochs):
            meter = ProgressMeter(f"warm-up epoch {epoch + 1}/{train_cfg.epochs}", n, progress,
                                  every=train_cfg.log_every)
            shuffled = [records[i] for i in order_rng.permutation(n)]
            loss_sum, correct = 0.0, 0
            for chunk, batch in batches(loaded, shuffled, train_cfg.batch_size, max_length):
                out = model(**batch)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                if steps % train_cfg.log_every == 0:
                    release_memory()  # batches of varying length fragment the heaps (memory.py)
                loss = float(out.loss.detach())
                loss_sum += loss * len(chunk)
                if loaded.task.has_classes:
                    correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                meter.update(len(chunk), loss=loss)
            losses.append(loss_sum / n)
            if loaded.task.has_classes:
                accuracies.append(correct / n)
            meter.finish(loss=losses[-1], **({"accuracy": accuracies[-1]} if accuracies else {}))
        model.eval()
    return TrainStats(epochs=train_cfg.epochs, steps=steps, examples=n, loss_per_epoch=tuple(losses),
                      accuracy_per_epoch=tuple(accuracies) if accuracies else None,
                      seconds=time.perf_counter() - start)
