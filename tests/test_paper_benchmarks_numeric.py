"""The paper's experiments as benchmarks, --quick: benchmarks/bench_convergence.py (inverse convergence
against a float64 Cholesky solve) and benchmarks/bench_gfim.py (influence rankings of the GFIM methods against
the exact full-Fisher inverse). Each runs once per module; the assertions are numerical properties of the
methods."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def convergence(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence")
    argv = ["--quick", "--json", str(out / "c.json"), "--img-dir", str(out)]
    results = _load("bench_convergence").main(argv)
    return results, out


@pytest.fixture(scope="module")
def gfim(tmp_path_factory):
    out = tmp_path_factory.mktemp("gfim")
    results = _load("bench_gfim").main(["--quick", "--json", str(out / "g.json"), "--img-dir", str(out)])
    return results, out


def _case(results: dict, cond: float, dtype: str) -> dict:
    return next(c for c in results["cases"] if c["cond"] == cond and c["dtype"] == dtype)


def test_convergence_writes_json_and_one_plot_per_dimension(convergence):
    results, out = convergence
    saved = json.loads((out / "c.json").read_text())
    assert len(saved["cases"]) == len(results["cases"]) == 4  # d=64 x cond 1e2, 1e4 x fp32, fp64
    assert (out / "convergence_d64.png").stat().st_size > 10_000
    for case in results["cases"]:
        assert case["measured_cond"] == pytest.approx(case["cond"], rel=1e-6)  # the damping sets cond exactly


def test_scaled_schulz_reaches_1e6_and_its_error_falls_monotonically(convergence):
    results, _ = convergence
    case = _case(results, 1e2, "float64")
    errors = case["traces"]["schulz p=2 scaled"]["errors"]
    assert isinstance(case["reach"]["schulz p=2 scaled"]["1e-06"], int)
    assert min(errors) < 1e-13
    # X_t = A^-1 (I - R_0^(2^t)) with R_0's eigenvalues in [0, 1): the error falls every step until the floor
    floor_at = next(t for t, e in enumerate(errors) if e < 1e-12)
    assert all(errors[t + 1] < errors[t] for t in range(1, floor_at))


def test_order_three_needs_fewer_iterations_than_schulz_in_float64(convergence):
    results, _ = convergence
    for case in results["cases"]:
        if case["dtype"] == "float64":
            reach = case["reach"]
            assert reach["hyperpower p=3"]["1e-06"] < reach["schulz p=2 scaled"]["1e-06"]
            # the paper's fixed start 5e-5 I spends ~log2(1 / 5e-5) = 14 steps before the top direction moves
            assert reach["schulz p=2 paper"]["1e-06"] > reach["schulz p=2 scaled"]["1e-06"] + 10


def test_float32_floors_near_cond_times_its_rounding(convergence):
    results, _ = convergence
    case = _case(results, 1e4, "float32")
    floor = min(case["traces"]["schulz p=2 scaled"]["errors"])
    assert 1e-6 < floor < 1e-3  # ~cond * 6e-8: 1e-6 is out of reach, 1e-3 is not
    assert case["reach"]["schulz p=2 scaled"]["1e-06"] == "no"


def test_product_calls_exact_and_baselines(convergence):
    results, _ = convergence
    for case in results["cases"]:
        product = case["product"]
        if case["dtype"] == "float64":
            assert product["exact"]["error"] < 1e-13
            assert product["hyperinf"]["converged"] and product["hyperinf"]["error"] < 1e-8
        # the paper-parity start (20 steps) leaves most of the answer uninverted at lambda_max = 1
        assert product["hyperinf paper"]["error"] > 0.1 and not product["hyperinf paper"]["converged"]
        # DataInf's mean/inverse swap is an approximation: a real error, worse at higher cond
        assert 0.01 < product["datainf"]["error"] < 1.0
        lissa = case["traces"]["lissa"]["errors"]
        assert all(b <= a * (1 + 1e-6) for a, b in zip(lissa, lissa[1:], strict=False))  # a contraction
    assert _case(results, 1e4, "float64")["product"]["datainf"]["error"] > \
        _case(results, 1e2, "float64")["product"]["datainf"]["error"]


def test_paper_start_diverges_past_2_over_alpha_where_the_scaled_start_does_not(convergence):
    results, _ = convergence
    by_scale = {row["scale"]: row for row in results["scale_sweep"]}
    huge = by_scale[1e5]  # lambda_max 1e5 > 2 / 5e-5
    assert huge["paper_reach"]["0.001"] == "no"
    assert not math.isfinite(huge["product"]["hyperinf paper"]["error"])
    for row in by_scale.values():
        assert row["product"]["hyperinf"]["error"] < 1e-8  # the scaled start ignores the scale of A


def test_gfim_writes_json_and_plot(gfim):
    results, out = gfim
    saved = json.loads((out / "g.json").read_text())
    assert [(r["rank"], r["seed"]) for r in saved["rows"]] == [(2, 0), (4, 0)]
    assert (out / "gfim_spearman.png").stat().st_size > 10_000


def test_gfim_rankings_against_the_full_fisher(gfim):
    results, _ = gfim
    for row in results["rows"]:
        # the tiny BERT: 2 layers x (query, value) x (lora_A, lora_B), each r x 32
        assert row["matrices"] == 8 and row["shapes"] == [(row["rank"], 32)]
        for method, rho in row["spearman"].items():
            assert -1.0 <= rho <= 1.0, method
        assert row["hyperinf_vs_exact"] > 0.99  # the same GFIM, two solvers
        assert row["spearman"]["exact"] > 0.5  # GFIM vs full Fisher: related rankings on this model
        assert 0.0 <= row["lemma1_gap"] <= 2.0
        assert all(0.0 <= auc <= 1.0 for auc in row["auroc"].values())


def test_paper_start_on_small_gradients_ranks_like_tracin(gfim):
    results, _ = gfim
    for row in results["rows"]:
        # 20 steps from 5e-5 I sum 2^20 Neumann terms: X ~ 2^20 * 5e-5 I (the identity, up to scale) while
        # 5e-5 * lambda_max * 2^20 << 1, which the tiny model's gradients give
        assert 5e-5 * row["gfim_lambda_max"] * 2**20 < 0.01
        assert row["spearman"]["hyperinf paper"] == pytest.approx(row["spearman"]["tracin"], abs=0.01)
