"""Streaming scorer vs an in-memory matmul (rows read straight from Lance's pages and through Lance's scanner);
ranks, percentiles, atomic per-query commits; fingerprint refusal; DataInf's projected two-pass vs exact DataInf
(exact at dim 0); raw rows read back as gradients; self-influence from a stored (prepared) inverse as target set
"self" in the same scan, and curation SQL over it."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from hyperinf_ops.curvature import curvature_partials
from hyperinf_ops.errors import (
    DataError,
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
from hyperinf_ops.query import connect, run_query
from hyperinf_ops.scorer import (
    SELF_TARGET,
    datainf_projected_query,
    raw_gradient_batches,
    score_store,
)
from hyperinf_ops.store import GradientBatch, LanceStore, Query, vectors

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


def _scores(store, method: str, ids, target_set: str | None = None) -> np.ndarray:
    t = store.open("scores").to_table().to_pandas()
    t = t[t["method"] == method]
    if target_set is not None:
        t = t[t["target_set"] == target_set]
    return t.set_index("sample_id").loc[ids]


def _direct(store) -> list[bool]:
    """Per fragment of `gradients`: are its rows read straight from the Lance pages?"""
    ds = store.open("gradients")
    return [vectors.plain_pages(ds, f, "grad") is not None for f in ds.get_fragments()]


# 48 fp16 dims: Lance packs rows this small into compressed mini-blocks, read through its scanner. 512 fp16 and
# 256 fp32 dims (>= 256 bytes a row): plain pages, read directly.
@pytest.mark.parametrize("dim, dtype, direct", [(48, "float16", False), (512, "float16", True),
                                                (256, "float32", True)])
def test_streaming_scores_equal_in_memory_matmul_and_ranks(tmp_path, dim, dtype, direct):
    spec = ProjectionSpec(dim=dim, dtype=dtype)
    store, projector, ids = _store(tmp_path, spec, _grads(101, 0))
    assert _direct(store) == [direct] * 3
    gen = torch.Generator().manual_seed(5)
    queries = [
        Query("t1", m, torch.randn(dim, generator=gen), _fp(spec).digest()) for m in ("hyperinf", "tracin")
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
        # float32 math: the error is float32 rounding of the products' sum (~1e-7 relative to |q| |row|)
        bound = 1e-6 * np.linalg.norm(x[order], axis=1) * float(q.vector.norm())
        assert (np.abs(got["score"].to_numpy() - expected) <= bound).all()
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


def _reference(store, queries, ids) -> dict[str, np.ndarray]:
    return {q.method: _scores(store, q.method, ids)["score"].to_numpy() for q in queries}


def test_direct_page_reads_equal_lance_scanner_reads(tmp_path, monkeypatch):
    """The same scores, bit for bit, whether the rows come straight from the pages or through Lance's scanner;
    a fragment with a deletion vector, or pages that do not read back as Lance decodes them, use the scanner."""
    spec = ProjectionSpec(dim=512)
    store, _, ids = _store(tmp_path, spec, _grads(120, 1))
    gen = torch.Generator().manual_seed(6)
    queries = [Query("t", m, torch.randn(512, generator=gen), _fp(spec).digest()) for m in ("hyperinf", "tracin")]
    score_store(store, queries, batch_rows=16)
    direct = _reference(store, queries, ids)
    with monkeypatch.context() as m:
        m.setattr(vectors, "plain_pages", lambda *args: None)
        score_store(store, queries, batch_rows=16)
    scanned = _reference(store, queries, ids)
    for method in direct:
        np.testing.assert_array_equal(direct[method], scanned[method])

    # pages misread (one value off): the spot check against Lance's decode catches it, the scanner reads them
    def shifted(file, out, offset):
        return real_read(file, out, offset + 2)

    real_read = vectors._read_exact
    with monkeypatch.context() as m:
        m.setattr(vectors, "_read_exact", shifted)
        with pytest.warns(RuntimeWarning, match="not the expected plain layout"):
            assert _direct(store) == [False] * 3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            score_store(store, queries, batch_rows=16)
    for method, values in _reference(store, queries, ids).items():
        np.testing.assert_array_equal(values, direct[method])

    # a deletion vector in the first fragment: that fragment goes through the scanner, the others stay direct
    store.open("gradients").delete("sample_id = 'id0003'")
    assert _direct(store) == [False, True, True]
    score_store(store, queries, batch_rows=16)
    kept = [i for i in ids if i != "id0003"]
    assert store.open("scores").count_rows() == 2 * len(kept)
    for method, values in direct.items():  # other batch boundaries: equal to float32 rounding
        np.testing.assert_allclose(_scores(store, method, kept)["score"].to_numpy(),
                                   values[[ids.index(i) for i in kept]], rtol=1e-5, atol=1e-7)


def test_torch_threads_restored(tmp_path):
    spec = ProjectionSpec(dim=512)
    store, _, _ = _store(tmp_path, spec, _grads(20, 2), shards=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        score_store(store, [Query("t", "tracin", torch.ones(512), _fp(spec).digest())], device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


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


def test_self_influence_scores_in_the_same_scan(tmp_path):
    """Self-influence of every raw row under each stored inverse is written as target set "self" by the same
    score_store call as the queries: score = -self-influence, ranked like every other score."""
    grads = _grads(90, 3)
    spec = ProjectionSpec(dim=0)
    store, projector, ids = _store(tmp_path, spec, grads)
    curvature = store.read_curvature(_fp(spec))
    methods = ["hyperinf", "exact", "tracin"]
    prepared = [prepare(curvature, EstimatorOptions(method=m)) for m in methods]
    query = Query("t1", "tracin", torch.randn(projector.out_dim, generator=torch.Generator().manual_seed(8)),
                  _fp(spec).digest())
    summary = score_store(store, [query], self_influence=prepared, batch_rows=16, run_id="run-self")
    assert summary.rows == 90
    assert list(summary.score_versions) == ["t1/tracin"] + [f"{SELF_TARGET}/{m}" for m in methods]
    first = summary.score_versions["t1/tracin"]
    assert list(summary.score_versions.values()) == list(range(first, first + 4))  # one commit each
    assert SELF_TARGET == "self"
    for method in methods:
        got = _scores(store, method, ids, target_set="self")
        want = -self_influence(grads, method=method, damping_ratio=0.1).numpy()
        np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=1e-6)
        assert (got["score"] < 0).all()  # -(a positive quadratic form)
        assert (got.sort_values("rank")["score"].diff().dropna() <= 0).all()
        assert sorted(got["rank"]) == list(range(1, 91)) and set(got["run_id"]) == {"run-self"}
        np.testing.assert_allclose(got["percentile"], (90 - got["rank"] + 1) / 90)
    # tracin's self-influence is the squared gradient norm
    sq = sum(g.double().pow(2).sum((1, 2)) for g in grads.values()).numpy()
    np.testing.assert_allclose(_scores(store, "tracin", ids, target_set="self")["score"], -sq, rtol=1e-6)
    # the query of the same call is unaffected
    x = torch.cat([grads[k].reshape(90, -1) for k in sorted(grads)], 1).double()
    np.testing.assert_allclose(_scores(store, "tracin", ids, target_set="t1")["score"],
                               (x @ query.vector.double()).numpy(), rtol=1e-5, atol=1e-7)
    # self-influence alone (no queries) also works
    score_store(store, [], self_influence=prepared[:1])
    assert store.open("scores").count_rows() == 90 * 4


def test_drop_harmful_on_self_influence_drops_the_most_suspicious(tmp_path):
    grads = _grads(50, 5)
    spec = ProjectionSpec(dim=0)
    store, _, ids = _store(tmp_path, spec, grads)
    hyperinf = prepare(store.read_curvature(_fp(spec)), EstimatorOptions(method="hyperinf"))
    query = Query("t", "hyperinf", torch.ones(256), _fp(spec).digest())
    score_store(store, [query], self_influence=[hyperinf])
    si = self_influence(grads, method="hyperinf", damping_ratio=0.1).numpy()
    suspicious = {ids[i] for i in np.argsort(-si)[: math.ceil(0.1 * len(ids))]}  # the 5 largest
    con = connect(store)
    kept = run_query(con, "drop_harmful", {"target_set": "self", "method": "hyperinf", "fraction": 0.1})
    assert kept.num_rows == 45
    assert set(kept["sample_id"].to_pylist()) == set(ids) - suspicious
    # top_k ranks the target sets only: self-influence is selected by name
    assert set(run_query(con, "top_k", {"method": "hyperinf", "k": 3})["target_set"].to_pylist()) == {"t"}
    con.close()


def test_self_influence_needs_raw_rows_and_a_stored_inverse(tmp_path):
    spec = ProjectionSpec(dim=48)
    store, _, _ = _store(tmp_path, spec, _grads(30, 4))
    curvature = store.read_curvature(_fp(spec))
    query = Query("t", "tracin", torch.ones(48), _fp(spec).digest())
    with pytest.raises(GradientMismatchError, match="raw gradient rows"):
        score_store(store, [query], self_influence=[prepare(curvature, EstimatorOptions())])
    raw, _, _ = _store(tmp_path / "raw", ProjectionSpec(dim=0), _grads(30, 4))
    with pytest.raises(UnsupportedMethodError, match="self-influence from a prepared 'datainf'"):
        score_store(raw, [], self_influence=[prepare(curvature, EstimatorOptions(method="datainf"))])
    hyperinf = prepare(curvature, EstimatorOptions())
    with pytest.raises(DataError, match="duplicate"):
        score_store(raw, [], self_influence=[hyperinf, hyperinf])
    with pytest.raises(DataError, match="reserved"):
        score_store(raw, [Query("self", "tracin", torch.ones(256), _fp(ProjectionSpec(dim=0)).digest())])
    with pytest.raises(DataError, match="nothing to score"):
        score_store(raw, [])
    assert not store.exists("scores") and not raw.exists("scores")
