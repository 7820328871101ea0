"""The pool-folder sensor and the nightly schedule, evaluated without a daemon."""

from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml
from hyperinf_project import make_project, write_shard

from hyperinf_ops import steps
from hyperinf_ops.config import load_config
from hyperinf_ops.models import save_tiny_model
from hyperinf_ops.store import LanceStore
from pipelines.definitions import build_definitions
from pipelines.resources import HyperinfConfigResource
from pipelines.runner import materialize_all
from pipelines.schedules import nightly_refresh
from pipelines.sensors import PoolCursor, pool_folder_sensor


def _tick(instance, cfg_path: Path, cursor: str | None) -> dg.SensorResult:
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor,
                                  resources={"hyperinf": HyperinfConfigResource(config_path=str(cfg_path))})
    return pool_folder_sensor(ctx)


def _scores(root: Path):
    table = LanceStore(str(root)).open("scores").to_table(columns=["target_set", "method", "sample_id", "score"])
    return table.to_pandas().sort_values(["target_set", "method", "sample_id"]).reset_index(drop=True)


def test_new_file_adds_only_its_partition_and_refresh_equals_a_run_from_scratch(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    cfg_path = make_project(tmp_path / "project", model, n_pool=120, n_shards=2, n_target=20)
    defs = build_definitions(str(cfg_path))
    with dg.instance_for_test() as instance:
        materialize_all(defs, instance, load_config(cfg_path), log=lambda _: None)

        first = _tick(instance, cfg_path, None)  # partitions exist already: recorded, nothing to run
        assert not first.run_requests and not first.dynamic_partitions_requests
        assert sorted(PoolCursor.parse(first.cursor).files) == ["shard-0", "shard-1"]

        write_shard(tmp_path / "project" / "pool", "shard-2", 40, seed=7)
        second = _tick(instance, cfg_path, first.cursor)
        assert [(r.job_name, r.partition_key) for r in second.run_requests] == [("shard_job", "shard-2")]
        assert second.dynamic_partitions_requests == [dg.AddDynamicPartitionsRequest("pool_shards", ["shard-2"])]

        waiting = _tick(instance, cfg_path, second.cursor)  # gradients of shard-2 not there yet
        assert not waiting.run_requests and "shard-2" in waiting.skip_reason.skip_message

        # What the daemon does with the first tick's requests.
        instance.add_dynamic_partitions("pool_shards", ["shard-2"])
        assert defs.resolve_job_def("shard_job").execute_in_process(instance=instance, partition_key="shard-2").success

        third = _tick(instance, cfg_path, waiting.cursor)
        assert [r.job_name for r in third.run_requests] == ["refresh_job"]
        assert defs.resolve_job_def("refresh_job").execute_in_process(instance=instance).success
        assert not _tick(instance, cfg_path, third.cursor).run_requests

    # From scratch on the union of the three files, under the same adapter.
    doc = yaml.safe_load(cfg_path.read_text())
    doc.update(storage_root=str(tmp_path / "scratch"), adapter={"path": str(tmp_path / "project" / "store" / "adapter")})
    scratch = load_config(doc, base_dir=cfg_path.parent)
    steps.run_all(scratch, log=lambda _: None, agreement_sample=8)
    incremental, reference = _scores(tmp_path / "project" / "store"), _scores(tmp_path / "scratch")
    assert len(incremental) == 160 * 3
    assert incremental[["target_set", "method", "sample_id"]].equals(reference[["target_set", "method", "sample_id"]])
    assert incremental["score"].to_numpy() == pytest.approx(reference["score"].to_numpy(), rel=1e-5, abs=1e-9)


def test_before_the_first_build_files_only_become_partitions(tmp_path):
    cfg_path = make_project(tmp_path / "project", save_tiny_model(tmp_path / "model"), n_pool=20, n_target=4)
    with dg.DagsterInstance.ephemeral() as instance:
        first = _tick(instance, cfg_path, None)
        assert not first.run_requests and "no LoRA adapter yet" in first.skip_reason.skip_message
        assert first.dynamic_partitions_requests == [
            dg.AddDynamicPartitionsRequest("pool_shards", ["shard-0", "shard-1"])]


def test_changed_file_requests_its_partition_again(tmp_path):
    cfg_path = make_project(tmp_path / "project", save_tiny_model(tmp_path / "model"), n_pool=20, n_target=4)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("pool_shards", ["shard-0", "shard-1"])  # as after a first build
        instance.report_runless_asset_event(dg.AssetMaterialization("lora_adapter"))
        first = _tick(instance, cfg_path, None)
        assert not first.run_requests
        write_shard(cfg_path.parent / "pool", "shard-1", 12, seed=3)
        again = _tick(instance, cfg_path, first.cursor)
        assert [(r.job_name, r.partition_key) for r in again.run_requests] == [("shard_job", "shard-1")]
        assert not again.dynamic_partitions_requests  # the partition exists: only its rows are redone


def test_nightly_schedule_requests_a_refresh():
    ctx = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 1, 2, 3, 0, tzinfo=UTC))
    requests = nightly_refresh.evaluate_tick(ctx).run_requests
    assert len(requests) == 1
    assert nightly_refresh.job_name == "refresh_job"
    assert nightly_refresh.cron_schedule == "0 3 * * *" and nightly_refresh.execution_timezone == "UTC"
    job = build_definitions("unused.yaml").resolve_job_def(nightly_refresh.job_name)
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {
        "target_sets", "curvature", "target_queries", "influence_scores", "curated_subset", "mislabel_report"}
