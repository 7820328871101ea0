"""Gradient shards in parallel on a dask cluster, with every piece a multi-machine deployment has started here: a
PostgreSQL Dagster instance, a dask scheduler, two worker processes, a shared storage folder. `hyperinf run` with
``HYPERINF_EXECUTOR=dask`` computes four shards across the two workers: exactly the rows of a serial in-process
run, every shard's step once, in both workers and never in the launching process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
from dask.distributed import Client
from hyperinf_project import make_project
from local_cluster import dask_cluster, postgres_cluster
from tiny_models import save_tiny_model

from hyperinf_ops.config import load_config
from hyperinf_ops.store import LanceStore
from pipelines.runner import materialize_all

pytestmark = pytest.mark.slow

SHARDS = [f"shard-{i}" for i in range(4)]
PROJECT = {"n_pool": 160, "n_shards": 4, "n_target": 40}
# Everything a stored gradient row holds; the rows of both runs must match value for value.
ROW_COLUMNS = ("sample_id", "shard", "content_hash", "grad", "grad_scale", "block_scales", "sq_norms", "fingerprint")
WORKER_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "DAGSTER_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def _rows(store: LanceStore, shard: str) -> pa.Table:
    table = store.open("gradients").to_table(filter=f"shard = '{shard}'")
    return table.select([c for c in ROW_COLUMNS if c in table.column_names]).sort_by("sample_id")


def _step_events(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[dg.EventLogEntry]:
    return [r.event_log_entry for r in
            instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_START).records]


def test_four_shards_on_two_dask_workers_equal_a_serial_run(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("tiny_bert"))
    # The serial reference: the default in-process executor, in this process.
    serial_cfg = make_project(tmp_path_factory.mktemp("serial"), model, **PROJECT)
    with dg.instance_for_test() as instance:
        materialize_all(instance, serial_cfg, load_config(serial_cfg), log=lambda _: None)
    serial = LanceStore(str(load_config(serial_cfg).storage_root))

    # The same project again, in a folder every worker sees (here: this machine's disk).
    shared_cfg = make_project(tmp_path_factory.mktemp("shared"), model, **PROJECT)
    home = tmp_path_factory.mktemp("dagster_home")
    logs = tmp_path_factory.mktemp("logs")
    with postgres_cluster() as url, dask_cluster(2, WORKER_ENV, logs) as scheduler:
        (home / "dagster.yaml").write_text(f"storage:\n  postgres:\n    postgres_url: \"{url}\"\n"
                                           "telemetry:\n  enabled: false\n")
        with Client(scheduler) as client:
            client.wait_for_workers(2, timeout=60)
            worker_pids = set(client.run(os.getpid).values())
        env = {**os.environ, **WORKER_ENV, "HYPERINF_EXECUTOR": "dask", "HYPERINF_DASK_SCHEDULER": scheduler}
        cli = subprocess.run([str(Path(sys.executable).parent / "hyperinf"), "run", "--config", str(shared_cfg),
                              "--dagster-home", str(home)], env=env, capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert f"gradients of shards {SHARDS} in parallel (dask executor)" in cli.stdout

        with dg.DagsterInstance.from_config(str(home)) as instance:
            runs = instance.get_runs()
            gradient_runs = [r for r in runs if r.job_name == "shard_job" and
                             r.asset_selection == {dg.AssetKey("lora_gradients")}]
            assert sorted(r.tags["dagster/partition"] for r in gradient_runs) == SHARDS  # every shard once
            assert all(r.is_success for r in runs)
            starts = {r.tags["dagster/partition"]: _step_events(instance, r) for r in gradient_runs}
            every_step = [e for r in runs for e in _step_events(instance, r)]

    # each shard's gradient step started exactly once, in a worker process, and both workers took steps
    assert {shard: [e.step_key for e in events].count("lora_gradients") for shard, events in starts.items()} == \
        dict.fromkeys(SHARDS, 1)
    gradient_pids = {e.dagster_event.pid for events in starts.values() for e in events}
    assert os.getpid() not in gradient_pids and gradient_pids <= worker_pids
    assert {e.dagster_event.pid for e in every_step} == worker_pids
    # the rows are the serial run's, byte for byte
    shared = LanceStore(str(load_config(shared_cfg).storage_root))
    for shard in SHARDS:
        expected, got = _rows(serial, shard), _rows(shared, shard)
        assert expected.num_rows == PROJECT["n_pool"] // 4
        assert got.equals(expected), shard
