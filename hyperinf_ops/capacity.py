"""Capacity planning: what a run over N examples costs, from the config alone, before anything runs.

The LoRA matrices' shapes come from the model's config.json (no weights loaded): BERT-like models get LoRA on
`query` / `value` (hidden -> hidden), Llama-like ones on `q_proj` (hidden -> heads x head_dim) and `v_proj`
(hidden -> kv_heads x head_dim); each matrix's gradient is stored as an (r, d) block (lora_A: d = its input,
lora_B: d = its output), compressed as `compression` says (sketch.row_shapes, row_format.RowFormat). Times
come from examples/s measured on this machine (THROUGHPUT, each with the run it came from), scaled linearly in
N; a GPU multiplies them by GPU_FACTORS, which are stated assumptions, not measurements (no GPU here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hyperinf_ops.config import HyperinfConfig
from hyperinf_ops.core.row_format import RowFormat
from hyperinf_ops.core.sketch import row_shapes
from hyperinf_ops.errors import ConfigError, DataError

__all__ = ["FORWARD_SHARE", "GPU_FACTORS", "THROUGHPUT", "Plan", "Throughput", "lora_shapes", "model_config",
           "model_fit_problem", "plan", "plan_command", "render"]


@dataclass(frozen=True)
class Throughput:
    """Examples per second of one model on this machine (2 shared CPU cores): warm-up (examples x epochs / s),
    gradient pass, scoring scan (queries + self-influence), and the largest per-stage peak RSS in MB; `source`
    names the measurement."""

    warmup: float
    gradients: float
    scoring: float
    peak_mb: float
    source: str


# Measured by benchmarks/bench_scale.py (JSON in benchmarks/results/scale/), at its largest size per model.
THROUGHPUT: dict[str, Throughput] = {
    "minilm": Throughput(warmup=2 * 20_000 / 872.7, gradients=20_000 / 425.3, scoring=20_000 / 44.4, peak_mb=1553,
                         source="bench_scale.py, 20,000 examples, max_length 128 (minilm_1k_4k_20k.json)"),
    "smollm2": Throughput(warmup=200 / 45.6, gradients=200 / 65.9, scoring=200 / 5.1, peak_mb=3478,
                          source="bench_scale.py --causal, 200 pairs, max_length 64 (smollm2_44_200.json)"),
}
# A CUDA worker's speed over this machine's, per stage: ASSUMED (no GPU was available to measure), the usual
# order of a datacenter GPU against 2 CPU cores for small transformers; run benchmarks/gpu_check.sh to measure.
GPU_FACTORS = {"warmup": 30.0, "gradients": 30.0, "scoring": 20.0}
# A forward pass's share of a gradient pass (forward + backward ~ 3 forwards): the probe's embedding pass is
# SCALED from the measured gradient rate by it, not measured.
FORWARD_SHARE = 1 / 3
# Bytes a stored row has besides its vector: grad_scale and the fingerprint digest, sample_id and shard (Lance
# compresses these; measured totals in README "Measured": 37,071-37,094 bytes for 36,960-byte MiniLM vectors).
_ROW_OVERHEAD = 4 + 16 + 24 + 8
# SmolLM2-135M-Instruct's config.json, for a plan made before the bundled GGUF file was first converted.
_SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "head_dim": 64}


@dataclass(frozen=True)
class Plan:
    """One run's cost: N examples, its row layout (L matrices, `width` floats, `row_bytes` stored), the storage,
    the stage times in seconds and the peak RSS of one worker (MB); `device`, and the throughput's source."""

    examples: int
    device: str
    matrices: int
    width: int
    row_bytes: int
    storage_bytes: int
    warmup_s: float
    gradients_s: float
    scoring_s: float
    peak_mb: float
    # the signals beside influence (0 when off): hyperinf_cp's gradient passes under the earlier checkpoints, the
    # probe's forward pass, the cross-fit's warm-ups
    checkpoints_s: float
    probe_s: float
    cross_fit_s: float
    source: str


def model_config(model: str) -> dict:
    """The model's config.json as a dict, without loading weights (or converting the bundled GGUF)."""
    if model == "smollm2":
        from hyperinf_ops.models.registry import default_cache_dir

        cached = default_cache_dir() / "smollm2-135m-instruct-fp32" / "config.json"
        return json.loads(cached.read_text()) if cached.is_file() else _SMOLLM2
    from hyperinf_ops.models.registry import resolve_model

    return json.loads((Path(resolve_model(model)) / "config.json").read_text())


def model_fit_problem(cfg: HyperinfConfig) -> str | None:
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


def lora_shapes(config: dict, rank: int, modules: tuple[str, ...] | None) -> dict[str, tuple[int, int]]:
    """name -> (r, d) of every LoRA gradient matrix (selected by the substrings `modules`, None = all) of the
    query/value LoRA of a model with this config.json; ConfigError for an architecture it cannot read."""
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    if config.get("model_type") == "bert":
        outputs = {"attention.self.query": hidden, "attention.self.value": hidden}
        prefix = "encoder.layer"
    elif config.get("model_type") in ("llama", "mistral", "qwen2"):
        head_dim = int(config.get("head_dim") or hidden // int(config["num_attention_heads"]))
        kv_heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        outputs = {"self_attn.q_proj": int(config["num_attention_heads"]) * head_dim,
                   "self_attn.v_proj": kv_heads * head_dim}
        prefix = "model.layers"
    else:
        raise ConfigError(f"cannot plan for model_type {config.get('model_type')!r}: its LoRA shapes are only read "
                          "for BERT- and Llama-like config.json files")
    shapes = {}
    for layer in range(layers):
        for module, out in outputs.items():
            shapes[f"{prefix}.{layer}.{module}.lora_A"] = (rank, hidden)
            shapes[f"{prefix}.{layer}.{module}.lora_B"] = (rank, out)
    return {n: s for n, s in shapes.items() if modules is None or any(m in n for m in modules)}


def plan(cfg: HyperinfConfig, examples: int, device: str = "cpu") -> Plan:
    """The Plan of `cfg` over `examples` examples on `device` (cpu or cuda). DataError for examples < 1;
    ConfigError for a model without a measured throughput or an unreadable architecture."""
    if examples < 1:
        raise DataError(f"--examples must be a positive number of examples, got {examples}")
    if device not in ("cpu", "cuda"):
        raise DataError(f"--device must be cpu or cuda, got {device!r}")
    problem = model_fit_problem(cfg)
    if problem:
        raise ConfigError(problem)
    name = Path(cfg.model).name if cfg.model not in THROUGHPUT else cfg.model
    rates = THROUGHPUT.get(name)
    if rates is None:
        raise ConfigError(f"no throughput measured for model {cfg.model!r} (measured: {', '.join(THROUGHPUT)}): "
                          "run benchmarks/bench_scale.py on it and add it to capacity.THROUGHPUT")
    shapes = lora_shapes(model_config(cfg.model), cfg.lora.rank, cfg.lora.gradient_modules)
    blocks = tuple(r * k for r, k in row_shapes(shapes, cfg.compression).values())
    fmt = RowFormat(cfg.compression.dtype, blocks)
    # integer rows carry a step per block, every row its blocks' squared norms (float32 each)
    row_bytes = (fmt.stored_width * fmt.value_type.bit_width // 8 + 4 * len(blocks) * (2 if fmt.integer else 1)
                 + _ROW_OVERHEAD)
    factor = GPU_FACTORS if device == "cuda" else {"warmup": 1.0, "gradients": 1.0, "scoring": 1.0}
    warmup_s = examples * cfg.train.epochs / (rates.warmup * factor["warmup"])
    gradients_s = examples / (rates.gradients * factor["gradients"])
    signals, classes = cfg.signals, cfg.task == "classification"
    earlier = cfg.train.epochs - 1 if signals.checkpoints and "hyperinf" in cfg.estimators else 0
    return Plan(
        examples=examples, device=device, matrices=len(blocks), width=fmt.width, row_bytes=row_bytes,
        storage_bytes=row_bytes * examples, warmup_s=warmup_s, gradients_s=gradients_s,
        scoring_s=examples / (rates.scoring * factor["scoring"]),
        peak_mb=rates.peak_mb, source=rates.source,
        # one pass of the pool per earlier epoch: its curvature pilot (a sample of the pool) is scored from memory
        checkpoints_s=earlier * gradients_s,
        probe_s=gradients_s * FORWARD_SHARE if signals.probe and classes else 0.0,
        cross_fit_s=warmup_s * (signals.folds - 1) if signals.folds and classes else 0.0,
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render(p: Plan, model: str, compression: str) -> str:
    """The plan as the lines `hyperinf plan` prints."""
    gpu = " (CPU rates x the ASSUMED GPU factors " + ", ".join(f"{k} x{v:g}" for k, v in GPU_FACTORS.items()) + \
        ": not measured)" if p.device == "cuda" else ""
    return "\n".join([
        f"plan for {p.examples:,} examples of {model} on {p.device}{gpu}",
        f"  rows          {p.matrices} LoRA matrices, {p.width:,} floats, stored as {compression}: "
        f"{p.row_bytes:,} bytes per example",
        f"  storage       {p.storage_bytes / 1e9:,.2f} GB of gradient rows (bytes per example x {p.examples:,})",
        f"  warm-up       {_duration(p.warmup_s)}",
        f"  gradient pass {_duration(p.gradients_s)}",
        f"  scoring scan  {_duration(p.scoring_s)} (queries + self-influence)",
        f"  signals       {_signals_line(p)}",
        f"  peak memory   {p.peak_mb / 1e3:.1f} GB per worker (the largest stage peak measured; the stages stream)",
        f"  rates from    {p.source}, linear in N",
    ])


def _signals_line(p: Plan) -> str:
    """What the rankings beside influence add (signals.checkpoints, probe, folds), each or `off`."""
    parts = [f"hyperinf_cp {_duration(p.checkpoints_s)} (a gradient pass per earlier epoch)" if p.checkpoints_s
             else "hyperinf_cp off", f"probe {_duration(p.probe_s)} (one forward pass, scaled: 1/3 of a gradient "
             "pass)" if p.probe_s else "probe off", f"confident {_duration(p.cross_fit_s)} (K warm-ups on (K-1)/K of "
             "the pool)" if p.cross_fit_s else "confident off"]
    return "; ".join(parts)


def plan_command(config_path: Path, examples: int, device: str) -> int:
    """`hyperinf plan`: print the plan of the config file for `examples` examples; nothing runs or is written."""
    from hyperinf_ops.config import load_config

    cfg = load_config(config_path)
    c = cfg.compression
    described = f"{c.dtype}" + (f", whitened p={c.whiten:g}" if c.whitened else "") + \
        (f", sketch {c.sketch_dim}" if c.sketch_dim else "")
    print(render(plan(cfg, examples, device), cfg.model, described))
    return 0
