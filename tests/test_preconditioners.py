"""Prepared inverses: prepare once, apply many times, against direct evaluations of each method's formula;
solver call counts, the Arrow round trip, DataInf streaming, self-influence, and named errors."""

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hyperinf_ops.core import estimators
from hyperinf_ops.core.curvature import curvature_partials
from hyperinf_ops.core.inverse import schulz_inverse
from hyperinf_ops.errors import GradientMismatchError, UnsupportedMethodError
from hyperinf_ops.preconditioners import (
    METHODS,
    PRECONDITIONERS,
    EstimatorOptions,
    options_key,
    prepare,
    prepared_from_table,
    prepared_to_table,
)
from hyperinf_ops.preconditioners.exact import cholesky_inverses
from hyperinf_ops.preconditioners.hyperinf import schulz_with_options
from hyperinf_ops.preconditioners.serialize import PREPARED_SCHEMA

SHAPES = {"l0.query.lora_A": (4, 24), "l0.query.lora_B": (4, 16), "l1.value.lora_A": (3, 24)}
LISSA_ITERATIONS = 200


def _grads(n: int, seed: int, shapes=SHAPES, rank: int = 5) -> dict[str, torch.Tensor]:
    """float64 gradients near a rank-`rank` subspace per matrix (strong spectral decay, like LoRA gradients)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (r, d)) in enumerate(shapes.items()):
        basis = torch.randn(rank, d, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        coef = torch.randn(n, r, rank, generator=gen, dtype=torch.float64) * 10.0 ** (-i)
        out[name] = coef @ basis + 0.02 * 10.0 ** (-i) * torch.randn(
            n, r, d, generator=gen, dtype=torch.float64
        )
    return out


@pytest.fixture(scope="module")
def train():
    return _grads(30, seed=0)


def _options(method: str, **kw) -> EstimatorOptions:
    return EstimatorOptions(method=method, lissa_iterations=LISSA_ITERATIONS, **kw)


def _curvature(train, method):
    return curvature_partials(train, full=method == "exact_full")


def _direct(method: str, g: np.ndarray, v: np.ndarray, ratio: float = 0.1) -> np.ndarray:
    """v (n, r, d) preconditioned by `method` for training gradients g (n, r, d), written out in numpy."""
    n, r, d = g.shape
    k = v.shape[0]
    lam = ratio * np.mean(g**2)
    if method == "tracin":
        return v
    flat, vf = g.reshape(n, -1), v.reshape(k, -1)
    if method == "exact_full":
        full = flat.T @ flat / n + lam * np.eye(r * d)
        return np.linalg.solve(full, vf.T).T.reshape(v.shape)
    if method == "datainf":
        out = [
            sum(x - (x @ flat[i]) / (lam + flat[i] @ flat[i]) * flat[i] for i in range(n)) / (n * lam)
            for x in vf
        ]
        return np.stack(out).reshape(v.shape)
    a = sum(g[i].T @ g[i] for i in range(n)) / n + lam * np.eye(d)
    if method == "lissa":
        s = np.linalg.norm(a)
        rows = v.reshape(k * r, d)
        acc = rows
        for _ in range(LISSA_ITERATIONS):
            acc = rows + acc @ (np.eye(d) - a / s)
        return (acc / s).reshape(v.shape)
    return np.linalg.solve(a, v.reshape(k * r, d).T).T.reshape(v.shape)  # hyperinf, exact


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# Norm-wise relative error per matrix, as test_estimators bounds hyperinf (entries near zero carry the
# absolute rounding of the rest).
RTOL = {"exact": 1e-10, "hyperinf": 1e-6, "exact_full": 1e-9, "datainf": 1e-10, "lissa": 1e-10, "tracin": 0}


@pytest.mark.parametrize("method", METHODS)
def test_prepare_once_apply_many_equals_the_direct_formula(train, method):
    prepared = prepare(_curvature(train, method), _options(method))
    assert prepared.method == method and prepared.shapes == SHAPES and prepared.converged
    batches = [train]
    for seed in (1, 2, 3):  # stacks of K = 4, then single vectors through apply_one
        vecs = _grads(4, seed)
        got = prepared.apply(vecs, train_batches=batches)
        one = prepared.apply_one({k: v[0] for k, v in vecs.items()}, train_batches=batches)
        for name, v in vecs.items():
            want = _direct(method, train[name].numpy(), v.numpy())
            assert got[name].dtype == torch.float64 and got[name].shape == v.shape
            assert _rel(got[name].numpy(), want) <= RTOL[method]
            assert _rel(one[name].numpy(), want[0]) <= RTOL[method]


@pytest.mark.parametrize("method", ["hyperinf", "exact", "lissa"])
def test_stored_operators(train, method):
    prepared = prepare(curvature_partials(train), _options(method))
    for name, op in prepared.operators.items():
        g = train[name].numpy()
        _, _, d = g.shape
        a = sum(x.T @ x for x in g) / len(g) + 0.1 * np.mean(g**2) * np.eye(d)
        want = a if method == "lissa" else np.linalg.inv(a)
        assert op.dtype == torch.float64 and op.shape == (d, d)
        np.testing.assert_allclose(op.numpy(), want, rtol=1e-12 if method == "lissa" else 1e-6, atol=0)
        if method == "lissa":
            info = prepared.diagnostics[name]
            assert info.scale == pytest.approx(np.linalg.norm(a), rel=1e-12) and math.isnan(info.residual)


def test_schulz_runs_once_per_width_at_prepare_and_never_at_apply():
    """One batched solve per width (`schulz_with_options`: a float32 run polished in float64, the same batch),
    none at apply."""
    same = {f"layer.{i}.lora_A": (4, 16) for i in range(3)}
    with patch("hyperinf_ops.preconditioners.hyperinf.schulz_with_options", wraps=schulz_with_options) as spy, \
            patch("hyperinf_ops.preconditioners.hyperinf.schulz_inverse", wraps=schulz_inverse) as inner:
        prepared = prepare(curvature_partials(_grads(20, 0, same)), EstimatorOptions())
        assert spy.call_count == 1 and spy.call_args.args[0].shape == (3, 16, 16)
        assert [c.args[0].dtype for c in inner.call_args_list] == [torch.float32, torch.float64]
        assert all(c.args[0].shape == (3, 16, 16) for c in inner.call_args_list)
        for seed in range(5):
            prepared.apply(_grads(2, seed, same))
        assert spy.call_count == 1 and inner.call_count == 2
        two_widths = {**same, "layer.0.lora_B": (4, 8)}
        prepare(curvature_partials(_grads(20, 0, two_widths)), EstimatorOptions())
        assert spy.call_count == 3
    with patch("hyperinf_ops.preconditioners.exact.cholesky_inverses", wraps=cholesky_inverses) as spy:
        prepared = prepare(curvature_partials(_grads(20, 0, two_widths)), EstimatorOptions("exact"))
        prepared.apply(_grads(2, 1, two_widths))
        assert spy.call_count == 2


@pytest.mark.parametrize("method", METHODS)
def test_arrow_round_trip_is_bitwise(train, method):
    zeroed = {**train, "l0.query.lora_B": torch.zeros_like(train["l0.query.lora_B"])}  # a null operator
    prepared = prepare(_curvature(zeroed, method), _options(method))
    table = prepared_to_table(prepared, "curv:abc/fp:def/" + options_key(prepared.options))
    assert table.schema == PREPARED_SCHEMA and table.num_rows == len(SHAPES)
    assert table.column("matrix").to_pylist() == sorted(SHAPES)
    sink = io.BytesIO()  # through Parquet bytes, as a store would keep it
    pq.write_table(table, sink)
    loaded = prepared_from_table(pq.read_table(io.BytesIO(sink.getvalue())))
    assert loaded.method == method and loaded.options == prepared.options
    assert loaded.shapes == prepared.shapes
    assert json.dumps(loaded.damping) == json.dumps(prepared.damping)  # NaN-aware, repr-exact floats
    for name, op in prepared.operators.items():
        got = loaded.operators[name]
        assert (op is None) == (got is None) and (op is None or torch.equal(got, op))
        assert json.dumps(loaded.diagnostics[name].to_dict()) == json.dumps(
            prepared.diagnostics[name].to_dict()
        )
    vecs = _grads(3, 7)
    want = prepared.apply(vecs, train_batches=[zeroed])
    got = loaded.apply(vecs, train_batches=[zeroed])
    assert all(torch.equal(got[name], want[name]) for name in want)
    if method != "tracin":  # lambda = 0: no operator, a zero contribution
        assert loaded.diagnostics["l0.query.lora_B"].converged and not bool(got["l0.query.lora_B"].any())


def test_prepared_table_rejects_mixed_keys(train):
    prepared = prepare(curvature_partials(train), EstimatorOptions("exact"))
    mixed = pa.concat_tables([prepared_to_table(prepared, "a"), prepared_to_table(prepared, "b")])
    with pytest.raises(ValueError, match="mixes keys"):
        prepared_from_table(mixed)


def test_options_key_differs_per_option_and_is_stable_across_processes():
    base = EstimatorOptions()
    changed = {
        "method": "exact",
        "damping_ratio": 0.2,
        "schulz_order": 3,
        "schulz_tol": 1e-8,
        "schulz_max_iter": 30,
        "init": "paper",
        "paper_alpha": 1e-4,
        "paper_extra_damping": 1e-3,
        "allow_unconverged": True,
        "lissa_iterations": 10,
        "lissa_scale": 2.0,
        "dtype": torch.float32,
    }
    assert set(changed) == set(EstimatorOptions.model_fields)
    keys = {options_key(base)} | {options_key(EstimatorOptions(**{**base.model_dump(), k: v})) for k, v in changed.items()}
    assert len(keys) == len(changed) + 1 and all(len(k) == 16 for k in keys)
    assert options_key(EstimatorOptions()) == options_key(base)
    assert EstimatorOptions.model_validate(EstimatorOptions(dtype=torch.float32).model_dump()).torch_dtype == \
        torch.float32
    code = "from hyperinf_ops.preconditioners import EstimatorOptions, options_key; print(options_key(EstimatorOptions()))"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],  # this checkout's hyperinf_ops
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert other.stdout.strip() == options_key(base)


def test_datainf_streams_batches_like_one_in_memory_batch(train):
    prepared = prepare(curvature_partials(train), EstimatorOptions("datainf"))
    vecs = _grads(5, 4)
    whole = prepared.apply(vecs, train_batches=[train])
    bounds = [(0, 7), (7, 8), (8, 30)]
    streamed = prepared.apply(vecs, train_batches=({k: g[a:b] for k, g in train.items()} for a, b in bounds))
    for name in whole:
        torch.testing.assert_close(streamed[name], whole[name], rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["hyperinf", "exact", "exact_full", "tracin"])
def test_prepared_self_influence(train, method):
    prepared = prepare(_curvature(train, method), _options(method))
    got = prepared.self_influence(train)
    assert got.dtype == torch.float64 and got.shape == (30,)
    torch.testing.assert_close(got, estimators.self_influence(train, method), rtol=1e-12, atol=0)
    want = sum(
        np.einsum("nrd,nrd->n", g.numpy(), _direct(method, g.numpy(), g.numpy())) for g in train.values()
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6 if method == "hyperinf" else 1e-9, atol=0)


def test_bad_input_is_a_named_error(train):
    curvature = curvature_partials(train)
    prepared = prepare(curvature, EstimatorOptions())
    vecs = _grads(2, 1)
    name = "l0.query.lora_B"
    with pytest.raises(GradientMismatchError, match=name.replace(".", r"\.")):
        prepared.apply({k: v for k, v in vecs.items() if k != name})
    with pytest.raises(GradientMismatchError, match=name.replace(".", r"\.")):
        prepared.apply({**vecs, name: vecs[name][:, :, :-1]})
    with pytest.raises(GradientMismatchError, match=r"\(r, d\)"):
        prepared.apply_one(vecs)
    datainf = prepare(curvature, EstimatorOptions("datainf"))
    with pytest.raises(ValueError, match="train_batches"):
        datainf.apply(vecs)
    with pytest.raises(GradientMismatchError, match="train gradients"):
        datainf.apply(vecs, train_batches=[{**train, name: train[name][:, :-1]}])
    for method in ("lissa", "datainf"):
        with pytest.raises(UnsupportedMethodError, match=method):
            prepare(curvature, _options(method)).self_influence(train)
    assert sorted(PRECONDITIONERS) == sorted(METHODS)
