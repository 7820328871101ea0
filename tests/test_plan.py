"""capacity.plan / `hyperinf plan`: bytes per example from the LoRA shapes, storage = bytes x N, linear scaling,
the stated GPU factors applied, one-line errors; nothing runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hyperinf_ops.architecture import (
    forward_flops,
    lora_shapes,
    model_config,
    model_fit_problem,
    parameter_count,
)
from hyperinf_ops.capacity import GPU_FACTORS, RECOMPUTE, THROUGHPUT, Plan, plan, render, weight_dtype
from hyperinf_ops.config import load_config
from hyperinf_ops.core.sketch import row_shapes
from hyperinf_ops.errors import DataError
from pipelines.cli import main


@pytest.fixture
def config_file(tmp_path):
    (tmp_path / "pool.csv").write_text("text,label\na,x\n")
    (tmp_path / "t.csv").write_text("text,label\nb,x\n")
    path = tmp_path / "hyperinf.yaml"
    path.write_text("model: minilm\ndata: {path: pool.csv}\ntargets:\n  t: {path: t.csv}\n")
    return path


def test_minilm_rows_match_the_measured_layout(config_file):
    p = plan(load_config(config_file), 1000)
    # 6 layers x query/value x lora_A/B, each (8, 384): 73,728 int4 values = 36,864 bytes + steps and norms
    assert (p.matrices, p.width) == (24, 73_728)
    assert 36_960 < p.row_bytes < 37_200  # measured on disk: 37,071-37,094 (README "Measured")


def test_storage_and_times_scale_linearly_and_cuda_divides(config_file):
    cfg = load_config(config_file)
    small, big, gpu = plan(cfg, 1000), plan(cfg, 1_000_000), plan(cfg, 1_000_000, "cuda")
    assert big.storage_bytes == big.row_bytes * 1_000_000 == 1000 * small.storage_bytes
    for stage in ("warmup", "gradients", "scoring"):
        assert getattr(big, f"{stage}_s") == pytest.approx(1000 * getattr(small, f"{stage}_s"))
        assert getattr(gpu, f"{stage}_s") == pytest.approx(getattr(big, f"{stage}_s") / GPU_FACTORS[stage])
    assert gpu.storage_bytes == big.storage_bytes and gpu.peak_mb == big.peak_mb


def test_signal_costs(config_file):
    """hyperinf_cp: a gradient pass per earlier epoch (its pilot, a sample of the pool, scored from memory); probe: a forward pass (a third of a gradient
    pass); confident: K - 1 warm-ups' worth (K on (K-1)/K of the pool); off costs nothing."""
    cfg = load_config(config_file)
    p = plan(cfg, 100_000)
    assert p.checkpoints_s == pytest.approx((cfg.train.epochs - 1) * p.gradients_s)
    assert p.probe_s == pytest.approx(p.gradients_s / 3) and p.cross_fit_s == 0
    on = plan(load_config({**cfg.to_dict(), "signals": {"folds": 5, "checkpoints": False, "probe": False}}), 100_000)
    assert (on.checkpoints_s, on.probe_s) == (0, 0) and on.cross_fit_s == pytest.approx(4 * on.warmup_s)


def test_llama_shapes_follow_grouped_query_attention():
    config = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 64}
    shapes = lora_shapes(config, 8, None)
    assert len(shapes) == 120 and sum(r * d for r, d in shapes.values()) == 460_800  # SmolLM2's 232 KB int4 rows
    assert shapes["model.layers.0.self_attn.v_proj.lora_B"] == (8, 192)
    assert len(lora_shapes(config, 8, ("layers.5.",))) == 4


def test_bad_examples_is_one_line_error(config_file, capsys):
    assert main(["plan", "--config", str(config_file), "--examples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hyperinf: error: --examples must be a positive" in err
    with pytest.raises(DataError):
        plan(load_config(config_file), -5)


def test_a_rank_above_the_model_width_is_one_line_not_a_plan(config_file, capsys):
    """The audit's `plan` with rank 1e9 printed "peak memory 1.6 GB": the config now bounds the rank, and a rank
    above the model's width (MiniLM: 384) is refused with the reason, as `hyperinf run` refuses it."""
    config_file.write_text(config_file.read_text() + "lora: {rank: 1000}\n")
    assert main(["plan", "--config", str(config_file), "--examples", "1000"]) == 2
    assert capsys.readouterr().err == ("hyperinf: error: lora.rank: 1000 is above model minilm's width 384: a LoRA "
                                       "rank is at most the width of the matrices it adapts (8-64 is usual)\n")


def test_cli_prints_the_plan(config_file, capsys):
    assert main(["plan", "--config", str(config_file), "--examples", "1000000", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "37,108 bytes per example" in out and "37.11 GB" in out and "ASSUMED GPU factors" in out
    assert "signals       hyperinf_cp " in out and "confident off" in out


# ---------------------------------------------------------------------------------------------- unmeasured models

# Meta-Llama-3-8B's config.json (8,030,261,248 parameters): a folder with only this file, no weights
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
            "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}
# bert-base-uncased's shape (109,482,240 parameters), never measured
BERT_BASE = {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2}


def _project(tmp_path, model_config: dict, extra: str = "", name: str = "model") -> Path:
    """A config file whose `model:` is a folder holding only `model_config` as config.json (no weights)."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model_config))
    causal = model_config["model_type"] != "bert"
    (tmp_path / "pool.csv").write_text("prompt,response\na,b\n" if causal else "text,label\na,x\n")
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"model: {name}\n" + ("task: causal_lm\n" if causal else "") +
                    "data: {path: pool.csv}\ntargets:\n  t: {path: pool.csv}\n" + extra)
    return path


def test_parameter_counts_from_config_json_match_the_real_models():
    """MiniLM: the tensors in its model.safetensors (header only); SmolLM2-135M: 134.5M; the shapes of two models
    never measured here: Llama-3-8B and bert-base."""
    from safetensors import safe_open

    from hyperinf_ops.models.registry import resolve_model

    with safe_open(resolve_model("minilm") / "model.safetensors", "pt") as f:
        real = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)
    assert real == pytest.approx(22.7e6, rel=0.01)
    assert parameter_count(model_config("minilm")) == pytest.approx(real, rel=0.02)
    assert parameter_count(model_config("smollm2")) == pytest.approx(134.5e6, rel=0.02)
    assert parameter_count(LLAMA_8B) == pytest.approx(8.03e9, rel=0.01)
    assert parameter_count(BERT_BASE) == pytest.approx(109.5e6, rel=0.01)


def test_an_8b_config_without_weights_is_planned_scaled_from_smollm2(tmp_path):
    cfg = load_config(_project(tmp_path, LLAMA_8B))
    assert model_fit_problem(cfg) is None  # a folder with only config.json is read, not refused
    p = plan(cfg, 1_000_000, "cuda")
    assert isinstance(p, Plan) and p.scaled_from == "smollm2"
    assert (p.matrices, p.parameters) == (128, 8_030_261_248)
    # 2 x (32 layers x 218.1M matmul weights + the 525M LM head) x 128 tokens + attention: 1.93 TFLOP
    assert p.flops == pytest.approx(1.93e12, rel=0.01)
    smol = THROUGHPUT["smollm2"]
    ratio = p.flops / forward_flops(model_config("smollm2"), smol.tokens, causal_lm=True)
    assert p.time_factor == pytest.approx(ratio) and 100 < ratio < 120  # ~60x the weights, 2x the tokens
    assert p.gradients_s == pytest.approx(1_000_000 * ratio / smol.gradients / GPU_FACTORS["gradients"])
    m = p.memory
    assert m.weights == {"float32": 4, "bfloat16": 2}[weight_dtype(cfg, "cuda")] * p.parameters
    assert m.gradient_batch == 32 * 4 * sum(r * d for r, d in lora_shapes(LLAMA_8B, 8, None).values())
    # the width rule stores every q/v block (96 of width 4096, 32 of 1024) as rank-2 factors of its sketch to
    # k = 424 (rows <= 64 KB, codec + curvature state <= 1 GB); the curvature is exact in that space: a float32
    # k x k and its inverse per block, not 4096 x 4096
    stored = row_shapes(lora_shapes(LLAMA_8B, 8, None), cfg.compression)
    assert {k for _, k in stored.values()} == {424} and p.row_bytes <= 65_536
    assert m.curvature == 8 * 128 * 424**2
    assert p.peak_mb == pytest.approx(m.sum / 1e6)
    text = render(p, cfg.model, "int4")
    assert "8.03B parameters" in text and "per device (estimated): weights " in text
    on_cpu = plan(cfg, 1_000_000)  # float32 on a CPU, whatever the checkpoint's dtype
    assert on_cpu.memory.weights == 4 * p.parameters and on_cpu.gradients_s == pytest.approx(30 * p.gradients_s)
    assert "weights 32.1 GB (8.03B x float32 as loaded, stored bfloat16)" in render(on_cpu, cfg.model, "int4")
    assert text.count("scaled from smollm2 by FLOPs per example x 110: not measured") == 2
    assert "scaled from smollm2 by FLOPs per row" in text and "peak memory" not in text


def test_a_never_measured_encoder_is_scaled_from_minilm(tmp_path):
    cfg = load_config(_project(tmp_path, BERT_BASE))
    p = plan(cfg, 10_000)
    assert p.scaled_from == "minilm" and p.parameters == 109_482_240
    minilm = plan(load_config({**cfg.to_dict(), "model": "minilm"}), 10_000)
    # hidden x2, layers x2: the matmuls ~8x, attention's term ~4x; no LM head for a classifier
    assert p.time_factor == pytest.approx(p.flops / minilm.flops) and 7 < p.time_factor < 8
    assert p.warmup_s == pytest.approx(minilm.warmup_s * p.time_factor)
    # rows: twice the layers, blocks twice as wide: dense rows would exceed 64 KB, so the width rule stores them as
    # unsketched rank-2 factors; the scan scales by the k x k self-influence products of the stored blocks
    stored = row_shapes(lora_shapes(BERT_BASE, 8, None), cfg.compression)
    (k,) = {k for _, k in stored.values()}
    assert k == 768 and p.row_bytes <= 65_536 < plan(load_config({**cfg.to_dict(), "compression": {
        "row_budget": 0}}), 10_000).row_bytes
    flops = sum(2 * 8 * k * k + 2 * 8 * k for _ in stored) / sum(2 * 8 * 384 * 384 + 2 * 8 * 384 for _ in range(24))
    assert p.scoring_factor == pytest.approx(flops)
    assert p.scoring_s == pytest.approx(minilm.scoring_s * p.scoring_factor)
    assert minilm.scaled_from is None and (minilm.time_factor, minilm.scoring_factor) == (1, 1)


def test_scaled_times_follow_layers_and_tokens(tmp_path):
    cfg = load_config(_project(tmp_path, LLAMA_8B, name="a"))
    base = plan(cfg, 1000)
    deep = plan(load_config(_project(tmp_path, {**LLAMA_8B, "num_hidden_layers": 64}, name="b")), 1000)
    for stage in ("warmup_s", "gradients_s"):  # the LM head does not double: a little under 2x
        assert 1.9 < getattr(deep, stage) / getattr(base, stage) < 2.0
    # twice the blocks in the same 64 KB: each sketched narrower, the scan less than doubles
    narrow = {k for _, k in row_shapes(lora_shapes({**LLAMA_8B, "num_hidden_layers": 64}, 8, None),
                                       cfg.compression).values()}
    assert narrow == {208} and deep.row_bytes <= 65_536
    assert deep.scoring_s / base.scoring_s == pytest.approx((256 * (208**2 + 208)) / (128 * (424**2 + 424)))
    assert deep.memory.weights - base.memory.weights == pytest.approx(32 * 218.1e6 * 4, rel=0.01)
    half = plan(cfg, 1000, tokens=64)
    assert 0.49 < half.gradients_s / base.gradients_s < 0.5  # attention's term is quadratic in the tokens
    assert half.row_bytes == base.row_bytes and half.tokens == 64


def test_weight_dtype_is_the_precision_setting_with_auto_resolved_for_the_planned_device(tmp_path):
    cfg = load_config(_project(tmp_path, LLAMA_8B))
    for precision, on_cuda, on_cpu in (("auto", "bfloat16", "float32"), ("float32", "float32", "float32"),
                                       ("bfloat16", "bfloat16", "bfloat16")):
        chosen = load_config({**cfg.to_dict(), "precision": precision})
        assert (weight_dtype(chosen, "cuda"), weight_dtype(chosen, "cpu")) == (on_cuda, on_cpu)
        assert plan(chosen, 1000, "cuda").memory.weights == {"float32": 4, "bfloat16": 2}[on_cuda] * 8_030_261_248


def test_gradient_checkpointing_trades_activations_for_a_recompute(tmp_path):
    cfg = load_config(_project(tmp_path, LLAMA_8B))
    off = plan(load_config({**cfg.to_dict(), "gradient_checkpointing": False}), 1000)
    on = plan(load_config({**cfg.to_dict(), "gradient_checkpointing": True}), 1000)
    assert on.gradients_s == pytest.approx(RECOMPUTE * off.gradients_s)
    assert on.memory.activations - on.memory.logits < (off.memory.activations - off.memory.logits) / 4
    assert "x1.5 for gradient checkpointing's recompute: not measured" in render(on, cfg.model, "int4")


def test_measured_models_keep_their_measured_lines(config_file, capsys):
    assert main(["plan", "--config", str(config_file), "--examples", "1000000"]) == 0
    out = capsys.readouterr().out
    assert "not measured" not in out and "scaled from" not in out and "peak memory   1.6 GB" in out
    assert "22.7M parameters" in out and "per device (estimated)" in out


def test_cli_plans_the_8b_config_within_64_kb_rows(tmp_path, capsys):
    path = _project(tmp_path, LLAMA_8B)
    assert main(["plan", "--config", str(path), "--examples", "1000000", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "scaled from smollm2" in out
    row_bytes = int(re.search(r"([\d,]+) bytes per example", out).group(1).replace(",", ""))
    assert row_bytes <= 65_536


def test_cli_plans_the_8b_config(tmp_path, capsys):
    path = _project(tmp_path, LLAMA_8B)
    assert main(["plan", "--config", str(path), "--examples", "1000000", "--device", "cuda", "--tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert "of 100 tokens (--tokens)" in out and "scaled from smollm2 by FLOPs per example" in out
    assert main(["plan", "--config", str(path), "--examples", "10", "--tokens", "999"]) == 2
    assert "--tokens must be" in capsys.readouterr().err
