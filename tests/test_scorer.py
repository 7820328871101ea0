"""Streaming scorer vs an in-memory matmul; ranks, percentiles, atomic per-query commits; fingerprint
refusal; DataInf's projected two-pass vs exact DataInf (exact at dim 0); raw rows read back as gradients;
self-influence from a stored (prepared) inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperinf_ops.curvature import curvature_partials
from hyperinf_ops.errors import (
    FingerprintMismatchError,
    GradientMismatchError,
    NonFiniteGradientError,
    UnsupportedMethodError,
)
from hyperinf_ops.estimators import (
    EstimatorOptions,
    mean_target_gradient,
    precondition,
    score_gradients,
    self_influence,
)
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.preconditioners import prepare
from hyperinf_ops.projection import BlockProjector, ProjectionSpec
from hyperinf_ops.scorer import (
    datainf_projected_query,
    raw_gradient_batches,
    score_store,
    self_influence_store,
)
from hyperinf_ops.store import GradientBatch, LanceStore, Query

SHAPES = {"l0.lora_A": (4, 24), "l0.lora_B": (4, 16), "l1.lora_A": (4, 24)}


def _fp(spec: ProjectionSpec, adapter: str = "a") -> Fingerprint:
    return Fingerprint.create(
        model_id="tiny",
        model_hash="h",
        adapter_hash=adapter,
        task="classification",
        lora_modules=["l"],
        shapes=SHAPES,
        projection=spec,
    )


def _grads(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # A shared direction so that scores have structure; a scale per example so fp16 scaling matters.
    common = {k: torch.randn(*s, generator=gen) for k, s in SHAPES.items()}
    scale = torch.exp(torch.randn(n, 1, 1, generator=gen))
    return {
        k: (torch.randn(n, *s, generator=gen) + torch.randn(n, 1, 1, generator=gen) * common[k])
        * scale
        * 1e-3
        for k, s in SHAPES.items()
    }


def _store(tmp_path, spec: ProjectionSpec, grads, shards: int = 3):
    store = LanceStore(str(tmp_path))
    projector = BlockProjector(SHAPES, spec)
    n = next(iter(grads.values())).shape[0]
    ids = [f"id{i:04d}" for i in range(n)]
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
        sl = slice(bounds[s], bounds[s + 1])
        part = {k: v[sl] for k, v in grads.items()}
        store.write_gradients(f"s{s}", GradientBatch(ids[sl], projector.project(part), projector.sq_norms(part)),
                              _fp(spec))
        store.write_curvature(f"s{s}", curvature_partials(part), _fp(spec), examples_digest=f"digest-{s}")
    return store, projector, ids


def _scores(store, method: str, ids) -> np.ndarray:
    t = store.open("scores").to_table().to_pandas()
    return t[t["method"] == method].set_index("sample_id").loc[ids]


def test_streaming_scores_equal_in_memory_matmul_and_ranks(tmp_path):
    spec = ProjectionSpec(dim=48)
    store, projector, ids = _store(tmp_path, spec, _grads(101, 0))
    gen = torch.Generator().manual_seed(5)
    queries = [
        Query("t1", m, torch.randn(48, generator=gen), _fp(spec).digest()) for m in ("hyperinf", "tracin")
    ]
    summary = score_store(store, queries, batch_rows=7, run_id="run-1")  # 15 batches over 3 fragments
    assert summary.rows == 101 and summary.gradients_version == store.versions()["gradients"]
    assert summary.device == ("cuda" if torch.cuda.is_available() else "cpu")

    table = store.open("gradients").to_table()
    x = np.stack(table["grad"].to_numpy(zero_copy_only=False)).astype(np.float64)
    x *= table["grad_scale"].to_numpy()[:, None]
    order = np.argsort(table["sample_id"].to_numpy())  # rows of `table` in id order
    for q in queries:
        got = _scores(store, q.method, ids)
        expected = x[order] @ q.vector.double().numpy()
        np.testing.assert_allclose(
            got["score"].to_numpy(), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max()
        )
        # rank 1 = highest score; percentile 1.0 = most helpful, 1/n = least.
        assert (got.sort_values("rank")["score"].diff().dropna() <= 0).all()
        assert sorted(got["rank"]) == list(range(1, 102))
        np.testing.assert_allclose(got["percentile"], (101 - got["rank"] + 1) / 101)
        assert set(got["gradients_version"]) == {summary.gradients_version} and set(got["run_id"]) == {
            "run-1"
        }
    # Rescoring replaces each (target_set, method) in one commit: no duplicates, one version per query.
    v = store.versions()["scores"]
    summary2 = score_store(store, queries[:1], run_id="run-2")
    assert summary2.score_versions == {"t1/hyperinf": v + 1}
    assert store.open("scores").count_rows() == 202


def test_ties_rank_by_sample_id(tmp_path):
    spec = ProjectionSpec(dim=0)
    grads = {k: torch.ones(4, *s) for k, s in SHAPES.items()}
    store, projector, ids = _store(tmp_path, spec, grads, shards=2)
    q = Query("t", "tracin", torch.ones(projector.out_dim), _fp(spec).digest())
    score_store(store, [q])
    assert _scores(store, "tracin", ids)["rank"].tolist() == [1, 2, 3, 4]


def test_query_of_another_fingerprint_is_refused_nothing_written(tmp_path):
    spec, other = ProjectionSpec(dim=48), ProjectionSpec(dim=48, seed=1)
    store, _, _ = _store(tmp_path, spec, _grads(10, 0), shards=1)
    with pytest.raises(FingerprintMismatchError, match="built for fingerprint"):  # a digest never seen
        score_store(store, [Query("t", "tracin", torch.ones(48), _fp(other).digest())])
    # Gradients recomputed under a new projection seed: queries of the old rows name the changed field.
    stale = Query("t", "tracin", torch.ones(48), _fp(spec).digest())
    store.write_gradients(
        "s0", GradientBatch(["x"], torch.ones(1, 48), torch.ones(1, 3)), _fp(other), overwrite=True
    )
    with pytest.raises(FingerprintMismatchError, match="projection_seed: expected 0, found 1"):
        score_store(store, [stale])
    assert not store.exists("scores")
    with pytest.raises(NonFiniteGradientError):
        score_store(store, [Query("t", "tracin", torch.full((48,), float("nan")), _fp(other).digest())])
    assert not store.exists("scores")


@pytest.mark.parametrize("dim", [0, 512])
def test_datainf_projected_two_pass_matches_exact_datainf(tmp_path, dim):
    spec = ProjectionSpec(dim=dim, dtype="float32")
    train, target = _grads(60, 1), _grads(9, 2)
    store, projector, ids = _store(tmp_path, spec, train)
    v = mean_target_gradient(target)
    curvature = store.read_curvature(_fp(spec))
    exact = precondition(v, curvature, EstimatorOptions(method="datainf"), train_grads=train)
    pv, diag = datainf_projected_query(store, v, projector, fingerprint=_fp(spec), batch_rows=16)
    for name in SHAPES:  # damping from sq_norms = the curvature table's damping rule
        assert diag[name]["damping"] == pytest.approx(curvature[name].damping(0.1), rel=1e-6)
    pv_given, _ = datainf_projected_query(
        store, v, projector, fingerprint=_fp(spec), damping={k: p.damping(0.1) for k, p in curvature.items()}
    )
    torch.testing.assert_close(pv_given, pv, rtol=1e-6, atol=0)
    if dim == 0:  # raw rows: the projected two-pass IS exact DataInf
        expected = projector.project_vector(exact.vectors)
        assert float((pv - expected).abs().max() / expected.abs().max()) <= 1e-6
    score_store(store, [Query("t", "datainf", pv, _fp(spec).digest())])
    got = _scores(store, "datainf", ids)["score"].to_numpy()
    ref = score_gradients(exact, train).numpy()
    if dim == 0:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    else:
        assert np.corrcoef(got, ref)[0, 1] > 0.95


def test_raw_rows_read_back_as_the_gradients_and_feed_datainf(tmp_path):
    train, target = _grads(40, 3), _grads(5, 4)
    store, _, ids = _store(tmp_path, ProjectionSpec(dim=0), train)
    batches = list(raw_gradient_batches(store, SHAPES, batch_rows=16))
    got_ids = [i for batch_ids, _ in batches for i in batch_ids]
    order = [ids.index(i) for i in got_ids]
    for name in SHAPES:  # float32 storage of the exact gradients
        torch.testing.assert_close(torch.cat([g[name] for _, g in batches]), train[name][order].double())
    # DataInf's preconditioner streamed over the stored rows = its projected two-pass at dim 0 = in memory
    v = mean_target_gradient(target)
    prepared = prepare(store.read_curvature(_fp(ProjectionSpec(dim=0))), EstimatorOptions(method="datainf"))
    streamed = prepared.apply_one(v, train_batches=(g for _, g in raw_gradient_batches(store, SHAPES, batch_rows=7)))
    in_memory = precondition(v, store.read_curvature(_fp(ProjectionSpec(dim=0))), EstimatorOptions(method="datainf"),
                             train_grads=train).vectors
    for name in SHAPES:
        torch.testing.assert_close(streamed[name], in_memory[name], rtol=1e-6, atol=0)
    with pytest.raises(GradientMismatchError, match="raw gradient rows"):
        next(raw_gradient_batches(_store(tmp_path / "p", ProjectionSpec(dim=48), train)[0], SHAPES))


@pytest.mark.parametrize("method", ["hyperinf", "exact", "tracin"])
def test_self_influence_stream_equals_estimators_self_influence(tmp_path, method):
    grads = _grads(90, 3)
    store, _, ids = _store(tmp_path, ProjectionSpec(dim=0), grads)
    curvature = store.read_curvature(_fp(ProjectionSpec(dim=0)))
    got_ids, got = self_influence_store(store, prepare(curvature, EstimatorOptions(method=method)), batch_rows=16)
    want = self_influence(grads, method=method, damping_ratio=0.1).numpy()
    order = [ids.index(i) for i in got_ids]
    assert sorted(got_ids) == ids
    np.testing.assert_allclose(got, want[order], rtol=1e-5)


def test_self_influence_needs_raw_rows(tmp_path):
    spec = ProjectionSpec(dim=48)
    store, _, _ = _store(tmp_path, spec, _grads(30, 4))
    curvature = store.read_curvature(_fp(spec))
    with pytest.raises(GradientMismatchError, match="raw gradient rows"):
        self_influence_store(store, prepare(curvature, EstimatorOptions()))
    raw, _, _ = _store(tmp_path / "raw", ProjectionSpec(dim=0), _grads(30, 4))
    with pytest.raises(UnsupportedMethodError, match="self-influence from a prepared 'datainf'"):
        self_influence_store(raw, prepare(curvature, EstimatorOptions(method="datainf")))
