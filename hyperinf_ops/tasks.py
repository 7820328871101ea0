"""Tasks: what an example is, how it becomes a batch, and which loss its gradient is the gradient of.

A `Task` owns every task-specific choice, so no other module branches on the task's name:

    classification  records `text`, `label`; a sequence classifier head; per-example loss = cross-entropy
                    of the example's class id; batches right-padded.
    causal_lm       records `prompt`, `response` (label optional); a causal LM head; per-example loss = mean
                    next-token cross-entropy over the response tokens (prompt and padding masked, -100);
                    the chat template is used when the tokenizer has one.

`get_task(name)` gives the task of a config; `task_for_model(model)` infers it from a Hugging Face head
(what `gradients.per_example_lora_gradients` does, since labels alone cannot tell a causal LM from token
tagging).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyperinf_ops.errors import DataError, GradientMismatchError

__all__ = ["IGNORE_INDEX", "CausalLM", "Classification", "Task", "get_task", "task_for_model"]

IGNORE_INDEX = -100


class Task(Protocol):
    """Everything that differs between tasks. Tensors: B examples, T tokens."""

    name: ClassVar[str]
    text_columns: ClassVar[tuple[str, ...]]  # the prepared table's text columns
    has_classes: ClassVar[bool]  # labels are classes of a classifier head (and accuracy means something)
    loss_reduction: ClassVar[str]  # recorded in the gradient fingerprint
    peft_task_type: ClassVar[str]
    truncation: ClassVar[str]  # what `collate` keeps of an example longer than max_length

    def column_roles(self, data: Any) -> dict[str, str | None]:
        """Prepared column -> input column of a `DataSection` (text columns and `label`)."""

    def load_model(self, path: Path, labels: Sequence[str], dtype: torch.dtype = torch.float32) -> nn.Module:
        """The base Hugging Face model with this task's head, its weights in `dtype`."""

    def collate(self, tokenizer: Any, records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int],
                max_length: int) -> dict[str, Tensor]:
        """`input_ids`, `attention_mask`, `labels` (+ `token_type_ids` when the tokenizer makes them)."""

    def token_lengths(self, tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> list[int]:
        """Each record's tokens before `collate` cuts it at max_length (what over-long means)."""

    def loss_targets(self, model: nn.Module, labels: Tensor, mask: Tensor) -> Tensor:
        """The labels the per-example loss reads, validated (DataError naming the bad examples)."""

    def per_example_losses(self, logits: Tensor, targets: Tensor) -> Tensor:
        """(B,) losses whose sum's gradient gives every example's own gradient."""


def _require_tokens(records: Sequence[Mapping[str, Any]], counts: Tensor, field: str) -> None:
    empty = [str(records[i].get("sample_id", f"#{i}")) for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise DataError(f"{field} of sample_id(s) {empty[:5]} tokenizes to nothing")


def _float_logits(logits: Tensor) -> Tensor:
    # As Hugging Face does: a half-precision softmax over many classes or a vocabulary is too coarse.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


@dataclass(frozen=True)
class Classification:
    """Single-label sequence classification: cross-entropy on the class id."""

    name: ClassVar[str] = "classification"
    text_columns: ClassVar[tuple[str, ...]] = ("text",)
    has_classes: ClassVar[bool] = True
    loss_reduction: ClassVar[str] = "mean"
    peft_task_type: ClassVar[str] = "SEQ_CLS"
    truncation: ClassVar[str] = "the text keeps its first max_length tokens"

    def column_roles(self, data: Any) -> dict[str, str | None]:
        return {"text": data.text_column, "label": data.label_column}

    def load_model(self, path: Path, labels: Sequence[str], dtype: torch.dtype = torch.float32) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        label2id = {str(name): i for i, name in enumerate(labels)}
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), label2id=label2id, id2label={i: n for n, i in label2id.items()},
            dtype=dtype)

    def collate(self, tokenizer: Any, records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int],
                max_length: int) -> dict[str, Tensor]:
        unknown = sorted({str(r["label"]) for r in records} - set(label2id))
        if unknown:
            raise DataError(f"labels {unknown} are not in the model's label set {sorted(label2id)}")
        enc = tokenizer([r["text"] for r in records], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt", return_special_tokens_mask=True)
        content = enc.pop("special_tokens_mask").eq(0) & enc["attention_mask"].bool()
        _require_tokens(records, content.sum(1), "text")
        batch = dict(enc)
        batch["labels"] = torch.tensor([label2id[str(r["label"])] for r in records], dtype=torch.long)
        return batch

    def token_lengths(self, tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> list[int]:
        return [len(ids) for ids in tokenizer([r["text"] for r in records])["input_ids"]]

    def loss_targets(self, model: nn.Module, labels: Tensor, mask: Tensor) -> Tensor:
        n, num_labels = mask.shape[0], model.config.num_labels
        if labels.shape != (n,) or labels.is_floating_point():
            raise DataError(f"classification labels must be integer class ids of shape ({n},), got {labels.dtype} "
                            f"{tuple(labels.shape)}")
        bad = ((labels < 0) | (labels >= num_labels)).nonzero().flatten().tolist()
        if bad:
            raise DataError(f"examples {bad} have labels outside [0, {num_labels})")
        return labels

    def per_example_losses(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(_float_logits(logits), targets, reduction="none")


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction of the response: the mean cross-entropy over an example's response tokens."""

    name: ClassVar[str] = "causal_lm"
    text_columns: ClassVar[tuple[str, ...]] = ("prompt", "response")
    has_classes: ClassVar[bool] = False
    loss_reduction: ClassVar[str] = "mean_over_response_tokens"
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    truncation: ClassVar[str] = ("a pair keeps its prompt's end (at least half of max_length when the prompt is that "
                                 "long) and its response's start (a short response whole)")

    def column_roles(self, data: Any) -> dict[str, str | None]:
        return {"prompt": data.prompt_column, "response": data.response_column, "label": data.label_column}

    def load_model(self, path: Path, labels: Sequence[str], dtype: torch.dtype = torch.float32) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    def collate(self, tokenizer: Any, records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int],
                max_length: int) -> dict[str, Tensor]:
        """Right-padded prompt + response; eos ends the response. An over-long pair keeps the end of its prompt,
        at least min(its length, max_length // 2) tokens (the request and the template's turn marker the response
        answers: a response trained from a one-token prompt is a different example), and the start of its
        response in the rest (a short answer whole, eos included)."""
        for field in ("prompt", "response"):
            raw = tokenizer([r[field] for r in records], add_special_tokens=False)["input_ids"]
            _require_tokens(records, torch.tensor([len(ids) for ids in raw]), field)
        rows = []
        for r in records:
            prompt, response = self.fitted_ids(tokenizer, r, max_length)
            rows.append((prompt + response, [IGNORE_INDEX] * len(prompt) + response))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def token_lengths(self, tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> list[int]:
        return [sum(map(len, self.token_ids(tokenizer, r))) for r in records]

    @staticmethod
    def token_ids(tokenizer: Any, record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        """The prompt's and the response's token ids, the response ended by eos (when the tokenizer has one)."""
        prompt, response = _prompt_response_ids(tokenizer, record["prompt"], record["response"])
        eos = tokenizer.eos_token_id
        return prompt, response if eos is None or eos in response else [*response, eos]

    @classmethod
    def fitted_ids(cls, tokenizer: Any, record: Mapping[str, Any], max_length: int) -> tuple[list[int], list[int]]:
        """`token_ids` cut to max_length tokens in all, as `collate` trains and scores them (its docstring)."""
        prompt, response = cls.token_ids(tokenizer, record)
        response = response[: max_length - min(len(prompt), max_length // 2)]
        return prompt[-(max_length - len(response)):], response

    def loss_targets(self, model: nn.Module, labels: Tensor, mask: Tensor) -> Tensor:
        """Shifted next-token targets (B, T), aligned with the logits: position t predicts token t + 1. A
        target counts only when its label is not -100 and both it and the predicting position are real
        tokens, so padding never becomes a target or a predictor, whatever the collator wrote there."""
        if labels.shape != mask.shape:
            raise DataError(f"causal LM labels must have the shape of input_ids {tuple(mask.shape)}, "
                            f"got {tuple(labels.shape)}")
        real = mask.bool()
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        valid = (shifted != IGNORE_INDEX) & F.pad(real[:, 1:] & real[:, :-1], (0, 1), value=False)
        empty = (valid.sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise DataError(f"examples {empty} have no target tokens (all labels -100 or padding after the shift)")
        return shifted.masked_fill(~valid, IGNORE_INDEX)

    def per_example_losses(self, logits: Tensor, targets: Tensor) -> Tensor:
        b, t, v = logits.shape
        per_token = F.cross_entropy(_float_logits(logits).reshape(b * t, v), targets.reshape(-1),
                                    reduction="none", ignore_index=IGNORE_INDEX).view(b, t)
        return per_token.sum(1) / (targets != IGNORE_INDEX).sum(1)


def _prompt_response_ids(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt part and the response part, tokenized separately so the mask is exact."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head):
            return (tokenizer(head, add_special_tokens=False)["input_ids"],
                    tokenizer(full[len(head):], add_special_tokens=False)["input_ids"])
        # A template whose conversation does not extend its generation prompt: use the plain format.
    return (tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"],
            tokenizer(response, add_special_tokens=False)["input_ids"])


_TASKS: dict[str, Task] = {task.name: task for task in (Classification(), CausalLM())}


def get_task(name: str) -> Task:
    """The task of a config's `task:` value."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(_TASKS)}") from None


def task_for_model(model: nn.Module) -> Task:
    """The task a Hugging Face model's head trains for (decided by its class name)."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return _TASKS["causal_lm"]
    if name.endswith("ForSequenceClassification"):
        problem = getattr(model.config, "problem_type", None)
        if problem not in (None, "single_label_classification") or model.config.num_labels < 2:
            raise DataError(f"{name}: only single-label classification is supported (problem_type={problem!r}, "
                            f"num_labels={model.config.num_labels})")
        return _TASKS["classification"]
    raise GradientMismatchError(
        f"unsupported model head {name}: expected *ForSequenceClassification, *ForCausalLM or *LMHeadModel")
