"""LanceStore: exactly-once shard replace (repeat, concurrent processes, mid-write failure), fingerprint
guard, curvature / query round trips, fp16 scaling, time travel. Real Lance datasets under tmp_path."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from hyperinf_ops.core.curvature import curvature_partials
from hyperinf_ops.errors import DataError, FingerprintMismatchError, GradientMismatchError
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.settings import CompressionSpec
from hyperinf_ops.store import GradientBatch, LanceStore, Query

SHAPES = {"m.lora_A": (2, 6), "m.lora_B": (2, 5)}


def _fp(dim: int = 16, adapter: str = "a") -> Fingerprint:
    return Fingerprint.create(
        model_id="tiny",
        model_hash="h",
        adapter_hash=adapter,
        task="classification",
        lora_modules=["m"],
        shapes={"m.lora_A": (2, dim // 4), "m.lora_B": (2, dim // 4)},  # rows of `dim` floats
        compression=CompressionSpec(dtype="float16"),
    )


def _batch(ids: list[str], dim: int = 16, seed: int = 0, scale: float = 1.0) -> GradientBatch:
    gen = torch.Generator().manual_seed(seed)
    return GradientBatch(
        ids, torch.randn(len(ids), dim, generator=gen) * scale, torch.rand(len(ids), 2, generator=gen)
    )


def _rows(shard: str, n: int, tag: str = "") -> pa.Table:
    return pa.table(
        {
            "sample_id": [f"{shard}-{i}" for i in range(n)],
            "text": [f"text {shard} {i} {tag}" for i in range(n)],
            "label": [i % 2 for i in range(n)],
        }
    )


def _write_examples(args: tuple[str, str, int, str]) -> int:
    """Worker (spawned process): replace one shard of `examples`."""
    root, shard, n, tag = args
    return LanceStore(root).write_examples(shard, _rows(shard, n, tag))


def test_same_shard_five_times_leaves_one_copy_one_commit_each(tmp_path):
    store = LanceStore(str(tmp_path))
    store.write_examples("s0", _rows("s0", 7))
    store.write_examples("s1", _rows("s1", 3))
    v = store.versions()["examples"]
    for i in range(5):
        assert store.write_examples("s1", _rows("s1", 4, tag=str(i))) == v + i + 1  # one commit per replace
    table = store.open("examples").to_table()
    assert table.num_rows == 11 and len(set(table["sample_id"].to_pylist())) == 11
    s1 = table.filter(pc.equal(table["shard"], "s1"))
    assert set(s1["text"].to_pylist()) == {f"text s1 {i} 4" for i in range(4)}
    # Time travel: the version before the replaces still holds the first copy of s1.
    old = store.open("examples", v).to_table()
    assert sorted(old.filter(pc.equal(old["shard"], "s1"))["sample_id"].to_pylist()) == [
        "s1-0",
        "s1-1",
        "s1-2",
    ]


def test_concurrent_shard_writers_from_processes_land_exactly_once(tmp_path):
    root = str(tmp_path)
    # Two spawned worker processes (each re-imports torch + peft + lance, ~10 s of CPU on this machine). An
    # executor, not multiprocessing.Pool: a worker that dies fails the test (BrokenProcessPool) instead of
    # leaving Pool.map waiting forever.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        # 8 different shards at once, racing to create the table too.
        list(pool.map(_write_examples, [(root, f"s{i}", 50, "a") for i in range(8)], timeout=300))
        table = LanceStore(root).open("examples").to_table()
        assert table.num_rows == 400 and len(set(table["sample_id"].to_pylist())) == 400
        # 8 writers of the same 2 shards (existing s0 and brand-new s9): the last committer wins, whole.
        list(pool.map(_write_examples, [(root, f"s{9 * (i % 2)}", 20 + i, f"b{i}") for i in range(8)], timeout=300))
    table = LanceStore(root).open("examples").to_table()
    for shard in ("s0", "s9"):
        rows = table.filter(pc.equal(table["shard"], shard))
        tags = {t.split()[-1] for t in rows["text"].to_pylist()}
        assert len(tags) == 1, f"{shard} mixes writes {tags}"
        assert rows.num_rows == 20 + int(tags.pop()[1:])
    assert len(set(table["sample_id"].to_pylist())) == table.num_rows


def test_exception_mid_write_leaves_table_unchanged(tmp_path):
    store = LanceStore(str(tmp_path))
    store.write_gradients("s0", _batch(["a", "b"]), _fp())
    before_version, before = store.versions()["gradients"], store.open("gradients").to_table()

    class Boom(RuntimeError):
        pass

    def batches():
        yield _batch(["a", "c"], seed=1)
        raise Boom("gradient worker died")

    with pytest.raises(Boom, match="worker died"):
        store.write_gradients("s0", batches(), _fp())
    assert store.versions()["gradients"] == before_version
    assert store.open("gradients").to_table().equals(before)

    def record_batches():
        yield _rows("s0", 2).to_batches()[0]
        raise Boom("reader died")

    store.write_examples("s0", _rows("s0", 3))
    v = store.versions()["examples"]
    with pytest.raises(Boom):
        store.write_examples("s0", record_batches())
    assert store.versions()["examples"] == v and store.open("examples").count_rows() == 3


def test_fingerprint_mismatch_refused_nothing_written_overwrite_replaces(tmp_path):
    store = LanceStore(str(tmp_path))
    store.write_gradients("s0", _batch(["a", "b"]), _fp(adapter="a"))
    store.write_gradients("s1", _batch(["c"]), _fp(adapter="a"))
    v = store.versions()["gradients"]
    with pytest.raises(FingerprintMismatchError, match="adapter_hash: expected 'b', found 'a'"):
        store.write_gradients("s0", _batch(["a", "b"]), _fp(adapter="b"))
    assert store.versions()["gradients"] == v
    # overwrite=True: this shard is written and every stale row goes, in the same commit.
    store.write_gradients("s0", _batch(["a", "b"]), _fp(adapter="b"), overwrite=True)
    table = store.open("gradients").to_table()
    assert sorted(table["sample_id"].to_pylist()) == ["a", "b"]
    assert set(table["fingerprint"].to_pylist()) == {_fp(adapter="b").digest()}
    assert store.fingerprint("gradients") == _fp(adapter="b")
    with pytest.raises(FingerprintMismatchError, match="adapter_hash"):
        store.check_fingerprint("gradients", _fp(adapter="a"))


def test_bad_writes_are_refused(tmp_path):
    store = LanceStore(str(tmp_path))
    store.write_examples("s0", _rows("s0", 2))
    with pytest.raises(DataError, match="duplicate sample_id"):
        store.write_examples("s1", pa.concat_tables([_rows("s1", 2), _rows("s1", 1)]))
    with pytest.raises(DataError, match="missing \\['label'\\]"):
        store.write_examples("s1", _rows("s1", 2).drop_columns(["label"]))
    with pytest.raises(DataError, match="shard != 's1'"):
        store.write_examples("s1", _rows("s1", 2).append_column("shard", pa.array(["s1", "s2"])))
    with pytest.raises(DataError, match="the fingerprint says"):
        store.write_gradients("s0", _batch(["a"], dim=8), _fp(dim=16))
    assert store.open("examples").count_rows() == 2 and not store.exists("gradients")


def test_fp16_rows_scaled_so_tiny_gradients_survive(tmp_path):
    store = LanceStore(str(tmp_path))
    batch = _batch([f"x{i}" for i in range(4)], dim=64, scale=1e-7)
    store.write_gradients("s0", batch, _fp(dim=64))
    table = store.open("gradients").to_table()
    assert table.schema.field("grad").type == pa.list_(pa.float16(), 64)
    stored = np.stack(table["grad"].to_numpy(zero_copy_only=False)).astype(np.float32)
    restored = stored * table["grad_scale"].to_numpy()[:, None]
    np.testing.assert_allclose(restored, batch.grad.numpy(), rtol=1e-3, atol=1e-3 * 1e-7)
    np.testing.assert_allclose(
        np.stack(table["sq_norms"].to_numpy(zero_copy_only=False)), batch.sq_norms.numpy()
    )


def test_curvature_merges_over_shards_and_refuses_other_fingerprints(tmp_path):
    store = LanceStore(str(tmp_path))
    grads = {k: torch.randn(10, *s, dtype=torch.float64) for k, s in SHAPES.items()}
    for s, sl in enumerate((slice(0, 4), slice(4, 10))):
        store.write_curvature(
            f"s{s}", curvature_partials({k: v[sl] for k, v in grads.items()}, full=True), _fp(),
            examples_digest=f"digest-{s}",
        )
    merged, expected = store.read_curvature(_fp()), curvature_partials(grads, full=True)
    assert sorted(merged) == sorted(SHAPES)
    for name, part in expected.items():
        torch.testing.assert_close(merged[name].gfim_sum, part.gfim_sum)
        torch.testing.assert_close(merged[name].full_sum, part.full_sum)
        assert (merged[name].count, merged[name].numel) == (10, part.numel)
        assert merged[name].sq_sum == pytest.approx(part.sq_sum)
    with pytest.raises(FingerprintMismatchError, match=r"row_blocks: expected \(16, 16\), found \(8, 8\)"):
        store.read_curvature(_fp(dim=32))
    # A shard whose sums miss a matrix is refused by name, not merged into a partial curvature.
    first = sorted(SHAPES)[0]
    store.write_curvature("s2", curvature_partials({first: grads[first][:3]}, full=True), _fp(), examples_digest="digest-2")
    with pytest.raises(GradientMismatchError, match=rf"shard 's2' disagrees on matrices: missing \['{sorted(SHAPES)[1]}'\]"):
        store.read_curvature(_fp())


def test_queries_round_trip_and_fingerprint_check(tmp_path):
    store = LanceStore(str(tmp_path))
    store.write_gradients("s0", _batch(["a"]), _fp())
    diag = {"m.lora_A": {"damping": 0.1, "iterations": 7, "residual": float("nan")}}
    q = Query("sst2", "hyperinf", torch.arange(16.0), _fp().digest(), diag)
    store.write_queries([q, Query("sst2", "tracin", torch.ones(16), _fp().digest())])
    store.write_queries([Query("sst2", "hyperinf", torch.arange(16.0) * 2, _fp().digest(), diag)])
    got = store.read_queries(_fp(), target_set="sst2", method="hyperinf")
    assert len(got) == 1 and torch.equal(got[0].vector, torch.arange(16.0) * 2)
    assert (
        got[0].diagnostics["m.lora_A"]["iterations"] == 7
        and got[0].diagnostics["m.lora_A"]["residual"] is None
    )
    assert len(store.read_queries()) == 2
    with pytest.raises(FingerprintMismatchError, match="adapter_hash"):
        store.read_queries(_fp(adapter="zzz"))


def test_concurrent_threads_same_new_shard_keep_exactly_one_write(tmp_path):
    """Writers of a brand-new shard only append, so Lance sees no conflict; the store drops the losers."""
    from concurrent.futures import ThreadPoolExecutor

    root = str(tmp_path)
    with ThreadPoolExecutor(8) as pool:  # Lance commits release the GIL: real concurrency
        list(pool.map(_write_examples, [(root, "new", 10 + i, f"b{i}") for i in range(8)]))
        list(pool.map(_write_examples, [(root, f"x{i}", 5, "c") for i in range(8)]))
    table = LanceStore(root).open("examples").to_table()
    new = table.filter(pc.equal(table["shard"], "new"))
    tags = {t.split()[-1] for t in new["text"].to_pylist()}
    assert len(tags) == 1 and new.num_rows == 10 + int(tags.pop()[1:])
    assert table.num_rows == new.num_rows + 40 and len(set(table["sample_id"].to_pylist())) == table.num_rows


def test_concurrent_threads_gradient_shards_register_fingerprint_and_overwrite(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = LanceStore(str(tmp_path))
    store.write_gradients("old", _batch(["o1", "o2"]), _fp(adapter="old"))

    def write(i: int) -> int:
        ids = [f"s{i}-{j}" for j in range(5)]
        return LanceStore(str(tmp_path)).write_gradients(f"s{i}", _batch(ids, seed=i), _fp(), overwrite=True)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    table = store.open("gradients").to_table()
    assert table.num_rows == 40 and len(set(table["sample_id"].to_pylist())) == 40  # stale "old" rows gone
    assert store.fingerprint("gradients") == _fp()
    assert set(store.fingerprints("gradients")) == {_fp().digest(), _fp(adapter="old").digest()}


def test_replace_with_no_rows_deletes_the_key_in_one_commit(tmp_path):
    store = LanceStore(str(tmp_path))
    store.write_examples("s0", _rows("s0", 3))
    store.write_examples("s1", _rows("s1", 2))
    v = store.versions()["examples"]
    assert store.replace_where("examples", {"shard": "s0"}, [], unique=None) == v + 1
    assert store.open("examples").to_table()["shard"].to_pylist() == ["s1", "s1"]
