"""Row storage formats (float32 / float16 / int8 / int4 codes) and the whitening of rows: round trips within the
stated rounding bounds, int4 packing, lossless whitening, queries mapped to row space, the store pipeline on
whitened int4 rows equal to a dense computation on the decoded blocks, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperinf_ops import scorer
from hyperinf_ops.core.code_product import IntegerCodeProduct
from hyperinf_ops.core.curvature import curvature_partials
from hyperinf_ops.core.estimators import EstimatorOptions, mean_target_gradient
from hyperinf_ops.core.row_format import FACTOR_GROUP, INT_LEVELS, ROW_OVERHEAD, RowFormat
from hyperinf_ops.core.sketch import Sketch, row_format, row_layout, row_shapes, sketch_width, state_bytes
from hyperinf_ops.core.whitening import Whitening
from hyperinf_ops.errors import ConfigError, DataError, GradientMismatchError, NonFiniteGradientError
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.preconditioners import prepare
from hyperinf_ops.scorer import raw_gradient_batches, score_store
from hyperinf_ops.settings import DEFAULT_COMPRESSION, ROW_BUDGET, CompressionSpec
from hyperinf_ops.stages.queries import query_vector
from hyperinf_ops.store import GradientBatch, LanceStore, Query

BLOCKS = (96, 64, 33)  # an odd last block: the int4 row ends in a padding nibble


def _rows(n: int = 50, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sum(BLOCKS), generator=gen)
    x[:, 96:160] *= 1e-3  # blocks of different magnitude: why the integer scales are per block
    x[3] = 0  # an all-zero row
    return x


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int4"])
def test_rows_round_trip_within_half_a_step(dtype):
    fmt = RowFormat(dtype, BLOCKS)
    x = _rows()
    encoded = fmt.encode(x.numpy())
    assert encoded.values.shape == (50, fmt.stored_width) and encoded.values.dtype == fmt.value_type.to_pandas_dtype()
    assert (encoded.block_scales is not None) == fmt.integer
    scales = torch.from_numpy(encoded.block_scales) if fmt.integer else None
    back = fmt.decode(torch.from_numpy(encoded.values), torch.from_numpy(encoded.grad_scale), scales)
    assert back.shape == x.shape and back.dtype == torch.float32
    assert torch.equal(back[3], torch.zeros(sum(BLOCKS)))
    if dtype == "float32":
        assert torch.equal(back, x)
    elif dtype == "float16":  # 11 significant bits of the row's largest value
        assert (back - x).abs().max(1).values.le(x.abs().max(1).values * 2 ** -11).all()
    else:  # round to nearest: at most half a step of each block's max |x| / levels
        start = 0
        for j, size in enumerate(BLOCKS):
            block = x[:, start: start + size]
            step = block.abs().amax(1) / INT_LEVELS[dtype]
            assert torch.allclose(scales[:, j][step > 0], step[step > 0])
            err = (back[:, start: start + size] - block).abs()
            assert (err <= step[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
            start += size
    # decoding into a caller's buffer gives the same rows
    buf = torch.full((60, fmt.width), float("nan"))
    again = fmt.decode(torch.from_numpy(encoded.values[:7]), torch.from_numpy(encoded.grad_scale[:7]),
                       scales[:7] if scales is not None else None, out=buf)
    assert again.data_ptr() == buf.data_ptr() and torch.equal(again, back[:7])


def test_int4_packing_layout_and_width():
    fmt = RowFormat("int4", (3,))
    encoded = fmt.encode(np.array([[7.0, -7.0, 1.0]], np.float32))  # step 1: codes 7, -7, 1
    assert fmt.stored_width == 2 and encoded.values.tolist() == [[(7 + 8) | ((-7 + 8) << 4), (1 + 8) | (8 << 4)]]
    assert RowFormat("int4", BLOCKS).stored_width == (sum(BLOCKS) + 1) // 2
    assert RowFormat("int8", BLOCKS).stored_width == sum(BLOCKS)


def test_rows_refuse_other_widths_and_non_finite_values():
    fmt = RowFormat("int4", BLOCKS)
    with pytest.raises(DataError, match="193 floats expected"):
        fmt.encode(np.zeros((2, 10), np.float32))
    bad = _rows(4).numpy()
    bad[1, 5] = np.inf
    with pytest.raises(NonFiniteGradientError):
        fmt.encode(bad)
    with pytest.raises(ValueError, match="row dtype"):
        RowFormat("int2", BLOCKS)


def _rank_q(x: torch.Tensor, q: int) -> torch.Tensor:
    """The best rank-q approximation of each (r, k) matrix of x (n, r, k), float64 SVD."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u[..., :q] * s[..., None, :q]) @ vh[..., :q, :]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int4"])
def test_factor_rows_decode_to_each_blocks_best_rank_q_approximation(dtype):
    """Factor rows (rank q = 2, r = 8): values q (r + k) a block, U_q then B's rows in FACTOR_GROUP pieces; float32
    rows decode to the SVD truncation itself (a rank-2 block: to the block), the codes to within their rounding of
    it; an all-zero row stays zero; the code product leaves factor rows to the decoder."""
    r, q, widths = 8, 2, (200, 40)
    fmt = RowFormat(dtype, tuple(r * k for k in widths), q, r)
    assert FACTOR_GROUP == 96 and fmt.groups == (16, 96, 96, 8, 96, 96, 8, 16, 40, 40)
    assert fmt.values == q * (r + 200) + q * (r + 40) and fmt.width == r * 240
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randn(30, r, 3, generator=gen) @ torch.randn(30, 3, k, generator=gen) for k in widths]
    blocks[0][:5] = torch.randn(5, r, 2, generator=gen) @ torch.randn(5, 2, 200, generator=gen)  # rank 2 exactly
    blocks[1] *= 1e-3  # blocks of different magnitude
    for b in blocks:
        b[7] = 0  # an all-zero row
    x = torch.cat([b.reshape(30, -1) for b in blocks], 1)
    encoded = fmt.encode(x)
    assert encoded.values.shape == (30, fmt.stored_width) and (encoded.block_scales is None) != fmt.integer
    scales = torch.from_numpy(encoded.block_scales) if fmt.integer else None
    back = fmt.decode(torch.from_numpy(encoded.values), torch.from_numpy(encoded.grad_scale), scales)
    assert back.shape == x.shape and torch.equal(back[7], torch.zeros(fmt.width))
    start, tolerance = 0, {"float32": 1e-6, "float16": 2e-3, "int8": 0.03, "int4": 0.3}[dtype]
    for block, k in zip(blocks, widths, strict=True):
        got = back[:, start: start + r * k].reshape(30, r, k).double()
        best = _rank_q(block, q)
        err = (got - best).flatten(1).norm(dim=1) / best.flatten(1).norm(dim=1).clamp_min(1e-30)
        assert err.max() <= tolerance, (dtype, k, float(err.max()))
        # the rank-3 blocks lose their third direction: further from the block than from its truncation
        assert ((got - block).flatten(1).norm(dim=1)[8:] > (got - best).flatten(1).norm(dim=1)[8:]).all()
        start += r * k
    if dtype == "float32":
        torch.testing.assert_close(back[:5, : r * 200].reshape(5, r, 200), blocks[0][:5], rtol=0, atol=1e-4)
    assert not IntegerCodeProduct.supports(fmt)
    with pytest.raises(ValueError, match="lora_rank"):
        RowFormat(dtype, (30,), 2, 8)  # 30 floats are no (8, k) block
    with pytest.raises(ValueError, match="lora_rank"):
        RowFormat(dtype, (64,), 8, 8)  # a factor rank of r stores more than the block


# ------------------------------------------------------------------------------------------------ whitening

SHAPES = {"a.lora_A": (4, 24), "b.lora_B": (4, 16)}


def _grads(n: int, seed: int, decay: float = 0.7) -> dict[str, torch.Tensor]:
    """Gradients with a steep GFIM spectrum (scale decay**j along direction j of a random basis)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (r, d) in SHAPES.items():
        basis, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(len(name) + d)))
        scale = decay ** torch.arange(d, dtype=torch.float32)
        out[name] = (torch.randn(n, r, d, generator=gen) * scale) @ basis.T
    return out


def _whitening(grads, power=0.25) -> Whitening:
    return Whitening.from_curvature(curvature_partials(grads), power)


def test_whitening_is_lossless_and_queries_map_to_row_space(tmp_path):
    grads = _grads(200, 0)
    w = _whitening(grads)
    assert w.widths == {"a.lora_A": 24, "b.lora_B": 16}
    h = w.apply(grads)
    back = w.undo(h)
    for name in SHAPES:
        torch.testing.assert_close(back[name], grads[name], rtol=0, atol=1e-5 * grads[name].abs().max())
    # <to_rows(pv), h> = <pv, b>
    pv = {name: torch.randn(r, d, dtype=torch.float64) for name, (r, d) in SHAPES.items()}
    q = w.to_rows(pv)
    for name in SHAPES:
        expected = torch.einsum("nrd,rd->n", grads[name].double(), pv[name])
        got = torch.einsum("nrd,rd->n", h[name].double(), q[name])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max())
    # power 1/2 whitens the pilot: its GFIM in row space is diag(s / (s + lambda)), all below 1
    full = _whitening(grads, power=0.5)
    for part in curvature_partials(full.apply(grads)).values():
        g = part.gfim()
        off = g - torch.diag(torch.diagonal(g))
        assert off.abs().max() < 1e-4 and torch.diagonal(g).max() < 1 and torch.diagonal(g).min() > 0
    # saved and loaded bit for bit (same digest); another pilot, another digest
    w.save(tmp_path / "w.safetensors")
    loaded = Whitening.load(tmp_path / "w.safetensors")
    assert loaded.digest() == w.digest() and loaded.power == 0.25
    assert _whitening(_grads(200, 1)).digest() != w.digest()
    with pytest.raises(GradientMismatchError, match="widths"):
        w.apply({"a.lora_A": grads["a.lora_A"], "b.lora_B": grads["b.lora_B"][..., :8]})


def _spearman(a, b) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def _hyperinf_scores(rows, v, curvature) -> np.ndarray:
    prepared = prepare(curvature, EstimatorOptions(method="exact"))
    pv = prepared.apply_one(v)
    return sum(torch.einsum("nrd,rd->n", rows[k].double(), pv[k]) for k in rows).numpy()


def _int4(grads, w: Whitening | None) -> dict[str, torch.Tensor]:
    """What a reader gets back from int4 rows of `grads` (whitened by `w` first, undone after)."""
    stored = w.apply(grads) if w is not None else grads
    sketch = Sketch(SHAPES)
    fmt = RowFormat("int4", [r * d for r, d in sketch.row_shapes.values()])
    enc = fmt.encode(sketch.flatten(stored))
    flat = fmt.decode(torch.from_numpy(enc.values), torch.from_numpy(enc.grad_scale),
                      torch.from_numpy(enc.block_scales))
    blocks = {name: flat[:, sl].reshape(-1, *sketch.row_shapes[name]) for name, sl in sketch.slices.items()}
    return w.undo(blocks) if w is not None else blocks


def test_whitened_int4_keeps_the_preconditioned_ranking_that_plain_int4_loses():
    """HyperINF amplifies the GFIM's small-eigenvalue directions, which plain int4 codes round away; whitened
    first, every direction keeps its relative precision (docs/compression.md measures it on real gradients)."""
    train, target = _grads(400, 2, decay=0.8), _grads(40, 3, decay=0.8)
    curvature = curvature_partials(train)  # the pipeline sums the curvature from the exact blocks
    v = mean_target_gradient(target)
    exact = _hyperinf_scores(train, v, curvature)
    pilot = {k: t[:100] for k, t in train.items()}
    whitened = _spearman(_hyperinf_scores(_int4(train, _whitening(pilot)), v, curvature), exact)
    plain = _spearman(_hyperinf_scores(_int4(train, None), v, curvature), exact)
    assert whitened > 0.97 and plain < whitened - 0.03, (whitened, plain)  # measured 0.983 vs 0.938


# ------------------------------------------------------------------------------------------ the store path

def _fp(spec: CompressionSpec, whitening: str) -> Fingerprint:
    return Fingerprint.create(model_id="tiny", model_hash="h", adapter_hash="a", task="classification",
                              lora_modules=["l"], shapes=SHAPES, compression=spec, whitening=whitening)


def test_store_scores_and_self_influence_of_whitened_int4_rows_equal_a_dense_computation(tmp_path, monkeypatch):
    """Rows whitened and stored as int4 codes: scores through the scorer equal the preconditioned query against
    the decoded, unwhitened blocks (float32 rounding only); self-influence the same (decoded 5 rows at a time:
    each chunk with its own block scales); DataInf streams the same blocks; the wrong whitening is refused."""
    monkeypatch.setattr(scorer, "_SELF_CHUNK_BYTES", 5 * sum(r * d for r, d in SHAPES.values()) * 4)
    train, target = _grads(120, 4), _grads(10, 5)
    spec = CompressionSpec(whiten=0.25, dtype="int4")
    w = _whitening({k: t[:40] for k, t in train.items()})
    fp = _fp(spec, w.digest())
    sketch = Sketch(SHAPES, spec)
    store = LanceStore(str(tmp_path))
    ids = [f"id{i:03d}" for i in range(120)]
    for s, sl in enumerate((slice(0, 70), slice(70, 120))):
        blocks = {k: t[sl] for k, t in train.items()}
        store.write_gradients(f"s{s}", GradientBatch(ids[sl], sketch.flatten(w.apply(blocks)),
                                                     sketch.sq_norms(blocks)), fp)
        store.write_curvature(f"s{s}", curvature_partials(blocks), fp, examples_digest=f"d{s}")
    assert store.open("gradients").schema.field("grad").type.list_size == sum(r * d for r, d in SHAPES.values()) // 2
    decoded = {}
    for batch_ids, blocks in raw_gradient_batches(store, sketch.row_shapes, whitening=w, batch_rows=32):
        decoded.update({i: {k: b[j] for k, b in blocks.items()} for j, i in enumerate(batch_ids)})
    rows = {k: torch.stack([decoded[i][k] for i in ids]) for k in SHAPES}
    for k in SHAPES:  # the blocks come back up to int4 rounding of the whitened values
        assert (rows[k] - train[k]).abs().max() < 0.2 * train[k].abs().max()
    curvature = store.read_curvature(fp)
    v = mean_target_gradient(target)
    queries = _score_against_dense(store, curvature, v, w, rows, fp, ids)
    with pytest.raises(GradientMismatchError, match="stored under whitening"):
        score_store(store, queries, whitening=None)
    with pytest.raises(GradientMismatchError, match="stored under whitening"):
        next(raw_gradient_batches(store, sketch.row_shapes, whitening=_whitening(train)))


# ------------------------------------------------------------------------------- the width rule (issue 20)


def test_width_rule_rows_sketched_and_whitened_in_sketch_space_equal_a_dense_computation_there(tmp_path):
    """A row budget these matrices do not fit (160 floats: 148 bytes as int4 rows) makes the width rule sketch
    them to k = 8 (100 bytes); the whitening is the pilot's in the sketch space. The curvature the pass stores is
    exactly P^T (sum g^T g) P (dense float64, per shard and merged), the rows decode to the sketched blocks (int4
    rounding of the whitened values), and scores / self-influence through the store equal the dense computation
    on those decoded blocks with the query sketched by the same P."""
    spec = CompressionSpec(whiten=0.25, dtype="int4", row_budget=130)
    assert sketch_width(SHAPES, spec) == 8
    sketch = Sketch(SHAPES, spec)
    assert sketch.row_shapes == {"a.lora_A": (4, 8), "b.lora_B": (4, 8)}
    assert RowFormat("int4", (32, 32)).row_bytes == 100 <= spec.row_budget < RowFormat("int4", (96, 64)).row_bytes
    train, target = _grads(120, 4), _grads(10, 5)
    blocks = sketch.apply(train)
    w = _whitening({k: t[:40] for k, t in blocks.items()})  # the pilot: sketched blocks of 40 examples
    assert w.widths == {"a.lora_A": 8, "b.lora_B": 8}
    fp = _fp(spec, w.digest())
    assert fp.sketch_dim == 8 and fp.row_blocks == (32, 32)
    store, ids, curvature, rows = _two_shards(tmp_path, sketch, w, blocks, fp)
    for name, g in train.items():
        p = sketch.matrix(name).double()
        rows64 = g.double().reshape(-1, g.shape[-1])
        torch.testing.assert_close(curvature[name].gfim_sum, p.T @ (rows64.T @ rows64) @ p, rtol=1e-5, atol=1e-8)
        assert curvature[name].count == 120 and curvature[name].numel == 32
    for k in SHAPES:
        assert (rows[k] - blocks[k]).abs().max() < 0.2 * blocks[k].abs().max()
    v = sketch.apply_one(mean_target_gradient(target))
    _score_against_dense(store, curvature, v, w, rows, fp, ids)


def _two_shards(tmp_path, sketch: Sketch, w: Whitening, blocks: dict[str, torch.Tensor], fp: Fingerprint):
    """Blocks (120, r, k) written whitened as two shards (70 + 50 rows) with their curvature sums, as the pass does;
    returns the store, the ids, the stored curvature and the rows read back (name -> (120, r, k), unwhitened)."""
    store = LanceStore(str(tmp_path))
    ids = [f"id{i:03d}" for i in range(120)]
    for s, sl in enumerate((slice(0, 70), slice(70, 120))):
        part = {k: t[sl] for k, t in blocks.items()}
        store.write_gradients(f"s{s}", GradientBatch(ids[sl], sketch.flatten(w.apply(part)), sketch.sq_norms(part)),
                              fp)
        store.write_curvature(f"s{s}", curvature_partials(part), fp, examples_digest=f"d{s}")
    decoded = {}
    for batch_ids, got in raw_gradient_batches(store, sketch.row_shapes, whitening=w, batch_rows=32):
        decoded.update({i: {k: b[j] for k, b in got.items()} for j, i in enumerate(batch_ids)})
    rows = {k: torch.stack([decoded[i][k] for i in ids]) for k in blocks}
    return store, ids, store.read_curvature(fp), rows


def _lora(layers: int, modules: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {f"l.{i:02d}.{m}.lora_{s}": (8, d_in if s == "A" else d_out)
            for i in range(layers) for m, (d_in, d_out) in modules.items() for s in "AB"}


def test_width_rule_keeps_minilm_and_fits_wide_models_in_64_kb():
    """The pipeline's default: MiniLM keeps dense unsketched whitened int4 rows (36,960 value + scale bytes);
    SmolLM2-135M (q/v r=8) gets unsketched rank-2 factor rows within 65,536 bytes a row, Llama-3-8B rank-2 factor
    rows at the widest multiple of 8 that fits both the row budget and the 1 GB state budget (dense rows, row_rank 0:
    sketched to k = 128 and 120); an explicit sketch_dim, row_budget 0 or unwhitened rows (`{whiten: 0, dtype:
    float32}`: raw float32, the reference) are never changed; a budget nothing fits is refused."""
    minilm = _lora(6, {"query": (384, 384), "value": (384, 384)})
    smol = _lora(30, {"q_proj": (576, 576), "v_proj": (576, 192)})
    llama = _lora(32, {"q_proj": (4096, 4096), "v_proj": (4096, 1024)})
    assert sum(r * d for r, d in llama.values()) == 3_407_872 and len(llama) == 128

    def row_bytes(shapes, spec):
        return row_format(shapes, spec).row_bytes

    d = DEFAULT_COMPRESSION
    assert d.row_budget == ROW_BUDGET == 65536 and d.row_rank == 2 and d.state_budget == 10**9
    assert row_layout(minilm, d) == (0, 0) and row_shapes(minilm, d) == dict(sorted(minilm.items()))
    assert row_bytes(minilm, d) == 36_960 + 24 * 4 + ROW_OVERHEAD  # values + steps, the norms, the fixed bytes
    # SmolLM2: 90 blocks (8, 576) and 30 (8, 192) as q (r + d) int4 values, a step per U and per 96 values of B
    assert row_layout(smol, d) == (0, 2) and row_shapes(smol, d) == dict(sorted(smol.items()))
    values = 90 * 2 * (8 + 576) + 30 * 2 * (8 + 192)
    steps = 90 * (1 + 2 * 6) + 30 * (1 + 2 * 2)
    assert row_bytes(smol, d) == values // 2 + 4 * steps + 4 * 120 + ROW_OVERHEAD == 64_372
    k, rank = row_layout(llama, d)
    assert (k, rank) == (424, 2) and row_bytes(llama, d) <= 65_536
    assert state_bytes(llama, k) <= 10**9 < state_bytes(llama, k + 8)
    assert row_bytes(llama, d.model_copy(update={"state_budget": 0})) <= 65_536  # wider without the state budget
    assert row_layout(llama, d.model_copy(update={"state_budget": 0}))[0] > k
    dense = d.model_copy(update={"row_rank": 0})
    assert sketch_width(smol, dense) == 128 and row_bytes(smol, dense) == 62_452
    assert sketch_width(llama, dense) == 120 and row_bytes(llama, dense) == 62_516 <= 65_536 < row_bytes(
        llama, d.model_copy(update={"row_budget": 0}))
    assert row_bytes(llama, d.model_copy(update={"sketch_dim": 128})) > 65_536  # explicit: never changed
    fp = Fingerprint.create(model_id="m", model_hash="h", adapter_hash="a", task="causal_lm", lora_modules=["q"],
                            shapes=llama, compression=d, whitening="w")
    assert (fp.sketch_dim, fp.row_rank) == (424, 2) and fp.row_format == row_format(llama, d)
    assert Fingerprint.from_json(fp.to_json()) == fp
    exact = CompressionSpec(**{**d.model_dump(), "whiten": 0, "dtype": "float32"})  # how the YAML merges it
    assert row_layout(llama, exact) == (0, 0)
    assert row_bytes(llama, exact) == 4 * 3_407_872 + 4 * 128 + ROW_OVERHEAD
    with pytest.raises(ConfigError, match="row_budget"):
        sketch_width(llama, d.model_copy(update={"row_budget": 4000}))


def test_factor_rows_through_the_store_score_like_a_dense_computation_on_their_blocks(tmp_path):
    """A budget dense rows do not fit (148 bytes as int4) but rank-2 factor rows do (132): the width rule keeps the
    blocks unsketched as factor rows (a dense rule would sketch them to k = 16). The fingerprint names the rank (a
    dense fingerprint's JSON does not: digests of rows stored before factor rows existed are unchanged); the rows
    decode to within int4 rounding of each whitened block's best rank-2 approximation; the curvature is the exact
    sums of the unfactored blocks; scores and self-influence through the store equal the dense computation on the
    decoded blocks."""
    spec = CompressionSpec(whiten=0.25, dtype="int4", row_budget=140, row_rank=2)
    assert RowFormat("int4", (96, 64)).row_bytes == 148 and row_format(SHAPES, spec).row_bytes == 132
    assert row_layout(SHAPES, spec) == (0, 2) and row_layout(SHAPES, spec.model_copy(update={"row_rank": 0})) == (16, 0)
    train, target = _grads(120, 4), _grads(10, 5)
    w = _whitening({k: t[:40] for k, t in train.items()})
    fp = _fp(spec, w.digest())
    assert fp.row_rank == 2 and '"row_rank": 2' in fp.to_json()
    assert "row_rank" not in _fp(spec.model_copy(update={"row_rank": 0}), w.digest()).to_json()
    store, ids, curvature, rows = _two_shards(tmp_path, Sketch(SHAPES, spec), w, train, fp)
    for name, g in train.items():
        rows64 = g.double().reshape(-1, g.shape[-1])
        torch.testing.assert_close(curvature[name].gfim_sum, rows64.T @ rows64, rtol=1e-6, atol=1e-8)
    best = w.undo({k: _rank_q(h, 2).float() for k, h in w.apply(train).items()})
    for k in SHAPES:
        err = (rows[k] - best[k]).flatten(1).norm(dim=1) / best[k].flatten(1).norm(dim=1)
        assert err.max() < 0.3 and (rows[k] - train[k]).abs().max() > 0  # rank 2 of 4: not the blocks themselves
    v = mean_target_gradient(target)
    _score_against_dense(store, curvature, v, w, rows, fp, ids)


def _score_against_dense(store, curvature, v, w, rows, fp, ids) -> list:
    """Score the store with every estimator's query (and hyperinf's self-influence) and check the stored scores
    equal a dense computation over the decoded blocks `rows` (name -> (n, r, k)); returns the queries."""
    queries, expected = [], {}
    for method in ("hyperinf", "tracin", "datainf"):
        prepared = prepare(curvature, EstimatorOptions(method=method))
        vector, _ = query_vector(store, v, prepared, w)
        queries.append(Query("t", method, vector, fp.digest()))
        pv = prepared.apply_one(v, train_batches=[rows] if method == "datainf" else None)
        expected[method] = sum(torch.einsum("nrd,rd->n", rows[k].double(), pv[k]) for k in rows).numpy()
    hyperinf = prepare(curvature, EstimatorOptions(method="hyperinf"))
    score_store(store, queries, self_influence=[hyperinf], whitening=w, batch_rows=16)
    table = store.open("scores").to_table().to_pandas().set_index("sample_id")
    for method, want in expected.items():
        got = table[(table["target_set"] == "t") & (table["method"] == method)].loc[ids, "score"].to_numpy()
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), method
    got = table[table["target_set"] == "self"].loc[ids, "score"].to_numpy()
    np.testing.assert_allclose(got, -hyperinf.self_influence(rows).numpy(), rtol=1e-4)
    return queries
