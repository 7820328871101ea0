"""The Dagster graph end to end on a tiny random BERT: every asset, every check, the curated subset,
idempotent re-runs, and bad input that fails the right asset with a clear error and overwrites nothing."""

from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from hyperinf_project import make_project

from assets_defs import ASSET_CHECKS, ASSETS
from hyperinf_ops.config import load_config
from hyperinf_ops.models import save_tiny_model
from hyperinf_ops.query import connect, run_query
from hyperinf_ops.store import LanceStore
from pipelines.definitions import build_definitions
from pipelines.runner import failure_message, materialize_all, register_shards

ROW_TABLES = ("examples", "targets", "gradients", "curvature", "queries", "scores")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    """A 200-example project materialized once; yields (config path, instance, run results)."""
    cfg_path = make_project(tmp_path_factory.mktemp("project"), tiny_model)
    with dg.instance_for_test() as instance:
        results = materialize_all(build_definitions(str(cfg_path)), instance, load_config(cfg_path), log=lambda _: None)
        yield cfg_path, instance, results


def _row_counts(store: LanceStore) -> dict[str, int]:
    return {t: store.open(t).count_rows() for t in ROW_TABLES}


def test_definitions_load():
    defs = build_definitions("unused.yaml")
    dg.Definitions.validate_loadable(defs)
    keys = {a.key.to_user_string() for a in ASSETS}
    assert keys == {"pool_examples", "target_sets", "lora_adapter", "lora_gradients", "curvature", "target_queries",
                    "influence_scores", "curated_subset", "mislabel_report"}
    assert len(ASSET_CHECKS) == 4
    assert {j for j in ("shard_job", "adapter_job", "refresh_job") if defs.resolve_job_def(j)} == {
        "shard_job", "adapter_job", "refresh_job"}


def test_whole_graph_and_every_check_passes(built):
    _, _, results = built
    assert all(r.success for r in results)
    evaluations = [e for r in results for e in r.get_asset_check_evaluations()]
    assert {e.check_name for e in evaluations} == {
        "gradients_finite", "gradient_rows_match_pool", "inverses_converged", "scores_cover_pool",
        "agreement_with_exact", "curated_subset_size"}
    assert all(e.passed for e in evaluations), [e.check_name for e in evaluations if not e.passed]
    assert len([e for e in evaluations if e.check_name == "gradients_finite"]) == 2  # one per shard


def test_metadata_a_person_wants(built):
    _, instance, _ = built

    def meta(asset: str) -> dict:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}

    assert meta("curvature")["all_converged"] is True
    assert "| matrix | iterations | residual |" in meta("curvature")["solver_health"]
    scores = meta("influence_scores")
    assert scores["histogram/clean/hyperinf"].startswith("![clean / hyperinf](data:image/png;base64,")
    assert scores["most_harmful (curation target/method)"].count("\n") == 11  # header + rule + 10 rows
    assert scores["dagster/row_count"] == 200
    report = meta("mislabel_report")
    assert set(report) >= {"auroc/hyperinf", "auroc/datainf", "auroc/tracin", "detection", "most_harmful"}
    assert meta("lora_adapter")["source"] == "trained"
    assert meta("pool_examples")["examples_version"] >= 1


def test_curated_subset_matches_sql_on_scores(built):
    cfg_path, _, _ = built
    cfg = load_config(cfg_path)
    subset = pq.read_table(cfg.storage_root / "exports" / "top_fraction" / "subset.parquet").to_pandas()
    con = connect(LanceStore(str(cfg.storage_root)))
    expected = run_query(con, "top_fraction", cfg.curation.params).to_pandas()
    con.close()
    assert len(subset) == 100
    assert subset["sample_id"].tolist() == expected["sample_id"].tolist()
    assert subset["influence_score"].tolist() == pytest.approx(expected["score"].tolist())


def test_rerun_duplicates_nothing(built):
    cfg_path, instance, _ = built
    cfg = load_config(cfg_path)
    store = LanceStore(str(cfg.storage_root))
    before = _row_counts(store)
    scores_before = store.open("scores").to_table().to_pandas().sort_values(["method", "sample_id"])
    materialize_all(build_definitions(str(cfg_path)), instance, cfg, log=lambda _: None)
    assert _row_counts(store) == before
    after = store.open("scores").to_table().to_pandas().sort_values(["method", "sample_id"])
    assert after["score"].to_numpy() == pytest.approx(scores_before["score"].to_numpy(), rel=1e-6)


# ------------------------------------------------------------------------------------------------ bad input

def _fail(defs: dg.Definitions, instance, job: str, *, partition: str | None = None, assets=None) -> str:
    result = defs.resolve_job_def(job).execute_in_process(
        instance=instance, partition_key=partition, raise_on_error=False,
        asset_selection=[dg.AssetKey(a) for a in assets] if assets else None)
    assert not result.success
    return failure_message(result)


def _ingested(tmp_path: Path, tiny_model: Path, instance, **overrides):
    """A fresh project with both pool shards ingested; returns (config path, defs, store, versions)."""
    cfg_path = make_project(tmp_path, tiny_model, n_pool=60, n_target=10, **overrides)
    defs = build_definitions(str(cfg_path))
    cfg = load_config(cfg_path)
    for key in register_shards(instance, cfg):
        assert defs.resolve_job_def("shard_job").execute_in_process(
            instance=instance, partition_key=key, asset_selection=[dg.AssetKey("pool_examples")]).success
    store = LanceStore(str(cfg.storage_root))
    return cfg_path, defs, store, store.versions()


def _edit_shard(cfg_path: Path, edit) -> None:
    path = cfg_path.parent / "pool" / "shard-0.parquet"
    edit(pd.read_parquet(path)).to_parquet(path, index=False)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda df: df.rename(columns={"text": "txt"}), "column 'text' not found (did you mean 'txt'?)"),
    (lambda df: df.drop(columns=["label"]), "column 'label' not found"),
    (lambda df: df.iloc[0:0], "is empty: no rows"),
])
def test_bad_pool_file_fails_ingest_and_keeps_tables(tmp_path, tiny_model, edit, message):
    with dg.DagsterInstance.ephemeral() as instance:
        cfg_path, defs, store, versions = _ingested(tmp_path, tiny_model, instance)
        _edit_shard(cfg_path, edit)
        error = _fail(defs, instance, "shard_job", partition="shard-0", assets=["pool_examples"])
        assert "pool_examples[shard-0] failed" in error and message in error
        assert store.versions() == versions


@pytest.mark.parametrize(("target", "message"), [
    (lambda df: df.iloc[0:0], "is empty: no rows"),
    (lambda df: df.assign(label="neutral"), "has labels the pool does not have: ['neutral']"),
])
def test_bad_target_set_fails_and_keeps_tables(tmp_path, tiny_model, target, message):
    with dg.DagsterInstance.ephemeral() as instance:
        cfg_path, defs, store, versions = _ingested(tmp_path, tiny_model, instance)
        path = cfg_path.parent / "targets" / "clean.parquet"
        target(pd.read_parquet(path)).to_parquet(path, index=False)
        error = _fail(defs, instance, "refresh_job", assets=["target_sets"])
        assert "target_sets failed" in error and "target set 'clean'" in error and message in error
        assert store.versions() == versions


def test_texts_that_tokenize_to_nothing(tmp_path, tiny_model):
    with dg.DagsterInstance.ephemeral() as instance:
        cfg_path, defs, store, versions = _ingested(tmp_path, tiny_model, instance)
        _edit_shard(cfg_path, lambda df: df.assign(text=["\x00\x01"] + df["text"].tolist()[1:]))
        assert defs.resolve_job_def("shard_job").execute_in_process(
            instance=instance, partition_key="shard-0", asset_selection=[dg.AssetKey("pool_examples")]).success
        versions = store.versions()
        error = _fail(defs, instance, "adapter_job")
        assert "lora_adapter failed" in error and "shard-0-0000" in error and "tokenizes to nothing" in error
        assert store.versions() == versions
        assert not (cfg_path.parent / "store" / "adapter").exists()


def test_model_folder_that_is_not_a_hf_model(tmp_path, tiny_model):
    (tmp_path / "not_a_model").mkdir()
    with dg.DagsterInstance.ephemeral() as instance:
        _, defs, store, versions = _ingested(tmp_path, tiny_model, instance, model=str(tmp_path / "not_a_model"))
        error = _fail(defs, instance, "adapter_job")
        assert "lora_adapter failed" in error and "not_a_model" in error
        assert store.versions() == versions


@pytest.mark.parametrize(("change", "messages"), [
    ({"model": "/no/such/model"}, ["model: '/no/such/model' is neither a bundled model"]),
    ({"projection_dimm": 0, "damping_ratio": "high"},
     ["projection_dimm: unknown key (did you mean 'projection_dim'?)",
      "damping_ratio: expected a number, got str 'high'"]),
])
def test_bad_config_fails_before_any_work(tmp_path, tiny_model, change, messages):
    cfg_path = make_project(tmp_path, tiny_model, n_pool=20, n_target=4)
    cfg_path.write_text(yaml.safe_dump({**yaml.safe_load(cfg_path.read_text()), **change}))
    defs = build_definitions(str(cfg_path))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("pool_shards", ["shard-0"])
        error = _fail(defs, instance, "shard_job", partition="shard-0", assets=["pool_examples"])
    assert "pool_examples[shard-0] failed" in error and all(m in error for m in messages)
    assert not (tmp_path / "store").exists()


def test_changed_adapter_with_old_gradient_rows(tmp_path, tiny_model):
    with dg.DagsterInstance.ephemeral() as instance:
        cfg_path, defs, store, _ = _ingested(tmp_path, tiny_model, instance)
        assert defs.resolve_job_def("adapter_job").execute_in_process(instance=instance).success
        assert defs.resolve_job_def("shard_job").execute_in_process(
            instance=instance, partition_key="shard-0", asset_selection=[dg.AssetKey("lora_gradients")]).success
        doc = yaml.safe_load(cfg_path.read_text())
        cfg_path.write_text(yaml.safe_dump({**doc, "train": {**doc["train"], "seed": 1}}))  # retrains
        assert defs.resolve_job_def("adapter_job").execute_in_process(instance=instance).success
        versions = store.versions()
        error = _fail(defs, instance, "shard_job", partition="shard-1", assets=["lora_gradients"])
        assert "lora_gradients[shard-1] failed" in error and "adapter_hash" in error
        assert store.versions() == versions
