"""GFIM partial sums: definitions, exact merging across shards, the full-Fisher relationship, bad input."""

import math
from unittest.mock import patch

import pytest
import torch

from hyperinf_ops.core.curvature import (
    CurvaturePartial,
    curvature_partials,
    damped_gfim,
    merge_curvature,
)
from hyperinf_ops.errors import EmptyTargetSetError, GradientMismatchError, NonFiniteGradientError
from hyperinf_ops.preconditioners import EstimatorOptions, prepare


def _grads(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.0.query.lora_A.default.weight": torch.randn(n, 3, 10, generator=gen),
        "layer.0.query.lora_B.default.weight": torch.randn(n, 3, 7, generator=gen) * 1e3,
        "layer.1.value.lora_A.default.weight": torch.randn(n, 3, 10, generator=gen, dtype=torch.float64)
        * 1e-4,
    }


def test_sums_match_their_definitions():
    grads = _grads(9)
    parts = curvature_partials(grads, full=True)
    assert list(parts) == sorted(grads)
    for name, g in grads.items():
        part, g64 = parts[name], g.double()
        n, r, d = g.shape
        gfim_sum = sum(g64[k].T @ g64[k] for k in range(n))
        full_sum = sum(torch.outer(g64[k].reshape(-1), g64[k].reshape(-1)) for k in range(n))
        assert part.gfim_sum.dtype == torch.float64 and part.full_sum.dtype == torch.float64
        torch.testing.assert_close(part.gfim_sum, gfim_sum, rtol=1e-12, atol=0)
        torch.testing.assert_close(part.full_sum, full_sum, rtol=1e-12, atol=0)
        assert part.count == n and part.numel == r * d
        assert math.isclose(part.sq_sum, float(g64.square().sum()), rel_tol=1e-12)
        torch.testing.assert_close(part.gfim(), gfim_sum / n)
        assert math.isclose(part.damping(0.1), 0.1 * float(g64.square().mean()), rel_tol=1e-12)


def test_gfim_is_the_sum_of_the_full_fishers_diagonal_blocks():
    # vec is row-major over (r, d): block (i, i) of the full Fisher is (1/n) sum_k g_k[i]^T g_k[i]
    part = curvature_partials(_grads(6), full=True)["layer.0.query.lora_A.default.weight"]
    r, d = 3, 10
    blocks = part.full().reshape(r, d, r, d)
    torch.testing.assert_close(sum(blocks[i, :, i, :] for i in range(r)), part.gfim(), rtol=1e-12, atol=0)
    assert math.isclose(float(part.full().trace()), float(part.gfim().trace()), rel_tol=1e-12)
    assert (
        part.full_sum is not None
        and curvature_partials(_grads(6))["layer.0.query.lora_A.default.weight"].full_sum is None
    )


def test_merging_three_shards_equals_the_union():
    grads = _grads(23, seed=1)
    whole = curvature_partials(grads, full=True)
    bounds = [(0, 5), (5, 6), (6, 23)]  # uneven, one single-example shard
    shards = [curvature_partials({k: v[a:b] for k, v in grads.items()}, full=True) for a, b in bounds]
    before = {name: shards[0][name].gfim_sum.clone() for name in grads}
    merged = merge_curvature(shards)
    for name in grads:
        got, want = merged[name], whole[name]
        assert got.count == want.count and got.numel == want.numel
        torch.testing.assert_close(got.gfim_sum, want.gfim_sum, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.full_sum, want.full_sum, rtol=1e-12, atol=0)
        assert math.isclose(got.sq_sum, want.sq_sum, rel_tol=1e-12)
        assert math.isclose(got.damping(0.1), want.damping(0.1), rel_tol=1e-12)
        torch.testing.assert_close(shards[0][name].gfim_sum, before[name], rtol=0, atol=0)  # inputs untouched
    # an empty shard merges as a no-op
    empty = curvature_partials({k: v[:0] for k, v in grads.items()})
    no_full = merge_curvature([empty, curvature_partials(grads)])
    name = sorted(grads)[0]
    assert no_full[name].count == 23
    with pytest.raises(EmptyTargetSetError):
        empty[name].gfim()


def test_merge_errors_are_named():
    a, b = curvature_partials(_grads(4)), curvature_partials(_grads(4, seed=2))
    name = sorted(a)[0]
    with pytest.raises(GradientMismatchError, match="missing"):
        merge_curvature([a, {k: v for k, v in b.items() if k != name}])
    wrong = dict(b)
    wrong[name] = CurvaturePartial(torch.zeros(7, 7, dtype=torch.float64), 0.0, 1, 21)
    with pytest.raises(GradientMismatchError, match=name.replace(".", r"\.")):
        merge_curvature([a, wrong])
    with pytest.raises(GradientMismatchError, match="full_sum"):
        a[name].merge(curvature_partials(_grads(4), full=True)[name])
    with pytest.raises(EmptyTargetSetError):
        merge_curvature([])


def test_bad_gradients_are_named_errors():
    grads = _grads(4)
    name = "layer.0.query.lora_B.default.weight"
    for bad in (math.nan, math.inf):
        broken = dict(grads)
        broken[name] = grads[name].clone()
        broken[name][2, 1, 3] = bad
        with pytest.raises(NonFiniteGradientError, match=name.replace(".", r"\.")):
            curvature_partials(broken)
    with pytest.raises(GradientMismatchError, match="examples"):
        curvature_partials({**grads, name: grads[name][:3]})
    with pytest.raises(GradientMismatchError, match=r"\(n, r, d\)"):
        curvature_partials({**grads, name: grads[name][0]})
    with pytest.raises(GradientMismatchError, match="empty"):
        curvature_partials({})


def test_damped_gfim_is_gfim_plus_lambda_and_what_every_preconditioner_inverts():
    parts = curvature_partials(_grads(9), full=True)
    for part in parts.values():
        lam, d = part.damping(0.3), part.gfim_sum.shape[0]
        eye = torch.eye(d, dtype=torch.float64)
        assert torch.equal(damped_gfim(part, 0.3), part.gfim() + lam * eye)
        assert torch.equal(
            damped_gfim(part, 0.3, dtype=torch.float32), part.gfim().float() + lam * eye.float()
        )
        full_eye = torch.eye(part.numel, dtype=torch.float64)
        assert torch.equal(damped_gfim(part, 0.3, full=True), part.full() + lam * full_eye)
    exact = prepare(parts, EstimatorOptions("exact", 0.3))
    lissa = prepare(parts, EstimatorOptions("lissa", 0.3))
    exact_full = prepare(parts, EstimatorOptions("exact_full", 0.3))
    for name, part in parts.items():
        assert exact.damping[name] == part.damping(0.3)
        torch.testing.assert_close(
            exact.operators[name], torch.linalg.inv(damped_gfim(part, 0.3)), rtol=1e-10, atol=0
        )
        assert torch.equal(lissa.operators[name], damped_gfim(part, 0.3))
        torch.testing.assert_close(
            exact_full.operators[name], torch.linalg.inv(damped_gfim(part, 0.3, full=True)), rtol=1e-9, atol=0
        )
    # The GFIM methods build their matrices through damped_gfim, one call per matrix.
    for method in ("hyperinf", "exact", "lissa", "datainf"):
        with patch("hyperinf_ops.preconditioners.method.damped_gfim", wraps=damped_gfim) as spy:
            prepare(parts, EstimatorOptions(method, 0.3))
        assert spy.call_count == len(parts)
        assert {id(c.args[0]) for c in spy.call_args_list} == {id(p) for p in parts.values()}
