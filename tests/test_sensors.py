"""The pool-folder sensor (partitions + observations), declarative automation (what it materializes after a
new file), and the nightly schedule, evaluated tick by tick without a daemon."""

import datetime as dt
from pathlib import Path

import dagster as dg
import pytest
import yaml
from hyperinf_project import make_project, write_shard
from tiny_models import save_tiny_model

from assets_defs import ASSETS
from assets_defs.resources import HyperinfResource
from hyperinf_ops.adapters import AdapterStore
from hyperinf_ops.config import load_config
from hyperinf_ops.data.io import file_digest
from hyperinf_ops.store import LanceStore
from pipelines.definitions import build_definitions
from pipelines.launcher import Launcher
from pipelines.runner import materialize_all
from pipelines.schedules import nightly_refresh
from pipelines.sensors import pool_folder_sensor

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _tick(instance, cfg_path: Path, cursor: str | None) -> dg.SensorResult:
    # A `with`: the resource has setup/teardown (the storage root's lease in runs), as the daemon opens it.
    with dg.build_sensor_context(instance=instance, cursor=cursor,
                                 resources={"hyperinf": HyperinfResource(config_path=str(cfg_path))}) as ctx:
        return pool_folder_sensor(ctx)


def _apply(instance, result: dg.SensorResult) -> None:
    """What the daemon does with a sensor result: add the partitions, record the observations."""
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for event in result.asset_events:
        instance.report_runless_asset_event(event)


def _scores(root: Path):
    table = LanceStore(str(root)).open("scores").to_table(columns=["target_set", "method", "sample_id", "score"])
    return table.to_pandas().sort_values(["target_set", "method", "sample_id"]).reset_index(drop=True)


def _automate(instance, defs, launcher: Launcher, cursor, ticks: int = 8) -> list[tuple[str, str | None]]:
    """Evaluate the automation conditions tick by tick from `cursor` and run what they request (as the daemon
    would); returns (asset, partition) in the order they were requested."""
    requested = []
    for i in range(1, ticks + 1):
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor,
                                                   evaluation_time=START + dt.timedelta(seconds=30 * i))
        cursor = result.cursor
        by_partition: dict[str | None, list[str]] = {}
        for key in (a.key for a in ASSETS if a.is_executable):
            for partition in result.get_requested_partitions(key) if result.get_num_requested(key) else ():
                by_partition.setdefault(partition, []).append(key.to_user_string())
        for partition, assets in sorted(by_partition.items(), key=lambda kv: kv[0] or ""):
            requested += [(a, partition) for a in assets]
            launcher.run("__ASSET_JOB", partition_key=partition, assets=assets)
    return requested


def test_new_file_becomes_a_partition_and_automation_computes_only_its_shard(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    # exact rows: the from-scratch run below draws its whitening pilot from all three files, so whitened int4
    # rows would carry other rounding errors (a new shard reuses the stored whitening: test_steps.py)
    cfg_path = make_project(tmp_path / "project", model, n_pool=120, n_shards=2, n_target=20,
                            compression={"whiten": 0, "dtype": "float32"})
    defs = build_definitions(str(cfg_path))
    with dg.instance_for_test() as instance:
        materialize_all(instance, cfg_path, load_config(cfg_path), log=lambda _: None)
        # the automation sensor has been ticking all along (a first tick only records the state)
        baseline = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=START)

        first = _tick(instance, cfg_path, None)  # partitions exist already: observed, none added
        assert not first.dynamic_partitions_requests and not first.run_requests
        assert {(e.asset_key.to_user_string(), e.partition) for e in first.asset_events} == {
            ("pool_files", "shard-0"), ("pool_files", "shard-1")}
        _apply(instance, first)
        assert _tick(instance, cfg_path, first.cursor).skip_reason.skip_message == "no new, changed or gone pool files"

        new_file = write_shard(tmp_path / "project" / "pool", "shard-2", 40, seed=7)
        second = _tick(instance, cfg_path, first.cursor)
        assert second.dynamic_partitions_requests == [dg.AddDynamicPartitionsRequest("pool_shards", ["shard-2"])]
        [observation] = second.asset_events
        assert observation.partition == "shard-2" and observation.tags["dagster/data_version"] == file_digest(new_file)
        _apply(instance, second)

        with Launcher.open(instance, cfg_path) as launcher:
            requested = _automate(instance, defs, launcher, baseline.cursor)
        # the new shard's rows and gradients, then everything that reads every shard; never the adapter or the
        # other shards (their data versions did not change)
        assert ("pool_examples", "shard-2") in requested and ("lora_gradients", "shard-2") in requested
        assert {a for a, _ in requested} >= {"preconditioners", "target_queries", "influence_scores", "curated_subset"}
        assert not {p for _, p in requested} & {"shard-0", "shard-1"} and ("lora_adapter", None) not in requested
        assert ("row_codec", None) not in requested  # new data never re-draws the rows' whitening pilot
        assert len(requested) == len(set(requested))  # nothing materialized twice

    # From scratch on the union of the three files, under the same adapter.
    doc = yaml.safe_load(cfg_path.read_text())
    adapters = AdapterStore(tmp_path / "project" / "store")
    doc.update(storage_root=str(tmp_path / "scratch"), adapter={"path": str(adapters.path(adapters.current()))})
    scratch = tmp_path / "scratch.yaml"
    scratch.write_text(yaml.safe_dump({**doc, "data": {**doc["data"], "path": str(tmp_path / "project" / "pool")},
                                       "targets": {"clean": {"path": str(tmp_path / "project" / "targets" /
                                                                         "clean.parquet")}}}))
    with dg.instance_for_test() as instance:
        materialize_all(instance, scratch, load_config(scratch), log=lambda _: None)
    incremental, reference = _scores(tmp_path / "project" / "store"), _scores(tmp_path / "scratch")
    # per target set 3 estimators, hyperinf_cp and fused; self: 2 self-influence, loss, margin, aum, probe
    assert len(incremental) == 160 * (5 + 6)
    # the rankings of the rows themselves; a given adapter has no warm-up history (AUM, checkpoints)
    history = ["aum", "hyperinf_cp", "fused"]
    incremental, reference = (t[~t["method"].isin(history)].reset_index(drop=True) for t in (incremental, reference))
    assert incremental[["target_set", "method", "sample_id"]].equals(reference[["target_set", "method", "sample_id"]])
    assert incremental["score"].to_numpy() == pytest.approx(reference["score"].to_numpy(), rel=1e-5, abs=1e-9)


def test_changed_file_is_observed_again_and_unchanged_ones_are_not(tmp_path):
    cfg_path = make_project(tmp_path / "project", save_tiny_model(tmp_path / "model"), n_pool=20, n_target=4)
    with dg.DagsterInstance.ephemeral() as instance:
        first = _tick(instance, cfg_path, None)
        assert first.dynamic_partitions_requests == [
            dg.AddDynamicPartitionsRequest("pool_shards", ["shard-0", "shard-1"])]
        _apply(instance, first)
        changed = write_shard(cfg_path.parent / "pool", "shard-1", 12, seed=3)
        again = _tick(instance, cfg_path, first.cursor)
        assert not again.dynamic_partitions_requests  # the partition exists: only its content is new
        assert [(e.partition, e.tags["dagster/data_version"]) for e in again.asset_events] == [
            ("shard-1", file_digest(changed))]


def test_gone_file_is_observed_removed_and_automation_removes_its_shard(tmp_path):
    """Issue 12.7 through the sensor: a deleted pool file gets the data version `removed`; automation then runs its
    partition's pool_examples and lora_gradients, which remove the shard's rows, and the refresh that follows
    scores the remaining pool without failing."""
    cfg_path = make_project(tmp_path / "project", save_tiny_model(tmp_path / "model"), n_pool=60, n_shards=3,
                            n_target=10, compression={"whiten": 0, "dtype": "float32"})
    defs = build_definitions(str(cfg_path))
    with dg.instance_for_test() as instance:
        materialize_all(instance, cfg_path, load_config(cfg_path), log=lambda _: None)
        baseline = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=START)
        first = _tick(instance, cfg_path, None)
        _apply(instance, first)
        (cfg_path.parent / "pool" / "shard-2.parquet").unlink()
        gone = _tick(instance, cfg_path, first.cursor)
        assert [(e.partition, e.tags["dagster/data_version"]) for e in gone.asset_events] == [("shard-2", "removed")]
        _apply(instance, gone)
        with Launcher.open(instance, cfg_path) as launcher:
            requested = _automate(instance, defs, launcher, baseline.cursor)
        assert ("pool_examples", "shard-2") in requested and ("lora_gradients", "shard-2") in requested
        assert "influence_scores" in {a for a, _ in requested}
        assert not {p for _, p in requested} & {"shard-0", "shard-1"}
    store = LanceStore(str(cfg_path.parent / "store"))
    for table in ("examples", "gradients", "example_outputs", "curvature"):
        shards = set(store.open(table).to_table(columns=["shard"])["shard"].to_pylist())
        assert shards == {"shard-0", "shard-1"}, table
    assert len(_scores(cfg_path.parent / "store")) == 40 * (5 + 6)  # the remaining 40 examples, every ranking


def test_nightly_schedule_requests_a_refresh():
    ctx = dg.build_schedule_context(scheduled_execution_time=dt.datetime(2026, 1, 2, 3, 0, tzinfo=dt.UTC))
    requests = nightly_refresh.evaluate_tick(ctx).run_requests
    assert len(requests) == 1
    assert nightly_refresh.job_name == "refresh_job"
    assert nightly_refresh.cron_schedule == "0 3 * * *" and nightly_refresh.execution_timezone == "UTC"
    job = build_definitions("unused.yaml").resolve_job_def(nightly_refresh.job_name)
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {
        "target_sets", "cross_fit", "checkpoint_scores", "preconditioners", "target_queries", "influence_scores",
        "curated_subset", "mislabel_report", "evaluation"}
