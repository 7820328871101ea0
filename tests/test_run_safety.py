"""Failure and recovery: one writer per storage root (store/lease.py), and a killed `hyperinf run` whose Dagster
run would otherwise stay STARTED forever and block the one-run-at-a-time queue (launcher.fail_orphaned_runs)."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.run_coordinator import SubmitRunContext
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
from hyperinf_project import make_project
from tiny_models import save_tiny_model

from assets_defs.resources import HyperinfResource
from hyperinf_ops.store import LanceStore
from hyperinf_ops.store.lease import INVOCATION_TAG, LEASE_FILE, RootInUseError, hold_root, share_root
from pipelines.instance import open_instance
from pipelines.launcher import PID_TAG, Launcher

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_pool": 40, "n_target": 10, "estimators": ["hyperinf"]}
REFUSAL = re.compile(r"hyperinf: error: storage root (\S+) is in use by another hyperinf run \(pid (\d+), config (\S+), "
                     r"since [\d-]+ [\d:]+\): wait for it, or use another storage_root\n")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


def _start(config: Path, command: str = "run", *options: str) -> subprocess.Popen:
    """`hyperinf <command> --config config` as its own process, its output captured line by line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", command, "--config", str(config), *options],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _with_rank(config: Path, rank: int) -> Path:
    """A copy of `config` next to it (same storage root, same instance) with another LoRA rank."""
    doc = yaml.safe_load(config.read_text())
    doc["lora"]["rank"] = rank
    path = config.with_name(f"rank{rank}.yaml")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _assert_results_made_with_rank(root: Path, home: Path, rank: int) -> None:
    """The stored gradients and scores, the current adapter and the adapter the instance reports are one
    adapter, of LoRA rank `rank`."""
    store = LanceStore(str(root))
    fingerprints = {table: store.fingerprint(table) for table in ("gradients", "queries", "scores")}
    assert {fp.rank for fp in fingerprints.values()} == {rank}
    current = json.loads((root / "adapters" / "current.json").read_text())
    assert current["rank"] == rank
    with open_instance(home) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("lora_adapter"))
        reported = event.asset_materialization.metadata["adapter_hash"].value
    assert {fp.adapter_hash for fp in fingerprints.values()} == {current["adapter_hash"]} == {reported}


def test_two_runs_on_one_root_one_is_refused_and_results_are_its_own(tmp_path, tiny_model):
    configs = {4: make_project(tmp_path, tiny_model, **SMALL)}
    configs[8] = _with_rank(configs[4], 8)
    procs = {rank: _start(config) for rank, config in configs.items()}
    done = {rank: (*proc.communicate(timeout=180), proc.returncode) for rank, proc in procs.items()}
    refused = [rank for rank, (_, _, status) in done.items() if status == 2]
    assert len(refused) == 1, done
    loser, winner = refused[0], 12 - refused[0]
    out, err, _ = done[loser]
    match = REFUSAL.fullmatch(err)
    assert match, err
    assert (match[1], int(match[2]), match[3]) == (str(tmp_path / "store"), procs[winner].pid, str(configs[winner]))
    assert out == ""  # refused before the preflight, the instance or any run
    assert done[winner][2] in (0, 1), done[winner]  # ran to the end (1: an asset check of the tiny model failed)
    _assert_results_made_with_rank(tmp_path / "store", tmp_path / ".dagster_home", winner)
    # Once the first has ended, the other runs (a rank change on one root first moves the old rank's tables
    # away, `hyperinf migrate`), and the results are then its own.
    migrate = _start(configs[loser], "migrate", "--yes")
    assert migrate.wait(timeout=60) == 0, migrate.stderr.read()
    second = _start(configs[loser])
    out, err = second.communicate(timeout=180)
    assert second.returncode in (0, 1), err
    _assert_results_made_with_rank(tmp_path / "store", tmp_path / ".dagster_home", loser)
    assert (tmp_path / "store" / LEASE_FILE).read_text() == ""  # no holder left behind


def _wait_for(proc: subprocess.Popen, text: str) -> list[str]:
    """`proc`'s stdout lines up to the first that contains `text`."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"the run ended without printing {text!r}: {''.join(lines)}{proc.stderr.read()}")


def _enqueue(instance: dg.DagsterInstance, config: Path) -> dg.DagsterRun:
    """A refresh_job run of the code location submitted to the instance's queue, as the UI submits one."""
    with Launcher.open(instance, config) as launcher:
        run = launcher._create("refresh_job", None, None, None)
    return instance.run_coordinator.submit_run(SubmitRunContext(run, workspace=None))


def _dequeued(instance: dg.DagsterInstance) -> list[str]:
    """Ids of the runs one tick of Dagster's queued-run daemon would launch now."""
    daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
    return [r.run_id for r in daemon._get_runs_to_dequeue(instance, instance.get_concurrency_config(), None)]


def test_a_killed_run_is_marked_failed_at_the_next_start_and_frees_the_queue(tmp_path, tiny_model):
    # enough warm-up epochs that the kill lands inside the lora_adapter step
    config = make_project(tmp_path, tiny_model, **SMALL, train={"epochs": 40, "lr": 3.0e-2, "batch_size": 8, "seed": 0})
    home = tmp_path / ".dagster_home"
    proc = _start(config)
    _wait_for(proc, "lora_adapter: warm-up: ")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open_instance(home) as instance:
        stuck = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        assert [(r.job_name, r.tags[PID_TAG]) for r in stuck] == [("adapter_job", str(proc.pid))]
        queued = _enqueue(instance, config)
        assert queued.status == dg.DagsterRunStatus.QUEUED and _dequeued(instance) == []  # blocked by the dead run

    again = _start(config)
    out, err = again.communicate(timeout=180)
    assert again.returncode in (0, 1), err
    killed = stuck[0]
    assert f"run {killed.run_id} of adapter_job was left STARTED by process {proc.pid}, which is gone: marked " \
           "failed\n" in out
    with open_instance(home) as instance:
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
        failure = instance.get_records_for_run(killed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
        assert f"(pid {proc.pid} on " in failure[0].event_log_entry.dagster_event.message
        assert instance.get_run_records(filters=dg.RunsFilter(statuses=IN_PROGRESS_RUN_STATUSES)) == []
        assert _dequeued(instance) == [queued.run_id]  # the queue moves again
        newest = instance.get_runs(limit=1)[0]  # the last run of the second `hyperinf run`: it completed
        second = instance.get_runs(filters=dg.RunsFilter(tags={INVOCATION_TAG: newest.tags[INVOCATION_TAG]}))
        assert second[0].job_name == "refresh_job" and all(r.is_success for r in second)


def test_a_step_outside_the_holding_run_refuses_to_start(tmp_path, tiny_model):
    """A run launched from the UI (no invocation tag) fails before its step body runs while a `hyperinf run`
    holds the root; the holder's own runs go ahead; a step holding the root keeps a `hyperinf run` out."""
    config = make_project(tmp_path, tiny_model, **SMALL)
    root = tmp_path / "store"
    bodies: list[str] = []

    @dg.asset
    def writes(hyperinf: HyperinfResource) -> None:
        bodies.append("ran")

    resources = {"hyperinf": HyperinfResource(config_path=str(config))}
    with dg.instance_for_test() as instance, hold_root(root, config) as holder:
        ui = dg.materialize([writes], resources=resources, instance=instance, raise_on_error=False)
        assert not ui.success and bodies == []
        error = ui.get_run_failure_event().event_specific_data.error
        assert "RootInUseError" in error.to_string() and f"pid {os.getpid()}" in error.to_string()
        own = dg.materialize([writes], resources=resources, instance=instance, tags={INVOCATION_TAG: holder.invocation})
        assert own.success and bodies == ["ran"]
    with share_root(root, None), pytest.raises(RootInUseError, match="launched from the UI or by automation"), \
            hold_root(root, config):
        pass


def test_a_root_made_only_for_the_lease_is_removed(tmp_path):
    root = tmp_path / "store"
    with hold_root(root, tmp_path / "hyperinf.yaml"):
        assert (root / LEASE_FILE).is_file()
    assert not root.exists()  # a run refused by its preflight leaves nothing behind
