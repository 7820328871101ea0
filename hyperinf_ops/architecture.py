"""A model's architecture from its config.json, without loading weights: the LoRA matrices' shapes, the parameter
count and the FLOPs of a forward pass (what `hyperinf plan` scales measured times by, capacity.py), and whether
a config's max_length and LoRA rank fit the model (the preflight's check).

BERT-like models get LoRA on `query` / `value` (hidden -> hidden), Llama-, Mistral- and Qwen2-like ones on `q_proj`
(hidden -> heads x head_dim) and `v_proj` (hidden -> kv_heads x head_dim); each matrix's gradient is an (r, d)
block (lora_A: d = its input, lora_B: d = its output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperinf_ops.errors import ConfigError

__all__ = ["Architecture", "architecture", "forward_flops", "lora_shapes", "model_config", "model_fit_problem",
           "parameter_count"]

# SmolLM2-135M-Instruct's config.json (the values of the bundled GGUF's metadata), for a plan made before the
# bundled GGUF file was first converted.
_SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
            "max_position_embeddings": 8192, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
_LLAMA_LIKE = ("llama", "mistral", "qwen2")


def model_config(model: str) -> dict:
    """The model's config.json as a dict, without loading weights (or converting the bundled GGUF); a local
    folder needs only its config.json (a plan loads no weights)."""
    if model == "smollm2":
        from hyperinf_ops.models.registry import default_cache_dir

        cached = default_cache_dir() / "smollm2-135m-instruct-fp32" / "config.json"
        return json.loads(cached.read_text()) if cached.is_file() else _SMOLLM2
    local = Path(model).expanduser() / "config.json"
    if model != "minilm" and local.is_file():
        return json.loads(local.read_text())
    from hyperinf_ops.models.registry import resolve_model

    return json.loads((Path(resolve_model(model)) / "config.json").read_text())


def model_fit_problem(cfg: Any) -> str | None:
    """Why the config's `max_length` or `lora.rank` does not fit its model (its positions, its width), read from
    config.json without loading weights; None when they fit or the model's config cannot be read here."""
    try:
        config = model_config(cfg.model)
    except (OSError, ValueError):
        return None
    positions, width = config.get("max_position_embeddings"), config.get("hidden_size")
    if isinstance(positions, int) and cfg.max_length > positions:
        return (f"max_length: {cfg.max_length} is beyond the {positions} positions model {cfg.model} has: use at "
                f"most {positions}")
    if isinstance(width, int) and cfg.lora.rank > width:
        return (f"lora.rank: {cfg.lora.rank} is above model {cfg.model}'s width {width}: a LoRA rank is at most the "
                "width of the matrices it adapts (8-64 is usual)")
    return None


@dataclass(frozen=True)
class Architecture:
    """The sizes of a transformer that its cost depends on, read from config.json (`architecture`)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    positions: int
    gated: bool  # Llama-like MLP: gate, up and down (3 matrices of hidden x intermediate); BERT: up and down
    tied: bool  # the LM head shares the input embeddings
    qkv_bias: bool


def architecture(config: dict) -> Architecture:
    model_type = config.get("model_type")
    if model_type != "bert" and model_type not in _LLAMA_LIKE:
        raise ConfigError(f"cannot plan for model_type {model_type!r}: its LoRA shapes are only read for BERT- and "
                          "Llama-like config.json files")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        bert = model_type == "bert"
        return Architecture(
            model_type=model_type, hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config.get("intermediate_size") or 4 * hidden), vocab=int(config.get("vocab_size") or 0),
            positions=int(config.get("max_position_embeddings") or 0) if bert else 0, gated=not bert,
            tied=bool(config.get("tie_word_embeddings", bert)),
            qkv_bias=bert or model_type == "qwen2" or bool(config.get("attention_bias")))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"cannot plan for this {model_type} config.json: {err!r} is missing or not a number") \
            from err


def _layer_matmul_parameters(a: Architecture) -> int:
    """The weights one layer multiplies each token by: q, k, v (grouped-query), o and the MLP."""
    attention = a.hidden * a.heads * a.head_dim * 2 + a.hidden * a.kv_heads * a.head_dim * 2
    return attention + (3 if a.gated else 2) * a.hidden * a.intermediate


def parameter_count(config: dict) -> int:
    """The parameters of the base model with this config.json (BERT: with its pooler; Llama-like: with the LM
    head unless it is tied), biases and norms included."""
    a = architecture(config)
    h, attention_out = a.hidden, a.heads * a.head_dim
    layer = _layer_matmul_parameters(a)
    if a.model_type == "bert":
        layer += attention_out + 2 * a.kv_heads * a.head_dim + h + a.intermediate + h + 4 * h  # biases, 2 LayerNorms
        embeddings = (a.vocab + a.positions + int(config.get("type_vocab_size") or 2)) * h + 2 * h
        return embeddings + a.layers * layer + h * h + h  # + the pooler
    layer += 2 * h + (attention_out + 2 * a.kv_heads * a.head_dim if a.qkv_bias else 0)  # 2 RMSNorms, q/k/v bias
    return a.vocab * h * (1 if a.tied else 2) + a.layers * layer + h


def forward_flops(config: dict, tokens: int, causal_lm: bool) -> float:
    """FLOPs of one forward pass over an example of `tokens` tokens: 2 x the matmul parameters per token (q, k, v
    with grouped-query attention, o, the MLP; the LM head over the vocabulary for a causal LM) plus attention's
    4 x tokens x heads x head_dim per layer (scores and their weighted sum; dense, the causal mask not
    skipped). A LoRA gradient pass is about two of these (the backward of the activations; the frozen weights
    get no gradient), whatever the model, so the ratio of two models' passes is the ratio of these."""
    a = architecture(config)
    per_token = 2 * (a.layers * _layer_matmul_parameters(a) + (a.hidden * a.vocab if causal_lm else 0))
    per_token += 4 * a.layers * tokens * a.heads * a.head_dim
    return float(tokens * per_token)


def lora_shapes(config: dict, rank: int, modules: tuple[str, ...] | None) -> dict[str, tuple[int, int]]:
    """name -> (r, d) of every LoRA gradient matrix (selected by the substrings `modules`, None = all) of the
    query/value LoRA of a model with this config.json; ConfigError for an architecture it cannot read."""
    a = architecture(config)
    if a.model_type == "bert":
        outputs = {"attention.self.query": a.hidden, "attention.self.value": a.hidden}
        prefix = "encoder.layer"
    else:
        outputs = {"self_attn.q_proj": a.heads * a.head_dim, "self_attn.v_proj": a.kv_heads * a.head_dim}
        prefix = "model.layers"
    shapes = {}
    for layer in range(a.layers):
        for module, out in outputs.items():
            shapes[f"{prefix}.{layer}.{module}.lora_A"] = (rank, a.hidden)
            shapes[f"{prefix}.{layer}.{module}.lora_B"] = (rank, out)
    return {n: s for n, s in shapes.items() if modules is None or any(m in n for m in modules)}
