"""steps.py end to end on a tiny random BERT and ~200 Rotten Tomatoes snippets in 2 shards."""

import collections
import re
import shutil
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from hyperinf_ops import steps
from hyperinf_ops.config import load_config
from hyperinf_ops.data import build_demo_dataset, write_demo_config
from hyperinf_ops.errors import DataError, FingerprintMismatchError
from hyperinf_ops.models import save_tiny_model
from hyperinf_ops.query import load_sql
from hyperinf_ops.store import TABLES

ESTIMATORS = ["hyperinf", "datainf", "tracin", "lissa", "exact"]


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo data (3 shards of 70) and a tiny BERT whose vocabulary is the data's most common words."""
    root = tmp_path_factory.mktemp("steps")
    paths = build_demo_dataset(root / "data", n_pool=210, n_target=40, n_shards=3, seed=1)
    texts = pd.concat(pd.read_parquet(p) for p in paths.shards)["text"]
    counts = collections.Counter(w for t in texts for w in re.findall(r"\w+", t.lower()))
    model = save_tiny_model(root / "model", words=[w for w, _ in counts.most_common(500)])
    return paths, model


def make_config(folder: Path, demo, shards: list[int], **overrides):
    """A config over a pool folder holding the given demo shards (copied), storage under `folder`."""
    paths, model = demo
    pool = folder / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    for i in shards:
        shutil.copy(paths.shards[i], pool / paths.shards[i].name)
    doc = {
        "model": str(model), "train": {"epochs": 2, "lr": 1e-2, "batch_size": 16},
        "projection_dim": 0, "max_length": 32, "estimators": ESTIMATORS,
        "curation": {"query": "top_fraction", "params": {"fraction": 0.5}}, **overrides,
    }
    cfg = load_config(write_demo_config(paths, folder / "hyperinf.yaml", overrides=doc))
    return replace(cfg, data=replace(cfg.data, path=pool))


def counts(store) -> dict[str, int]:
    return {t: store.open(t).count_rows() for t in TABLES}


def scores_df(store) -> pd.DataFrame:
    cols = ["sample_id", "target_set", "method", "score"]
    return store.open("scores").to_table(columns=cols).to_pandas().set_index(["target_set", "method", "sample_id"])


def test_run_all_end_to_end_and_rerun(tmp_path: Path, demo):
    cfg = make_config(tmp_path, demo, [0, 1])
    lines: list[str] = []
    summary = steps.run_all(cfg, log=lines.append)
    store = steps.open_store(cfg)
    n = 140
    assert counts(store) == {"examples": n, "targets": 40, "gradients": n, "curvature": 2 * 8,
                             "queries": len(ESTIMATORS), "scores": n * len(ESTIMATORS)}
    scores = store.open("scores").to_table().to_pandas()
    assert set(scores["method"]) == set(ESTIMATORS) and set(scores["target_set"]) == {"clean_val"}
    assert (scores.groupby("method")["sample_id"].nunique() == n).all() and np.isfinite(scores["score"]).all()
    # the stored examples keep the pool's extra columns
    assert {"movie_name", "flipped"} <= set(store.open("examples").schema.names)

    assert summary.adapter.source == "trained" and summary.curvature.all_converged
    assert [g.shard for g in summary.gradients] == ["shard-00", "shard-01"]
    assert summary.scores.rows == n and len(summary.scores.most_harmful) == 10
    # raw (unprojected) rows: the stored Schulz scores are the exact scores
    assert summary.agreement.min_spearman > 0.999
    planted = sum(int(pd.read_parquet(p)["flipped"].sum()) for p in demo[0].shards[:2])
    self_names = {"self_influence_hyperinf", "self_influence_tracin"}  # raw rows: target-free detectors too
    assert set(summary.mislabel.methods) == set(ESTIMATORS) | self_names and summary.mislabel.flipped == planted
    assert all(0 <= summary.mislabel.methods[m]["auroc"] <= 1 for m in self_names)
    # the streamed self-influence is the squared gradient norm for tracin
    sq = store.open("gradients").to_table(columns=["sample_id", "sq_norms"]).to_pandas().set_index("sample_id")
    tracin_self = steps.self_influence_scores(cfg, store, "tracin")
    np.testing.assert_allclose(tracin_self.to_numpy(), sq.loc[tracin_self.index, "sq_norms"].map(sum).to_numpy(),
                               rtol=1e-4)
    assert any("warm-up epoch 2/2" in line and "examples/s" in line for line in lines)
    assert any("gradients of shard shard-00" in line and "ETA" in line for line in lines)

    # the curated subset is the configured SQL applied to the score table
    subset = pd.read_parquet(summary.curated.files["parquet"])
    con = duckdb.connect()
    con.register("scores", store.open("scores").to_table())
    expected = con.sql(load_sql("top_fraction"), params=cfg.curation.params).df()
    assert len(subset) == summary.curated.rows == 70
    assert set(subset["sample_id"]) == set(expected["sample_id"])
    assert Path(summary.curated.out_dir, "manifest.json").is_file()
    assert Path(summary.curated.out_dir, "subset.jsonl").read_text().count("\n") == 70

    before = counts(store)
    again = steps.run_all(cfg, log=quiet)
    assert counts(store) == before  # nothing duplicated
    assert again.adapter.source == "reused" and again.gradients == []
    assert again.skipped_shards == ["shard-00", "shard-01"]
    pd.testing.assert_frame_equal(scores_df(store), scores_df(store))
    assert again.to_dict()["scores"]["rows"] == n  # summaries are plain data


def test_new_shard_equals_from_scratch(tmp_path: Path, demo):
    paths, _ = demo
    # projected rows this time: the projection is seeded, so shard-wise and union rows are the same
    projected = {"projection_dim": 256, "projection_dtype": "float32"}
    incremental = make_config(tmp_path / "inc", demo, [0, 1], **projected)
    steps.run_all(incremental, log=quiet, agreement_sample=8)
    shutil.copy(paths.shards[2], incremental.data.path / paths.shards[2].name)  # a new data file arrives
    summary = steps.run_all(incremental, log=quiet, agreement_sample=8)
    assert [g.shard for g in summary.gradients] == ["shard-02"]  # only the new shard is computed
    assert summary.adapter.source == "reused"

    # from scratch on the union, under the same adapter (gradients are only comparable under one adapter)
    scratch = make_config(tmp_path / "scratch", demo, [0, 1, 2], **projected)
    scratch = replace(scratch, adapter=replace(scratch.adapter, path=steps.adapter_dir(incremental)))
    fresh = steps.run_all(scratch, log=quiet, agreement_sample=8)
    assert fresh.adapter.source == "given" and len(fresh.gradients) == 3
    a, b = scores_df(steps.open_store(incremental)), scores_df(steps.open_store(scratch))
    assert len(a) == 210 * len(ESTIMATORS) and a.index.sort_values().equals(b.index.sort_values())
    np.testing.assert_allclose(a["score"], b.loc[a.index, "score"], rtol=1e-6, atol=1e-9)


def test_bad_input_writes_nothing(tmp_path: Path, demo):
    cfg = make_config(tmp_path, demo, [0])
    store = steps.open_store(cfg)
    steps.run_all(cfg, log=quiet, agreement_sample=8)
    versions = store.versions()

    bad = tmp_path / "bad.parquet"
    pd.read_parquet(demo[0].shards[1]).rename(columns={"text": "txt"}).to_parquet(bad)
    with pytest.raises(DataError, match=r"column 'text' not found \(did you mean 'txt'\?\)"):
        steps.ingest_shard(cfg, store, "bad", bad, log=quiet)

    # a retrained adapter (other seed) no longer matches the stored gradient rows
    other = replace(cfg, train=replace(cfg.train, seed=7))
    assert steps.train_or_load_adapter(other, store, log=quiet).source == "trained"
    with pytest.raises(FingerprintMismatchError, match="adapter_hash"):
        steps.compute_gradient_shard(other, store, "shard-00", log=quiet)
    with pytest.raises(FingerprintMismatchError, match="adapter_hash"):
        steps.score(other, store, log=quiet)
    assert store.versions() == versions


def test_causal_lm_with_where_target(tmp_path: Path):
    """A tiny Llama on prompt/response pairs; the target set is a SQL selection of the pool."""
    model = save_tiny_model(tmp_path / "llama", task="causal_lm")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        topic = "greeting" if i % 2 else "review"
        prompt = f"hello you {i}" if topic == "greeting" else f"how was the {rng.choice(['film', 'movie'])} {i}"
        response = rng.choice(["hi", "hello", "yes please"]) if topic == "greeting" else \
            f"{rng.choice(['very', 'not'])} {rng.choice(['good', 'bad', 'boring', 'fun'])}"
        rows.append({"prompt": prompt, "response": response, "label": topic, "n": i})
    pool = tmp_path / "pool"
    pool.mkdir()
    pd.DataFrame(rows[:20]).to_json(pool / "a.jsonl", orient="records", lines=True)
    pd.DataFrame(rows[20:]).to_csv(pool / "b.csv", index=False)
    cfg = load_config({
        "model": str(model), "task": "causal_lm", "data": {"path": "pool", "label_column": "label"},
        "targets": {"greetings": {"where": "label = 'greeting' AND n < 10"}},
        "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8}, "projection_dim": 0, "max_length": 24,
        "estimators": ["hyperinf", "tracin"], "curation": {"query": "top_k", "params": {"k": 5}},
    }, base_dir=tmp_path)
    summary = steps.run_all(cfg, log=quiet, agreement_sample=16)
    store = steps.open_store(cfg)
    assert summary.targets.rows == {"greetings": 5} and summary.adapter.source == "trained"
    assert counts(store)["scores"] == 40 * 2 and summary.curated.rows == 5
    assert summary.agreement.min_spearman > 0.999 and not summary.mislabel.has_truth
    assert store.open("examples").schema.field("n").type == "int64"  # extra column kept with its type
