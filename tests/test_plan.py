"""capacity.plan / `hyperinf plan`: bytes per example from the LoRA shapes, storage = bytes x N, linear scaling,
the stated GPU factors applied, one-line errors; nothing runs."""

from __future__ import annotations

import pytest

from hyperinf_ops.capacity import GPU_FACTORS, lora_shapes, plan
from hyperinf_ops.config import load_config
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
