"""export_subset: Parquet + JSONL + manifest, atomic (a crash leaves nothing), and reproducible by Lance
time travel after the tables moved on."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hyperinf_ops import export as export_mod
from hyperinf_ops.errors import DataError
from hyperinf_ops.export import Manifest, export_subset, reproduce
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.scorer import score_store
from hyperinf_ops.settings import CompressionSpec
from hyperinf_ops.store import GradientBatch, LanceStore, Query

DIM = 16
FP = Fingerprint.create(
    model_id="tiny",
    model_hash="h",
    adapter_hash="a",
    task="classification",
    lora_modules=["q"],
    shapes={"q.lora_A": (2, 8)},
    compression=CompressionSpec(dtype="float16"),  # raw rows of 2 * 8 = DIM floats
)


def _add_shard(store: LanceStore, shard: str, n: int, seed: int) -> None:
    ids = [f"{shard}-{i:02d}" for i in range(n)]
    store.write_examples(
        shard,
        pa.table(
            {"sample_id": ids, "text": [f"review {i} ✓" for i in ids], "label": [i % 2 for i in range(n)]}
        ),
    )
    gen = torch.Generator().manual_seed(seed)
    store.write_gradients(shard, GradientBatch(ids, torch.randn(n, DIM, generator=gen), torch.rand(n, 1)), FP)


def _score(store: LanceStore) -> None:
    gen = torch.Generator().manual_seed(7)
    diag = {"q.lora_A": {"damping": 0.01, "iterations": 9, "residual": 1e-12, "converged": True}}
    queries = [
        Query("sst2", m, torch.randn(DIM, generator=gen), FP.digest(), diag) for m in ("hyperinf", "tracin")
    ]
    store.write_queries(queries)
    score_store(store, queries)


@pytest.fixture
def store(tmp_path) -> LanceStore:
    store = LanceStore(str(tmp_path / "store"))
    _add_shard(store, "s0", 30, 0)
    _score(store)
    return store


PARAMS = {"target_set": "sst2", "method": "hyperinf", "fraction": 0.2, "balance": False}


def test_export_writes_parquet_jsonl_manifest(store, tmp_path):
    m = export_subset(store, "top_fraction", PARAMS, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "subset.jsonl", "subset.parquet"]
    table = pq.read_table(out / "subset.parquet")
    lines = [json.loads(line) for line in (out / "subset.jsonl").read_text(encoding="utf-8").splitlines()]
    assert table.num_rows == m.row_count == 6 == len(lines)
    assert [r["sample_id"] for r in lines] == table["sample_id"].to_pylist()
    assert {"text", "label", "shard", "influence_score", "influence_rank", "selected_for"} <= set(lines[0])
    assert lines[0]["text"].endswith("✓") and lines[0]["influence_rank"] == 1
    scores = [r["influence_score"] for r in lines]
    assert scores == sorted(scores, reverse=True)

    loaded = Manifest.load(out)
    assert loaded == m
    assert loaded.table_versions == store.versions()
    assert loaded.fingerprint == json.loads(FP.to_json())
    assert loaded.estimator["queries"]["sst2/hyperinf"]["q.lora_A"]["iterations"] == 9
    assert "$fraction" in loaded.sql and loaded.params == PARAMS and loaded.query_name == "top_fraction"
    custom = export_subset(
        store,
        "top_fraction",
        PARAMS,
        tmp_path / "out2",
        estimator_info={"method": "hyperinf", "damping": 0.01},
    )
    assert custom.estimator == {"method": "hyperinf", "damping": 0.01}


def test_reproduce_uses_recorded_versions_after_new_rows(store, tmp_path):
    m = export_subset(store, "top_fraction", PARAMS, tmp_path / "out")
    exported = pq.read_table(tmp_path / "out" / "subset.parquet")
    # The tables move on: a new shard of examples and gradients, and a rescoring.
    _add_shard(store, "s1", 30, 1)
    _score(store)
    assert store.versions() != m.table_versions
    fresh = export_subset(store, "top_fraction", PARAMS, tmp_path / "fresh")
    assert fresh.row_count == 12
    again = reproduce(tmp_path / "out" / "manifest.json")
    assert again.equals(exported)


def test_crash_leaves_no_half_export_and_existing_needs_overwrite(store, tmp_path, monkeypatch):
    def broken(table, path):
        path.write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "_write_jsonl", broken)
    with pytest.raises(OSError, match="disk full"):
        export_subset(store, "top_fraction", PARAMS, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [tmp_path / "store"]
    monkeypatch.undo()

    export_subset(store, "top_fraction", PARAMS, tmp_path / "out")
    with pytest.raises(FileExistsError):
        export_subset(store, "top_fraction", {**PARAMS, "fraction": 0.5}, tmp_path / "out")
    m = export_subset(store, "top_fraction", {**PARAMS, "fraction": 0.5}, tmp_path / "out", overwrite=True)
    assert m.row_count == 15 == pq.read_table(tmp_path / "out" / "subset.parquet").num_rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "store"]


def test_an_empty_subset_never_replaces_an_export(store, tmp_path):
    """A selection of no rows (here a target set nothing was scored against) is an error naming the kept export,
    and the export in place stays byte for byte."""
    first = export_subset(store, "top_fraction", PARAMS, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(DataError, match=r"selects no rows: nothing exported, the previous export in .*out is kept"):
        export_subset(store, "top_fraction", {**PARAMS, "target_set": "nope"}, tmp_path / "out", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before and first.row_count == 6


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_the_export_gives_labels_and_ids_their_input_types(tmp_path, fmt):
    """Labels are stored as text; the export writes them (and the given ones, `original_label`) in the input's type,
    and the input's id, text and label columns under their names (and types) beside hyperinf's: a pool of integer
    labels exports 0 / 1, which a model trained on the export compares with its own test labels, and a training
    script written for the input reads its columns. Labels that an integer type would merge (`01` and `1` in a CSV)
    stay text, each as written."""
    from hyperinf_ops.config import load_config
    from hyperinf_ops.stages.pool import ingest_shard

    n = 20
    pool = pd.DataFrame({"idx": range(100, 100 + n), "review": [f"review {i}" for i in range(n)],
                         "sentiment": [i % 2 for i in range(n)]})
    texts = pool.assign(sentiment=["01" if i % 2 else "1" for i in range(n)])
    for name, df in (("ints", pool), ("texts", texts)):
        folder = tmp_path / name / "pool"
        folder.mkdir(parents=True)
        if fmt == "csv":
            df.to_csv(folder / "a.csv", index=False)
        else:
            df.to_json(folder / "a.jsonl", orient="records", lines=True)
        cfg = load_config({"data": {"path": "pool", "text_column": "review", "label_column": "sentiment",
                                    "id_column": "idx"}, "targets": {"sst2": {"where": "true"}}},
                          base_dir=tmp_path / name)
        store = LanceStore(str(tmp_path / name / "store"))
        ingest_shard(store, "a", folder / f"a.{fmt}", cfg.data, cfg.task, log=lambda _: None)
        ids = [str(i) for i in pool["idx"]]
        store.write_gradients("a", GradientBatch(ids, torch.randn(n, DIM), torch.rand(n, 1)), FP)
        _score(store)
        export_subset(store, "top_fraction", {**PARAMS, "fraction": 0.5}, tmp_path / name / "out")
        table = pq.read_table(tmp_path / name / "out" / "subset.parquet")
        line = json.loads((tmp_path / name / "out" / "subset.jsonl").read_text().splitlines()[0])
        assert table.num_rows == 10 and table["sample_id"].to_pylist() == list(map(str, table["idx"].to_pylist()))
        assert table.schema.field("idx").type == pa.int64() and isinstance(line["idx"], int)
        given = dict(zip(pool["idx"], df["sentiment"], strict=True))
        assert table["label"].to_pylist() == [given[i] for i in table["idx"].to_pylist()]
        assert table["original_label"].to_pylist() == table["label"].to_pylist()
        assert table["sentiment"].equals(table["label"]) and table["review"].equals(table["text"])
        assert table["review"].to_pylist() == [f"review {i - 100}" for i in table["idx"].to_pylist()]
        assert line["sentiment"] == line["label"] and line["review"] == line["text"]
        if name == "ints":
            assert table.schema.field("label").type == pa.int64() and isinstance(line["label"], int)
        else:
            assert set(table["label"].to_pylist()) <= {"01", "1"} and isinstance(line["label"], str)
        assert reproduce(tmp_path / name / "out" / "manifest.json").equals(table)
