"""Streaming scorer vs an in-memory matmul (rows read straight from Lance's pages and through Lance's scanner);
ranks, percentiles, atomic per-query commits; fingerprint refusal; stored rows read back as gradients (raw and
sketched) feeding DataInf; self-influence from a stored (prepared) inverse as target set "self" in the same scan,
and curation SQL over it."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from hyperinf_ops import scorer
from hyperinf_ops.core.curvature import curvature_partials
from hyperinf_ops.core.estimators import (
    EstimatorOptions,
    mean_target_gradient,
    precondition,
    self_influence,
)
from hyperinf_ops.core.sketch import Sketch
from hyperinf_ops.errors import (
    DataError,
    FingerprintMismatchError,
    GradientMismatchError,
    NonFiniteGradientError,
    UnsupportedMethodError,
)
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.preconditioners import prepare
from hyperinf_ops.query import connect, run_query
from hyperinf_ops.scorer import SELF_TARGET, raw_gradient_batches, score_store
from hyperinf_ops.settings import CompressionSpec
from hyperinf_ops.store import GradientBatch, LanceStore, Query, vectors

SHAPES = {"l0.lora_A": (4, 24), "l0.lora_B": (4, 16), "l1.lora_A": (4, 24)}


def _fp(spec: CompressionSpec, adapter: str = "a") -> Fingerprint:
    return Fingerprint.create(
        model_id="tiny",
        model_hash="h",
        adapter_hash=adapter,
        task="classification",
        lora_modules=["l"],
        shapes=SHAPES,
        compression=spec,
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


def _store(tmp_path, spec: CompressionSpec, grads, shards: int = 3):
    """Rows (raw or sketched by `spec`) and curvature of `grads` in `shards` shards: (store, sketch, ids)."""
    store = LanceStore(str(tmp_path))
    sketch = Sketch(SHAPES, spec)
    n = next(iter(grads.values())).shape[0]
    ids = [f"id{i:04d}" for i in range(n)]
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
        sl = slice(bounds[s], bounds[s + 1])
        part = sketch.apply({k: v[sl] for k, v in grads.items()})
        store.write_gradients(f"s{s}", GradientBatch(ids[sl], sketch.flatten(part), sketch.sq_norms(part)),
                              _fp(spec))
        store.write_curvature(f"s{s}", curvature_partials(part), _fp(spec), examples_digest=f"digest-{s}")
    return store, sketch, ids


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


# Sketched to k = 8: rows of 96 fp16 values, small enough that Lance packs them into compressed mini-blocks, read
# through its scanner. Raw rows of 256 values in fp16 or fp32 (>= 256 bytes a row): plain pages, read directly.
@pytest.mark.parametrize("sketch_dim, dtype, direct", [(8, "float16", False), (0, "float16", True),
                                                       (0, "float32", True), (0, "int8", True), (0, "int4", False)])
def test_streaming_scores_equal_in_memory_matmul_and_ranks(tmp_path, sketch_dim, dtype, direct):
    spec = CompressionSpec(sketch_dim=sketch_dim, dtype=dtype)
    store, sketch, ids = _store(tmp_path, spec, _grads(101, 0))
    dim = sketch.width
    assert _direct(store) == [direct] * 3
    gen = torch.Generator().manual_seed(5)
    queries = [
        Query("t1", m, torch.randn(dim, generator=gen), _fp(spec).digest()) for m in ("hyperinf", "tracin")
    ]
    summary = score_store(store, queries, batch_rows=7, run_id="run-1")  # 15 batches over 3 fragments
    assert summary.rows == 101 and summary.gradients_version == store.versions()["gradients"]
    assert summary.device == ("cuda" if torch.cuda.is_available() else "cpu")

    table = store.open("gradients").to_table()
    fmt = _fp(spec).row_format  # integer codes: scored as codes on CPU (code_product.py), compared decoded
    scales = torch.from_numpy(np.stack(table["block_scales"].to_numpy(zero_copy_only=False))) if fmt.integer else None
    x = fmt.decode(torch.from_numpy(np.stack(table["grad"].to_numpy(zero_copy_only=False))),
                   torch.from_numpy(table["grad_scale"].to_numpy()), scales).double().numpy()
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
    spec = CompressionSpec()
    grads = {k: torch.ones(4, *s) for k, s in SHAPES.items()}
    store, sketch, ids = _store(tmp_path, spec, grads, shards=2)
    q = Query("t", "tracin", torch.ones(sketch.width), _fp(spec).digest())
    score_store(store, [q])
    assert _scores(store, "tracin", ids)["rank"].tolist() == [1, 2, 3, 4]


def _reference(store, queries, ids) -> dict[str, np.ndarray]:
    return {q.method: _scores(store, q.method, ids)["score"].to_numpy() for q in queries}


def test_direct_page_reads_equal_lance_scanner_reads(tmp_path, monkeypatch):
    """The same scores, bit for bit, whether the rows come straight from the pages or through Lance's scanner;
    a fragment with a deletion vector, or pages that do not read back as Lance decodes them, use the scanner."""
    spec = CompressionSpec(dtype="float16")
    store, _, ids = _store(tmp_path, spec, _grads(120, 1))
    gen = torch.Generator().manual_seed(6)
    queries = [Query("t", m, torch.randn(256, generator=gen), _fp(spec).digest()) for m in ("hyperinf", "tracin")]
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
    spec = CompressionSpec()
    store, _, _ = _store(tmp_path, spec, _grads(20, 2), shards=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        score_store(store, [Query("t", "tracin", torch.ones(256), _fp(spec).digest())], device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_query_of_another_fingerprint_is_refused_nothing_written(tmp_path):
    spec, other = CompressionSpec(sketch_dim=8), CompressionSpec(sketch_dim=8, seed=1)
    store, sketch, _ = _store(tmp_path, spec, _grads(10, 0), shards=1)
    width = sketch.width
    with pytest.raises(FingerprintMismatchError, match="built for fingerprint"):  # a digest never seen
        score_store(store, [Query("t", "tracin", torch.ones(width), _fp(other).digest())])
    # Gradients recomputed under a new sketch seed: queries of the old rows name the changed field.
    stale = Query("t", "tracin", torch.ones(width), _fp(spec).digest())
    store.write_gradients(
        "s0", GradientBatch(["x"], torch.ones(1, width), torch.ones(1, 3)), _fp(other), overwrite=True
    )
    with pytest.raises(FingerprintMismatchError, match="sketch_seed: expected 0, found 1"):
        score_store(store, [stale])
    assert not store.exists("scores")
    with pytest.raises(NonFiniteGradientError):
        score_store(store, [Query("t", "tracin", torch.full((width,), float("nan")), _fp(other).digest())])
    assert not store.exists("scores")


@pytest.mark.parametrize("sketch_dim", [0, 8])
def test_stored_rows_read_back_as_the_gradients_and_feed_datainf(tmp_path, sketch_dim):
    """Rows read back as the (raw or sketched) per-matrix gradients; DataInf's preconditioner streamed over them
    equals DataInf in memory on the same gradients."""
    train, target = _grads(40, 3), _grads(5, 4)
    spec = CompressionSpec(sketch_dim=sketch_dim)
    store, sketch, ids = _store(tmp_path, spec, train)
    rows = sketch.apply(train)
    batches = list(raw_gradient_batches(store, sketch.row_shapes, batch_rows=16))
    got_ids = [i for batch_ids, _ in batches for i in batch_ids]
    order = [ids.index(i) for i in got_ids]
    for name in SHAPES:  # float32 storage of the gradients (sketched: of g P)
        torch.testing.assert_close(torch.cat([g[name] for _, g in batches]), rows[name][order].float())
    v = sketch.apply_one(mean_target_gradient(target))
    curvature = store.read_curvature(_fp(spec))
    prepared = prepare(curvature, EstimatorOptions(method="datainf"))
    streamed = prepared.apply_one(
        v, train_batches=(g for _, g in raw_gradient_batches(store, sketch.row_shapes, batch_rows=7)))
    in_memory = precondition(v, curvature, EstimatorOptions(method="datainf"), train_grads=rows).vectors
    for name in SHAPES:
        torch.testing.assert_close(streamed[name], in_memory[name], rtol=1e-6, atol=0)
    if sketch_dim:  # the raw matrices' layout does not read sketched rows
        with pytest.raises(GradientMismatchError, match=r"rows of 256 floats expected .* the stored rows have 96"):
            next(raw_gradient_batches(store, SHAPES))


@pytest.mark.parametrize("self_chunk_rows", [None, 5])
def test_self_influence_scores_in_the_same_scan(tmp_path, monkeypatch, self_chunk_rows):
    """Self-influence of every raw row under each stored inverse is written as target set "self" by the same
    score_store call as the queries: score = -self-influence, ranked like every other score. The same with
    the batches split into chunks of 5 rows (uneven: 16-row batches) for the self-influence math."""
    if self_chunk_rows:
        monkeypatch.setattr(scorer, "_SELF_CHUNK_BYTES", self_chunk_rows * sum(r * d for r, d in SHAPES.values()) * 4)
    grads = _grads(90, 3)
    spec = CompressionSpec()
    store, sketch, ids = _store(tmp_path, spec, grads)
    curvature = store.read_curvature(_fp(spec))
    methods = ["hyperinf", "exact", "tracin"]
    prepared = [prepare(curvature, EstimatorOptions(method=m)) for m in methods]
    query = Query("t1", "tracin", torch.randn(sketch.width, generator=torch.Generator().manual_seed(8)),
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
    spec = CompressionSpec()
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


def test_self_influence_of_sketched_rows_and_its_refusals(tmp_path):
    """Sketched rows: self-influence under the inverse of their own (sketched) curvature, in sketch space; an
    inverse of other matrices, a method without a stored inverse, a duplicate or the reserved name: refused,
    nothing written."""
    grads = _grads(30, 4)
    spec = CompressionSpec(sketch_dim=8)
    store, sketch, ids = _store(tmp_path, spec, grads)
    sketched = prepare(store.read_curvature(_fp(spec)), EstimatorOptions())
    raw, _, _ = _store(tmp_path / "raw", CompressionSpec(), grads)
    curvature = raw.read_curvature(_fp(CompressionSpec()))
    with pytest.raises(GradientMismatchError, match="rows of 256 floats expected"):
        score_store(store, [], self_influence=[prepare(curvature, EstimatorOptions())])
    with pytest.raises(UnsupportedMethodError, match="self-influence from a prepared 'datainf'"):
        score_store(raw, [], self_influence=[prepare(curvature, EstimatorOptions(method="datainf"))])
    hyperinf = prepare(curvature, EstimatorOptions())
    with pytest.raises(DataError, match="duplicate"):
        score_store(raw, [], self_influence=[hyperinf, hyperinf])
    with pytest.raises(DataError, match="reserved"):
        score_store(raw, [Query("self", "tracin", torch.ones(256), _fp(CompressionSpec()).digest())])
    with pytest.raises(DataError, match="nothing to score"):
        score_store(raw, [])
    assert not store.exists("scores") and not raw.exists("scores")
    score_store(store, [], self_influence=[sketched])
    want = -self_influence(sketch.apply(grads), method="hyperinf", damping_ratio=0.1).numpy()
    np.testing.assert_allclose(_scores(store, "hyperinf", ids, target_set="self")["score"], want, rtol=1e-5)
