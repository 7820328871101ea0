"""Schulz / hyperpower inverse: convergence over scale and condition, dtype floors, divergence, parity mode."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperinf_ops.core.inverse import default_tol, schulz_inverse, spectral_upper_bound
from hyperinf_ops.errors import NonFiniteGradientError, NotPositiveDefiniteError


def _spd(d: int, cond: float, scale: float, *, seed: int = 0, dtype=torch.float64, eigs=None) -> torch.Tensor:
    """Q diag(eigs) Q^T with a random orthogonal Q; eigs log-spaced from scale down to scale / cond."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    if eigs is None:
        eigs = scale * torch.logspace(0, -math.log10(cond), d, dtype=torch.float64)
    a = (q * eigs) @ q.T
    return ((a + a.T) / 2).to(dtype)


def _true_residual(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    d = a.shape[-1]
    eye = torch.eye(d, dtype=torch.float64)
    return torch.linalg.matrix_norm(eye - a.double() @ x.double()) / math.sqrt(d)


@pytest.mark.parametrize("d", [16, 128])
def test_fp64_any_scale_and_condition_in_one_batch(d):
    cases = [(c, s) for c in (1.0, 1e3, 1e6) for s in (1e-8, 1.0, 1e8)]
    a = torch.stack([_spd(d, c, s, seed=i) for i, (c, s) in enumerate(cases)])
    res = schulz_inverse(a)
    assert res.converged and res.iterations <= 40
    assert res.inverse.shape == a.shape and res.residual.shape == (len(cases),)
    assert (res.residual <= 1e-6).all()
    # the reported residual is the returned inverse's, not an optimistic estimate
    torch.testing.assert_close(res.residual, _true_residual(a, res.inverse), rtol=1e-3, atol=1e-15)


def test_fp64_d512_extreme_scales_cond_1e6():
    a = torch.stack([_spd(512, 1e6, 1e8, seed=1), _spd(512, 1e6, 1e-8, seed=2)])
    res = schulz_inverse(a)
    assert res.converged and res.iterations <= 40
    assert (_true_residual(a, res.inverse) <= 1e-6).all()


@settings(max_examples=30, deadline=None, database=None)  # no .hypothesis/ in the tree
@given(
    d=st.integers(1, 24),
    log_cond=st.floats(0, 6),
    log_scale=st.floats(-8, 8),
    order=st.sampled_from([2, 3, 4]),
    seed=st.integers(0, 2**16),
)
def test_property_converges_from_scaled_start(d, log_cond, log_scale, order, seed):
    a = _spd(d, 10**log_cond, 10**log_scale, seed=seed)
    res = schulz_inverse(a, order=order)
    assert res.converged and res.iterations <= 40
    assert float(_true_residual(a, res.inverse)) <= 1e-6


def test_fp32_moderate_condition_reaches_1e_4_and_reports_ill_conditioned():
    # fp32 floors near 2e-8 * cond: 1e-4 holds up to cond ~3e3; beyond, converged=False (not silently wrong)
    good = torch.stack(
        [
            _spd(128, c, s, seed=i, dtype=torch.float32)
            for i, (c, s) in enumerate([(1.0, 1e-8), (1e2, 1e8), (1e3, 1.0), (1e3, 1e-8)])
        ]
    )
    res = schulz_inverse(good)
    assert (
        res.converged
        and res.residual.dtype == torch.float32
        and res.tol == default_tol(torch.float32) == 1e-4
    )
    assert (_true_residual(good, res.inverse) <= 1e-4).all()
    bad = schulz_inverse(_spd(128, 1e6, 1.0, dtype=torch.float32))
    assert not bad.converged and float(bad.residual) > 1e-4
    assert bad.iterations < 60  # stops at the rounding floor instead of running to max_iter


def test_higher_order_needs_fewer_iterations():
    a = _spd(64, 1e6, 3.0)
    second, third = schulz_inverse(a, order=2), schulz_inverse(a, order=3)
    assert second.converged and third.converged
    assert third.iterations < second.iterations
    assert float(third.residual) <= 1e-6


@pytest.mark.parametrize("negative", [-1e-3, -1.0, 0.0])
def test_indefinite_or_singular_is_reported_not_converged(negative):
    eigs = torch.logspace(0, -2, 32, dtype=torch.float64)
    eigs[5] = negative
    a = torch.stack([_spd(32, 1, 1, eigs=eigs), _spd(32, 1e2, 1.0, seed=3)])
    res = schulz_inverse(a)
    assert not res.converged
    # the failing matrix keeps its best iterate and a residual no tolerance accepts; its SPD neighbour converges
    assert float(res.residual[0]) >= 1 / math.sqrt(32) * 0.99
    assert float(res.residual[1]) <= res.tol
    assert torch.isfinite(res.inverse).all()


def test_leading_batch_dims_are_kept():
    a = torch.stack([torch.stack([_spd(8, 10.0, 2.0, seed=3 * i + j) for j in range(3)]) for i in range(2)])
    res = schulz_inverse(a)
    assert res.inverse.shape == (2, 3, 8, 8) and res.residual.shape == (2, 3) and res.converged
    torch.testing.assert_close(res.inverse, torch.linalg.inv(a), rtol=1e-8, atol=0)


def test_spectral_upper_bound_is_an_upper_bound_and_tight():
    a = torch.stack(
        [_spd(64, c, s, seed=i) for i, (c, s) in enumerate([(1.0, 1e-8), (1e4, 1e8), (1e2, 1.0)])]
    )
    bound, lmax = spectral_upper_bound(a), torch.linalg.eigvalsh(a)[..., -1]
    assert (bound >= lmax * (1 - 1e-12)).all()
    assert (bound <= lmax * 64 ** (1 / 8) * (1 + 1e-12)).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_is_a_named_error(bad):
    a = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    a[1, 2, 2] = bad
    with pytest.raises(NonFiniteGradientError, match=r"batch index \[\[1\]\]"):
        schulz_inverse(a)


def test_bad_shapes_dtypes_and_options():
    with pytest.raises(NotPositiveDefiniteError, match="square"):
        schulz_inverse(torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(NotPositiveDefiniteError, match="symmetric"):
        schulz_inverse(torch.tensor([[2.0, 1.0], [0.0, 2.0]], dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        schulz_inverse(torch.eye(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="order"):
        schulz_inverse(torch.eye(3, dtype=torch.float64), order=1)
    with pytest.raises(ValueError, match="init"):
        schulz_inverse(torch.eye(3, dtype=torch.float64), init="identity")


@pytest.mark.parametrize(
    ("top", "extra", "diverges"), [(1.98, 0.0, False), (2.02, 0.0, True), (1.98, 0.04, True)]
)
def test_paper_start_diverges_exactly_above_two_over_alpha(top, extra, diverges):
    # X_0 = alpha I converges iff lambda_max(A + extra I) < 2 / alpha (R_t = (I - alpha A)^(2^t)).
    alpha = 5e-5
    eigs = torch.linspace(1.0, top, 24, dtype=torch.float64) / alpha
    a = _spd(24, 1, 1, eigs=eigs, seed=7)
    res = schulz_inverse(a, init="paper", paper_alpha=alpha, extra_damping=extra / alpha, max_iter=20)
    assert res.iterations == 20
    if diverges:
        assert not res.converged and not float(res.residual) <= 1.0  # inf / NaN or huge
    else:
        assert res.converged and float(res.residual) <= 1e-9


def test_paper_start_leaves_small_eigen_directions_uninverted():
    # lambda_min * alpha * 2^20 = 0.05 << 1: the fixed 20 steps barely move those directions off X_0
    a = _spd(16, 1e6, 1e3, seed=4)
    res = schulz_inverse(a, init="paper")
    assert not res.converged and float(res.residual) > 0.1
