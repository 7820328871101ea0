"""Tiny random Hugging Face models for tests: a 2-layer BERT classifier or a 2-layer Llama causal LM with a
word-level tokenizer, saved as a local folder (no download). Point `model:` at the folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

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
