"""The stages end to end on a tiny random BERT and ~200 Rotten Tomatoes snippets in 2-3 shards, launched as
`hyperinf run` launches them, then checked stage by stage against the tables they wrote."""

import collections
import math
import re
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest
from tiny_models import save_tiny_model

from hyperinf_ops.adapters import AdapterStore
from hyperinf_ops.config import load_config
from hyperinf_ops.data.demo import build_demo_dataset, write_demo_config
from hyperinf_ops.errors import DataError, FingerprintMismatchError
from hyperinf_ops.query import load_sql
from hyperinf_ops.scorer import raw_gradient_batches
from hyperinf_ops.stages.adapter import train_or_load_adapter
from hyperinf_ops.stages.codec import current_whitening, prepare_row_codec
from hyperinf_ops.stages.pool import ingest_shard
from hyperinf_ops.stages.reports import agreement_check, mislabel_report
from hyperinf_ops.stages.scores import read_scores, score
from hyperinf_ops.store import LanceStore
from pipelines.runner import materialize_all

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


def make_config(folder: Path, demo, shards: list[int], **overrides) -> Path:
    """A config file over a pool folder holding the given demo shards (copied), storage under `folder`."""
    paths, model = demo
    pool = folder / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    for i in shards:
        shutil.copy(paths.shards[i], pool / paths.shards[i].name)
    doc = {
        "model": str(model), "train": {"epochs": 2, "lr": 1e-2, "batch_size": 16},
        "max_length": 32, "estimators": ESTIMATORS, "data": {"path": str(pool)},
        "curation": {"query": "top_fraction", "params": {"fraction": 0.5}, "require_warmup": False}, **overrides,
    }  # require_warmup: False: the tiny random model need not learn the demo in 2 epochs (plumbing tests)
    return write_demo_config(paths, folder / "hyperinf.yaml", overrides=doc)


def run(cfg_path: Path):
    with dg.DagsterInstance.ephemeral() as instance:
        return materialize_all(instance, cfg_path, load_config(cfg_path), log=quiet)


def counts(store: LanceStore) -> dict[str, int]:
    return {t: store.open(t).count_rows() for t in ("examples", "targets", "gradients", "curvature", "queries",
                                                    "scores")}


def scores_df(store: LanceStore) -> pd.DataFrame:
    cols = ["sample_id", "target_set", "method", "score"]
    return store.open("scores").to_table(columns=cols).to_pandas().set_index(["target_set", "method", "sample_id"])


def test_every_stage_end_to_end_and_rerun(tmp_path: Path, demo):
    cfg_path = make_config(tmp_path, demo, [0, 1])
    cfg = load_config(cfg_path)
    report = run(cfg_path)
    store = LanceStore(str(cfg.storage_root))
    n = 140
    # the estimators' scores and, beside them, hyperinf_cp and fused of the target set; target set "self":
    # self-influence (hyperinf, tracin), the warm-up's loss, margin and AUM, and the frozen-embedding probe
    assert counts(store) == {"examples": n, "targets": 40, "gradients": n, "curvature": 2 * 8,
                             "queries": len(ESTIMATORS), "scores": n * (len(ESTIMATORS) + 2 + 2 + 4)}
    assert report.gradients == ["shard-00", "shard-01"] and report.adapter
    scores = store.open("scores").to_table().to_pandas()
    assert set(scores.loc[scores["target_set"] == "clean_val", "method"]) == {*ESTIMATORS, "hyperinf_cp", "fused"}
    assert set(scores["target_set"]) == {"clean_val", "self"}
    assert set(scores.loc[scores["target_set"] == "self", "method"]) == {"hyperinf", "tracin", "loss", "margin",
                                                                        "aum", "probe"}
    assert (scores.groupby(["target_set", "method"])["sample_id"].nunique() == n).all()
    assert np.isfinite(scores["score"]).all()
    # the stored examples keep the pool's extra columns
    assert {"movie_name", "flipped"} <= set(store.open("examples").schema.names)
    assert AdapterStore(cfg.storage_root).current().source == "trained"

    settings = cfg.gradient_settings
    # the stored Schulz scores of the (int4) rows rank like the exact inverse applied to the same rows
    agreement = agreement_check(store, cfg.model_spec, settings, cfg.estimator("hyperinf"), ["clean_val"],
                                sample_size=32, log=quiet)
    assert agreement.min_spearman > 0.999 and agreement.sample_size == 32
    mislabel = mislabel_report(store, ESTIMATORS, target_set="clean_val", task=cfg.task)
    planted = sum(int(pd.read_parquet(p)["flipped"].sum()) for p in demo[0].shards[:2])
    self_names = {"self_influence_hyperinf", "self_influence_tracin"}  # target-free detectors too
    assert set(mislabel.methods) == set(ESTIMATORS) | self_names | {"loss", "margin", "aum", "probe"}
    assert mislabel.flipped == planted and mislabel.suggestions["source"] == "warmup"
    assert all(0 <= mislabel.methods[m]["auroc"] <= 1 for m in self_names)
    assert len(mislabel.most_harmful) == 10 and "flipped" in mislabel.most_harmful[0]
    # the stored self-influence is -(the squared norm of the stored gradient) for tracin: of the rows decoded
    # and unwhitened; those are the exact gradients (their norms in sq_norms) up to int4 rounding; and the
    # report's AUROC is that of -score (the largest self-influence the most suspicious)
    tracin_self = read_scores(store, "self", "tracin").set_index("sample_id")["score"]
    shapes = AdapterStore(cfg.storage_root).current().selected_shapes(settings.modules)
    decoded = {i: float(sum(g[name][j].double().square().sum() for name in g))
               for ids, g in raw_gradient_batches(store, shapes, whitening=current_whitening(store, settings))
               for j, i in enumerate(ids)}
    np.testing.assert_allclose(-tracin_self.to_numpy(), [decoded[i] for i in tracin_self.index], rtol=1e-5)
    sq = store.open("gradients").to_table(columns=["sample_id", "sq_norms"]).to_pandas().set_index("sample_id")
    exact = sq.loc[tracin_self.index, "sq_norms"].map(sum).to_numpy()
    assert 1e-4 < np.abs(-tracin_self.to_numpy() / exact - 1).max() < 0.1  # int4 rows: close, not exact
    flips = store.open("examples").to_table(columns=["sample_id", "flipped"]).to_pandas().set_index("sample_id")
    flipped = flips.loc[tracin_self.index, "flipped"].astype(bool).to_numpy()
    ranks = pd.Series(-tracin_self.to_numpy()).rank().to_numpy()
    auroc = (ranks[flipped].sum() - flipped.sum() * (flipped.sum() + 1) / 2) / (flipped.sum() * (~flipped).sum())
    assert mislabel.methods["self_influence_tracin"]["auroc"] == pytest.approx(auroc)

    # the curated subset is the configured SQL applied to the score table
    export = cfg.storage_root / "exports" / "top_fraction"
    subset = pd.read_parquet(export / "subset.parquet")
    con = duckdb.connect()
    for table in ("scores", "examples"):
        con.register(table, store.open(table).to_table())
    expected = con.sql(load_sql("top_fraction"), params=cfg.curation.params).df()
    labels = store.open("examples").to_table(columns=["label"])["label"].value_counts().to_pylist()
    assert len(subset) == sum(math.ceil(0.5 * c["counts"]) for c in labels)  # class-balanced (the default)
    assert set(subset["sample_id"]) == set(expected["sample_id"])
    assert (export / "manifest.json").is_file() and (export / "subset.jsonl").read_text().count("\n") == len(subset)

    before, scores_before = counts(store), scores_df(store)
    again = run(cfg_path)
    assert counts(store) == before  # nothing duplicated
    # another (ephemeral) Dagster instance than the last refresh's: the refresh runs, so that its UI shows the
    # assets (on the same instance an identical run launches nothing: tests/test_pipeline.py)
    assert not again.adapter and again.gradients == [] and [r.job_name for r in again.runs] == ["refresh_job"]
    pd.testing.assert_frame_equal(scores_df(store).sort_index(), scores_before.sort_index())


def test_new_shard_equals_from_scratch(tmp_path: Path, demo):
    paths, _ = demo
    # sketched rows this time: the sketch is seeded, so shard-wise and union rows are the same
    projected = {"compression": {"sketch_dim": 8, "dtype": "float32"}}
    incremental = make_config(tmp_path / "inc", demo, [0, 1], **projected)
    run(incremental)
    shutil.copy(paths.shards[2], tmp_path / "inc" / "pool" / paths.shards[2].name)  # a new data file arrives
    report = run(incremental)
    assert report.gradients == ["shard-02"] and not report.adapter  # only the new shard is computed

    # from scratch on the union, under the same adapter (gradients are only comparable under one adapter)
    adapters = AdapterStore(load_config(incremental).storage_root)
    scratch = make_config(tmp_path / "scratch", demo, [0, 1, 2], adapter={"path": str(adapters.path(adapters.current()))},
                          **projected)
    fresh = run(scratch)
    assert fresh.adapter and len(fresh.gradients) == 3
    assert AdapterStore(load_config(scratch).storage_root).current().source == "given"
    a = scores_df(LanceStore(str(load_config(incremental).storage_root)))
    b = scores_df(LanceStore(str(load_config(scratch).storage_root)))
    # every estimator's scores, and self-influence (hyperinf, tracin) of the sketched rows as target set "self"
    # a given adapter has no warm-up history: no AUM, and hyperinf_cp (so fused) is its end point only; the
    # rankings of the rows themselves (influence, self-influence, loss, margin, probe) must agree
    assert len(a) == 210 * (len(ESTIMATORS) + 2 + 2 + 4) and len(b) == 210 * (len(ESTIMATORS) + 2 + 2 + 3)
    history = [("self", "aum"), ("clean_val", "hyperinf_cp"), ("clean_val", "fused")]
    a, b = a.drop(index=history), b.drop(index=history[1:])
    assert a.index.sort_values().equals(b.index.sort_values())
    # float32 rows scanned in another order: equal up to float32 summation error, relative to each ranking's
    # scale (a score near zero has no meaningful relative error)
    for key, group in b.groupby(level=["target_set", "method"]):
        scale = group["score"].abs().max()
        np.testing.assert_allclose(a.loc[group.index, "score"], group["score"], rtol=1e-6, atol=1e-6 * scale,
                                   err_msg=str(key))


def test_bad_input_writes_nothing(tmp_path: Path, demo):
    cfg_path = make_config(tmp_path, demo, [0])
    run(cfg_path)
    cfg = load_config(cfg_path)
    store = LanceStore(str(cfg.storage_root))
    versions = store.versions()

    bad = tmp_path / "bad.parquet"
    pd.read_parquet(demo[0].shards[1]).rename(columns={"text": "txt"}).to_parquet(bad)
    with pytest.raises(DataError, match=r"column 'text' not found \(did you mean 'txt'\?\)"):
        ingest_shard(store, "bad", bad, cfg.data, cfg.task, log=quiet)
    assert store.versions() == versions

    # a retrained adapter (other seed) no longer matches the stored gradient rows: nothing scores them, first
    # because its rows' whitening is not made yet, then because the rows are of another adapter
    other = cfg.train.model_copy(update={"seed": 7})
    assert train_or_load_adapter(store, cfg.model_spec, cfg.lora, other, log=quiet).source == "trained"
    versions = store.versions()  # the new adapter's AUM is written with it (label_signals)
    pairs = [("clean_val", "hyperinf")]
    with pytest.raises(DataError, match="materialize row_codec first"):
        score(store, cfg.gradient_settings, pairs, task=cfg.task, shown=pairs[0], log=quiet)
    assert prepare_row_codec(store, cfg.model_spec, cfg.gradient_settings, log=quiet).created
    with pytest.raises(FingerprintMismatchError, match="adapter_hash"):
        score(store, cfg.gradient_settings, pairs, task=cfg.task, shown=pairs[0], log=quiet)
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
    doc = {
        "model": str(model), "task": "causal_lm", "data": {"path": "pool", "label_column": "label"},
        "targets": {"greetings": {"where": "label = 'greeting' AND n < 10"}},
        "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8}, "max_length": 24,
        "estimators": ["hyperinf", "tracin"], "curation": {"query": "top_k", "params": {"k": 5}, "require_warmup": False},
    }
    cfg_path = tmp_path / "hyperinf.yaml"
    cfg_path.write_text(load_config(doc, base_dir=tmp_path).model_dump_json())  # JSON is YAML
    report = run(cfg_path)
    cfg = load_config(cfg_path)
    store = LanceStore(str(cfg.storage_root))
    assert report.gradients == ["a", "b"] and AdapterStore(cfg.storage_root).current().source == "trained"
    # the estimators, their cover rankings (on by default for a causal LM), hyperinf_cp (one epoch: its end point)
    # and fused of the target set; self-influence and loss
    assert store.open("targets").count_rows() == 5 and counts(store)["scores"] == 40 * (2 + 2 + 2 + 2 + 1)
    assert not store.exists("label_suggestions") or store.open("label_suggestions").count_rows() == 0
    assert pd.read_parquet(cfg.storage_root / "exports" / "top_k" / "subset.parquet").shape[0] == 5
    agreement = agreement_check(store, cfg.model_spec, cfg.gradient_settings, cfg.estimator("hyperinf"),
                                ["greetings"], sample_size=16, log=quiet)
    assert agreement.min_spearman > 0.999
    assert "flipped" not in store.open("examples").schema.names  # no truth: the report lists, never scores
    assert store.open("examples").schema.field("n").type == "int64"  # extra column kept with its type
