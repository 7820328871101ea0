"""Capacity planning: what a run over N examples costs, from the config alone, before anything runs.

The LoRA matrices' shapes, the parameters and the FLOPs come from the model's config.json (architecture.py; no
weights loaded); each matrix's (r, d) gradient block is stored as `compression` says (sketch.row_shapes,
row_format.RowFormat). Times
come from examples/s measured on this machine (THROUGHPUT, each with the run it came from), scaled linearly in
N; a GPU multiplies them by GPU_FACTORS, which are stated assumptions, not measurements (no GPU here).

A model that was never measured is planned from the nearest measured one (minilm for BERT-like encoders,
smollm2 for Llama-like decoders): its warm-up and gradient-pass times are the measured ones x the ratio of
forward FLOPs per example (`forward_flops`: 2 x the matmul parameters per token, attention's 4 x tokens x
attention width per layer, the LM head for causal LMs; tokens per example = max_length unless stated), and its
scoring scan x the ratio of the FLOPs of scoring one row (a k x k product per stored block for the self-influence,
a dot per query); each scaled line says so. Memory per device is an estimate from the shapes (`Memory`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperinf_ops.architecture import (
    architecture,
    forward_flops,
    lora_shapes,
    model_config,
    model_fit_problem,
    parameter_count,
)
from hyperinf_ops.config import HyperinfConfig
from hyperinf_ops.core.sketch import row_format, row_layout, row_shapes
from hyperinf_ops.devices import use_checkpointing
from hyperinf_ops.errors import ConfigError, DataError

__all__ = ["FORWARD_SHARE", "GPU_FACTORS", "RECOMPUTE", "THROUGHPUT", "Memory", "Plan", "Throughput", "plan",
           "plan_command", "reference_model", "render", "weight_dtype"]


@dataclass(frozen=True)
class Throughput:
    """Examples per second of one model on this machine (2 shared CPU cores): warm-up (examples x epochs / s),
    gradient pass, scoring scan (queries + self-influence), and the largest per-stage peak RSS in MB; `source`
    names the measurement; `tokens` and `task` are the measured run's max_length and task (what an unmeasured
    model's FLOPs per example are compared with). The measured runs stored raw (unsketched) q/v r=8 rows."""

    warmup: float
    gradients: float
    scoring: float
    peak_mb: float
    source: str
    tokens: int
    task: str


# Measured by benchmarks/bench_scale.py (JSON in benchmarks/results/scale/), at its largest size per model.
THROUGHPUT: dict[str, Throughput] = {
    "minilm": Throughput(warmup=2 * 20_000 / 872.7, gradients=20_000 / 425.3, scoring=20_000 / 44.4, peak_mb=1553,
                         source="bench_scale.py, 20,000 examples, max_length 128 (minilm_1k_4k_20k.json)",
                         tokens=128, task="classification"),
    "smollm2": Throughput(warmup=200 / 45.6, gradients=200 / 65.9, scoring=200 / 5.1, peak_mb=3478,
                          source="bench_scale.py --causal, 200 pairs, max_length 64 (smollm2_44_200.json)",
                          tokens=64, task="causal_lm"),
}
# Gradient checkpointing's cost on a pass over frozen weights (forward + backward of the activations ~ 2
# forwards): one more forward, x1.5; an estimate, not measured (the measured runs did not checkpoint).
RECOMPUTE = 1.5
# The measured runs' LoRA rank (q/v, every layer; rows unsketched): the scoring scan of another model is scaled
# by the FLOPs of its rows over those of these.
_MEASURED_RANK = 8
# A CUDA worker's speed over this machine's, per stage: ASSUMED (no GPU was available to measure), the usual
# order of a datacenter GPU against 2 CPU cores for small transformers; run benchmarks/gpu_check.sh to measure.
GPU_FACTORS = {"warmup": 30.0, "gradients": 30.0, "scoring": 20.0}
# A forward pass's share of a gradient pass (forward + backward ~ 3 forwards): the probe's embedding pass is
# SCALED from the measured gradient rate by it, not measured.
FORWARD_SHARE = 1 / 3
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class Memory:
    """One worker's memory, estimated from the shapes (bytes): the model's weights in `dtype`; the per-example
    LoRA gradients of a gradient batch (float32); the batch's activations kept for the backward pass (`dtype`,
    + float32 LM-head logits and their gradient for a causal LM: `logits`, included in `activations`); the
    curvature (a k x k float32 matrix and its inverse per stored block). `sum` bounds the peak: the stages
    stream, and the curvature is not held while the model runs."""

    dtype: str
    weights: int
    gradient_batch: int
    activations: int
    logits: int
    curvature: int
    batch: int
    gradient_floats: int
    stored_dtype: str | None = None  # config.json's torch_dtype (the checkpoint's), when it says
    auto_batch: bool = False  # gradient_batch_size: auto (`batch` = 32 shown)
    precision_auto: bool = False  # `dtype` is precision auto's choice on the planned device
    checkpointing: bool = False  # activations recomputed in the backward: only the layer inputs kept


    @property
    def sum(self) -> int:
        return self.weights + self.gradient_batch + self.activations + self.curvature


@dataclass(frozen=True)
class Plan:
    """One run's cost: N examples, its row layout (L matrices, `width` floats, `row_bytes` stored), the storage,
    the stage times in seconds and the peak RSS of one worker (MB: measured, or the estimated memory's sum for a
    model never measured); `device`, and the throughput's source. `scaled_from` names the measured model the
    times were scaled from (None: measured), `time_factor` / `scoring_factor` the ratios applied (FLOPs per
    example; row FLOPs); `parameters`, `flops` (forward FLOPs per example over `tokens` tokens) and `memory` are
    read from config.json."""

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
    model_type: str = ""
    parameters: int = 0
    layers: int = 0
    tokens: int = 0
    tokens_from: str = "max_length"
    flops: float = 0.0
    memory: Memory | None = None
    scaled_from: str | None = None
    time_factor: float = 1.0
    scoring_factor: float = 1.0
    recompute: float = 1.0  # RECOMPUTE under gradient checkpointing (the warm-up and gradient-pass times)


def reference_model(config: dict) -> str:
    """The measured model an unmeasured one is scaled from: minilm for a BERT-like encoder, smollm2 for a
    Llama-like decoder."""
    return "minilm" if architecture(config).model_type == "bert" else "smollm2"


def weight_dtype(cfg: HyperinfConfig, device: str = "cpu") -> str:
    """The dtype the base weights run in on `device` (cpu or cuda): the config's `precision`; `auto` is
    devices.resolve_dtype_name's rule with a bf16 GPU assumed (the plan is for a device it does not run on):
    bfloat16 on cuda, float32 elsewhere. config.json's torch_dtype is the checkpoint's dtype, not this one."""
    if cfg.precision == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return cfg.precision


def _checkpointing(cfg: HyperinfConfig) -> bool:
    """Whether the warm-up and the gradient pass recompute activations (`gradient_checkpointing`, `auto` by
    devices.use_checkpointing's rule)."""
    return use_checkpointing(cfg.gradient_checkpointing, cfg.max_length)


def _batch(cfg: HyperinfConfig) -> tuple[int, bool]:
    """The gradient batch the memory is estimated for, and whether it is `auto` (32 shown: a CUDA run picks the
    batch that fits its free memory, elsewhere it is 32)."""
    batch = cfg.gradient_batch_size
    return (batch, False) if isinstance(batch, int) else (32, True)


def _memory(cfg: HyperinfConfig, config: dict, tokens: int, raw: dict[str, tuple[int, int]],
            stored: dict[str, tuple[int, int]], device: str) -> Memory:
    a, dtype, (batch, auto) = architecture(config), weight_dtype(cfg, device), _batch(cfg)
    size, checkpointing = _DTYPE_BYTES[dtype], _checkpointing(cfg)
    gradient_floats = sum(r * d for r, d in raw.values())
    # kept for the backward per token and layer: the norms' inputs, q, k, v, the attention scores, its output,
    # o's output, the MLP's hidden activations (gated: gate, up, act(gate), their product)
    per_token_layer = (4 * a.hidden + 2 * a.heads * a.head_dim + 2 * a.kv_heads * a.head_dim + a.heads * tokens
                       + (4 if a.gated else 2) * a.intermediate)
    # with checkpointing: each layer's input (and its residual) kept, one layer's worth recomputed at a time
    layers = 2 * a.hidden * a.layers + per_token_layer if checkpointing else per_token_layer * a.layers
    logits = batch * tokens * a.vocab * 4 * 2 if cfg.task == "causal_lm" else 0  # float32 logits + their gradient
    return Memory(dtype=dtype, weights=parameter_count(config) * size, gradient_batch=batch * gradient_floats * 4,
                  activations=batch * tokens * layers * size + logits, logits=logits,
                  curvature=2 * 4 * sum(k * k for _, k in stored.values()), batch=batch,
                  gradient_floats=gradient_floats, stored_dtype=config.get("torch_dtype") or config.get("dtype"),
                  auto_batch=auto, checkpointing=checkpointing, precision_auto=cfg.precision == "auto")


def _row_flops(blocks: Any) -> float:
    """FLOPs of scoring one row: a k x k product per (r, k) block (self-influence) and a dot with a query."""
    return float(sum(2 * r * k * k + 2 * r * k for r, k in blocks))


def plan(cfg: HyperinfConfig, examples: int, device: str = "cpu", tokens: int | None = None) -> Plan:
    """The Plan of `cfg` over `examples` examples on `device` (cpu or cuda); `tokens`: the average tokens per
    example (None: max_length). A model without a measured throughput is scaled from `reference_model`'s.
    DataError for examples < 1; ConfigError for an unreadable architecture."""
    if examples < 1:
        raise DataError(f"--examples must be a positive number of examples, got {examples}")
    if device not in ("cpu", "cuda"):
        raise DataError(f"--device must be cpu or cuda, got {device!r}")
    if tokens is not None and not 1 <= tokens <= cfg.max_length:
        raise DataError(f"--tokens must be an average number of tokens per example in 1..max_length "
                        f"({cfg.max_length}), got {tokens}")
    problem = model_fit_problem(cfg)
    if problem:
        raise ConfigError(problem)
    stated, tokens = tokens, tokens or cfg.max_length
    config = model_config(cfg.model)
    raw = lora_shapes(config, cfg.lora.rank, cfg.lora.gradient_modules)
    stored = row_shapes(raw, cfg.compression)
    fmt = row_format(raw, cfg.compression)
    blocks = fmt.blocks
    row_bytes = fmt.row_bytes
    flops = forward_flops(config, tokens, cfg.task == "causal_lm")
    memory = _memory(cfg, config, tokens, raw, stored, device)
    name = Path(cfg.model).name if cfg.model not in THROUGHPUT else cfg.model
    scaled_from, time_factor, scoring_factor = None, 1.0, 1.0
    if name not in THROUGHPUT:
        scaled_from = name = reference_model(config)
        ref, measured = model_config(name), THROUGHPUT[name]
        time_factor = flops / forward_flops(ref, measured.tokens, measured.task == "causal_lm")
        scoring_factor = _row_flops(stored.values()) / _row_flops(lora_shapes(ref, _MEASURED_RANK, None).values())
    rates = THROUGHPUT[name]
    factor = GPU_FACTORS if device == "cuda" else {"warmup": 1.0, "gradients": 1.0, "scoring": 1.0}
    # gradient checkpointing adds a forward to the ~2 forwards' worth of a pass with frozen weights
    recompute = RECOMPUTE if memory.checkpointing else 1.0
    warmup_s = examples * cfg.train.epochs * time_factor * recompute / (rates.warmup * factor["warmup"])
    gradients_s = examples * time_factor * recompute / (rates.gradients * factor["gradients"])
    signals, classes = cfg.signals, cfg.task == "classification"
    earlier = cfg.train.epochs - 1 if signals.checkpoints and "hyperinf" in cfg.estimators else 0
    return Plan(
        examples=examples, device=device, matrices=len(blocks), width=fmt.width, row_bytes=row_bytes,
        storage_bytes=row_bytes * examples, warmup_s=warmup_s, gradients_s=gradients_s,
        scoring_s=examples * scoring_factor / (rates.scoring * factor["scoring"]),
        peak_mb=memory.sum / 1e6 if scaled_from else rates.peak_mb, source=rates.source,
        # one pass of the pool per earlier epoch: its curvature pilot (a sample of the pool) is scored from memory
        checkpoints_s=earlier * gradients_s,
        probe_s=gradients_s * FORWARD_SHARE if signals.probe and classes else 0.0,
        cross_fit_s=warmup_s * (signals.folds - 1) if signals.folds and classes else 0.0,
        model_type=str(config.get("model_type")), parameters=parameter_count(config),
        layers=architecture(config).layers, tokens=tokens, tokens_from="max_length" if stated is None else "--tokens",
        flops=flops, memory=memory, scaled_from=scaled_from,
        time_factor=time_factor, scoring_factor=scoring_factor, recompute=recompute,
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _flops(n: float) -> str:
    return f"{n / 1e12:,.2f} TFLOP" if n >= 1e12 else f"{n / 1e9:,.1f} GFLOP"


def _bytes(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.0f} MB"


def _times(x: float) -> str:
    return f"x {x:,.0f}" if x >= 100 else f"x {x:.3g}"


def render(p: Plan, model: str, compression: str) -> str:
    """The plan as the lines `hyperinf plan` prints. The times of a model never measured end in what they were
    scaled from and by how much; measured lines are as measured."""
    gpu = " (CPU rates x the ASSUMED GPU factors " + ", ".join(f"{k} x{v:g}" for k, v in GPU_FACTORS.items()) + \
        ": not measured)" if p.device == "cuda" else ""
    how = [f"scaled from {p.scaled_from} by FLOPs per example {_times(p.time_factor)}"] if p.scaled_from else []
    how += [f"x{p.recompute:g} for gradient checkpointing's recompute"] if p.recompute != 1 else []
    scaled = f" ({', '.join(how)}: not measured)" if how else ""
    scan = (f" scaled from {p.scaled_from} by FLOPs per row {_times(p.scoring_factor)}: not measured"
            if p.scaled_from else "")
    lines = [
        f"plan for {p.examples:,} examples of {model} on {p.device}{gpu}",
        f"  model         {p.model_type}, {_count(p.parameters)} parameters, {p.layers} layers (config.json): "
        f"{_flops(p.flops)} forward per example of {p.tokens:,} tokens ({p.tokens_from})",
        f"  rows          {p.matrices} LoRA matrices, {p.width:,} floats, stored as {compression}: "
        f"{p.row_bytes:,} bytes per example",
        f"  storage       {p.storage_bytes / 1e9:,.2f} GB of gradient rows (bytes per example x {p.examples:,})",
        f"  warm-up       {_duration(p.warmup_s)}{scaled}",
        f"  gradient pass {_duration(p.gradients_s)}{scaled}",
        f"  scoring scan  {_duration(p.scoring_s)} (queries + self-influence{';' if scan else ''}{scan})",
        f"  signals       {_signals_line(p)}",
    ]
    if not p.scaled_from:
        lines.append(f"  peak memory   {p.peak_mb / 1e3:.1f} GB per worker (the largest stage peak measured; the "
                     "stages stream)")
    if p.memory:
        m = p.memory
        stored = f", stored {m.stored_dtype}" if m.stored_dtype and m.stored_dtype != m.dtype else ""
        stored += ", precision auto: a bf16 GPU assumed" if m.dtype == "bfloat16" and m.precision_auto else ""
        logits = f", LM-head logits {_bytes(m.logits)} of it" if m.logits else ""
        auto = " (auto: shown at 32; a CUDA run sizes it to its free memory)" if m.auto_batch else ""
        checkpointed = ", checkpointed: layer inputs kept" if m.checkpointing else ""
        lines.append(
            f"  memory        {_bytes(m.sum)} per device (estimated): weights {_bytes(m.weights)} "
            f"({_count(p.parameters)} x {m.dtype} as loaded{stored}), gradient batch {_bytes(m.gradient_batch)} "
            f"({m.batch}{auto} x {m.gradient_floats:,} floats x 4 B), activations {_bytes(m.activations)} ({m.batch} x "
            f"{p.tokens:,} tokens x {p.layers} layers{checkpointed}{logits}), curvature {_bytes(m.curvature)} (k x k float32 + "
            "inverse per matrix)")
    how = f", scaled as marked from {p.scaled_from}'s" if p.scaled_from else ""
    lines.append(f"  rates from    {p.source}{how}, linear in N")
    return "\n".join(lines)


def _signals_line(p: Plan) -> str:
    """What the rankings beside influence add (signals.checkpoints, probe, folds), each or `off`."""
    parts = [f"hyperinf_cp {_duration(p.checkpoints_s)} (a gradient pass per earlier epoch)" if p.checkpoints_s
             else "hyperinf_cp off", f"probe {_duration(p.probe_s)} (one forward pass, scaled: 1/3 of a gradient "
             "pass)" if p.probe_s else "probe off", f"confident {_duration(p.cross_fit_s)} (K warm-ups on (K-1)/K of "
             "the pool)" if p.cross_fit_s else "confident off"]
    return "; ".join(parts)


def plan_command(config_path: Path, examples: int, device: str, tokens: int | None = None) -> int:
    """`hyperinf plan`: print the plan of the config file for `examples` examples; nothing runs or is written."""
    from hyperinf_ops.config import load_config

    cfg = load_config(config_path)
    planned = plan(cfg, examples, device, tokens)
    c = cfg.compression
    k, rank = row_layout(lora_shapes(model_config(cfg.model), cfg.lora.rank, cfg.lora.gradient_modules), c)
    rule = "" if c.sketch_dim or not (k or rank) else f" (compression.row_budget {c.row_budget:,} bytes)"
    layout = ", ".join([*([f"rank-{rank} factors"] if rank else []), *([f"sketch {k}"] if k else [])])
    described = f"{c.dtype}" + (f", whitened p={c.whiten:g}" if c.whitened else "") + \
        (f", {layout}{rule}" if layout else "")
    print(render(planned, cfg.model, described))
    return 0
