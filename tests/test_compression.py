"""benchmarks/bench_compression.py --quick: the compression benchmark's properties on synthetic gradients.

The synthetic pool (4 LoRA-like matrices of (4, 128), 400 examples, 80 planted flips) is small enough that
the whole settings grid runs in a few seconds; the assertions are what must hold whatever the data:
float16 rows with the per-row scale rank like float32, a sketch with k >= d is the raw computation,
rank agreement with raw grows with k, and the byte counts are what the docs say.
"""

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch

from hyperinf_ops.core.sketch import Sketch
from hyperinf_ops.settings import CompressionSpec

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compression.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_compression", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compression") / "quick.json"
    result = bench.main(["--quick", "--json", str(out)])
    result["json_path"] = out
    return result


def _by_label(result):
    return {s["label"]: s for s in result["settings"]}


def test_quick_writes_json(quick):
    assert quick["json_path"].is_file()
    assert quick["settings"][0]["label"] == "raw float32"
    assert quick["n"] == 400 and quick["flipped"] == 80


def test_raw_reference_detects_flips(quick):
    raw = quick["settings"][0]
    assert raw["ratio"] == 1 and raw["max_auroc_drop"] == 0
    for name in bench.RANKINGS:
        assert raw["rankings"][name]["spearman_vs_raw"] == pytest.approx(1.0)
        assert raw["rankings"][name]["auroc"] > 0.6, name


def test_float16_rows_match_float32(quick):
    raw, fp16 = _by_label(quick)["raw float32"], _by_label(quick)["raw float16"]
    assert fp16["bytes"] == quick["raw_bytes"] // 2 + 4  # half the vector + the float32 row scale
    for name in bench.RANKINGS:
        assert fp16["rankings"][name]["spearman_vs_raw"] > 0.999, name
        assert abs(fp16["rankings"][name]["auroc"] - raw["rankings"][name]["auroc"]) < 0.005, name


def test_sketch_wider_than_the_matrix_is_raw(quick):
    """k = 192 >= d = 128: every matrix is kept raw, so every number equals raw's exactly."""
    by = _by_label(quick)
    raw = by["raw float32"]
    for seed in bench.SKETCH_SEEDS:
        wide = by[f"sketch k=192 P{seed} float32"]
        assert wide["bytes"] == raw["bytes"]
        assert wide["rankings"] == raw["rankings"]
    assert by["eigen k=192 float32"]["rankings"] == raw["rankings"]


def test_agreement_with_raw_grows_with_k(quick):
    by = _by_label(quick)

    def mean_rho(k, ranking):
        return statistics.fmean(by[f"sketch k={k} P{s} float32"]["rankings"][ranking]["spearman_vs_raw"]
                                for s in bench.SKETCH_SEEDS)

    for ranking in ("tracin", "hyperinf", "self_influence_tracin"):
        rhos = [mean_rho(k, ranking) for k in (96, 48, 24)]
        assert rhos[0] > rhos[1] > rhos[2], (ranking, rhos)
        assert rhos[0] < 1  # a real sketch, not the raw rows


def test_bytes_and_ratios(quick):
    by = _by_label(quick)
    # 4 matrices x r=4 x k=48 entries
    assert by["sketch k=48 P0 float32"]["bytes"] == 4 * 4 * 48 * 4
    assert by["sketch k=48 P0 float16"]["bytes"] == 4 * 4 * 48 * 2 + 4
    assert by["raw int8"]["bytes"] == 4 * 4 * 128 + 4 * 4
    assert by["raw int4"]["bytes"] == 4 * 4 * 128 // 2 + 4 * 4
    assert by["sketch k=24 P0 float32"]["ratio"] == pytest.approx(24 / 128)
    agg = bench.aggregate([quick, quick])
    assert agg["sketch k=48 float32"]["runs"] == 2 * len(bench.SKETCH_SEEDS)
    assert agg["raw float32"]["worst_drop"] == 0


def test_sketch_bases_are_the_products_sketch():
    """The benchmark measures the sketch the pipeline stores: the same seeded P_l, None for a matrix kept raw."""
    shapes = {"b": (8, 64), "a": (8, 384)}
    bases = bench.sketch_bases(shapes, 96, 7)
    sketch = Sketch(shapes, CompressionSpec(sketch_dim=96, seed=7))
    assert bases["b"] is None and torch.equal(bases["a"], sketch.matrix("a"))
    assert not torch.equal(bases["a"], bench.sketch_bases(shapes, 96, 8)["a"])
    # N(0, 1/k) entries: E[P P^T] = I, so squared norms are kept in expectation.
    assert float(bases["a"].square().mean()) == pytest.approx(1 / 96, rel=0.05)


def test_float16_storage_is_the_store_rule():
    """store_rows(float16) = divide the concatenated row by its max |value|, cast, multiply back."""
    gen = torch.Generator().manual_seed(0)
    c = {"a": torch.randn(5, 2, 3, generator=gen) * 1e-6, "b": torch.randn(5, 2, 4, generator=gen) * 1e-7}
    out = bench.store_rows(c, "float16")
    flat = torch.cat([c["a"].reshape(5, -1), c["b"].reshape(5, -1)], 1)
    scale = flat.abs().amax(1, keepdim=True)
    back = (flat * (1 / scale)).half().float() * scale
    assert torch.equal(torch.cat([out["a"].reshape(5, -1), out["b"].reshape(5, -1)], 1), back)
    assert float(((back - flat).abs() / scale).max()) < 2 ** -11  # relative to the row's max, at any norm


def test_whitening_is_lossless_before_quantization():
    """White rows only change what the quantizer sees: unquantized, h W^-1 gives back g (float32 round-off)."""
    pool = bench.synthetic_pool(n=200, seed=1)
    white = bench.whitening(pool.grads, seed=0)
    back = white.undo(white.apply(pool.grads))
    for name, g in pool.grads.items():
        assert torch.allclose(back[name], g, rtol=0, atol=1e-4 * float(g.abs().max()))
    result = bench.evaluate(pool, [bench.Setting("raw"), bench.Setting("white", "float32")], lissa_iterations=50,
                            log=lambda *_: None)
    white = result["settings"][1]
    assert white["label"] == "white^0.5 pilot0 float32" and white["ratio"] == 1
    for name in bench.RANKINGS:
        assert white["rankings"][name]["spearman_vs_raw"] > 0.999, name


def test_krylov_basis_holds_the_target_and_its_scores():
    """The Krylov basis is orthonormal and contains the mean target gradient's rows, so a plain dot-product score
    (tracin) restricted to it is the raw one exactly; HyperINF's ranking agrees with raw better than a random
    subspace of the same width does."""
    pool = bench.synthetic_pool(n=400, seed=2)
    k = 24
    bases = bench.krylov_bases(pool.grads, pool.target, k, seed=0)
    for name, basis in bases.items():
        assert basis.shape == (128, k)
        assert torch.allclose(basis.T @ basis, torch.eye(k), atol=1e-5)
        v = pool.target[name].float()
        assert torch.allclose(v @ basis @ basis.T, v, atol=1e-5 * float(v.abs().max()))
    result = bench.evaluate(pool, [bench.Setting("raw"), bench.Setting("krylov", "float32", k, 0, 0.25),
                                   bench.Setting("orth", "float32", k, 0)],
                            lissa_iterations=50, methods=("hyperinf", "tracin"), log=lambda *_: None)
    raw, krylov, orth = result["settings"]
    assert krylov["label"] == f"krylov k={k} pilot0 white^0.25 float32"
    assert krylov["rankings"]["tracin"]["spearman_vs_raw"] > 0.9999
    assert krylov["rankings"]["hyperinf"]["spearman_vs_raw"] > orth["rankings"]["hyperinf"]["spearman_vs_raw"]


def test_low_bit_codes_and_the_pilot_curvature_agreement():
    """The 2-bit Lloyd-Max codes keep more of a Gaussian block than the 1-bit sign codes (the MSE the docstring
    states, to sampling error); a pilot of the whole pool is the raw ranking, a smaller pilot and the two halves
    agree with it less than perfectly, and halves' rankings are reported per split."""
    x = torch.randn(64, 8, 256, generator=torch.Generator().manual_seed(0))
    mse = {d: float((bench.store_rows({"m": x}, d)["m"] - x).pow(2).mean()) for d in ("lloyd2", "sign1")}
    assert mse["lloyd2"] == pytest.approx(0.118, abs=0.01) and mse["sign1"] == pytest.approx(0.363, abs=0.02)
    result = bench.pilot_curvature_agreement(bench.synthetic_pool(n=200, seed=3), [0.25, 1.0])
    small, whole = result["pilot"]
    assert whole["spearman"] > 0.9999 and whole["top5_overlap"] == 1.0 and small["spearman"] < 0.9999
    assert [h["seed"] for h in result["halves"]] == [0, 1]
    assert all(h["spearman_a_b"] < 0.9999 for h in result["halves"])
