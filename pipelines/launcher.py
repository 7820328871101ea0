"""Launch the code location's jobs from this process, as the UI would, and execute them right here.

A run made by ``execute_in_process`` has no code-location origin, so the UI leaves it off the Overview timeline
and off its job's Runs tab. Here every run is created from the *remote* job of the ``hyperinf`` code location
(an in-process location of ``pipelines.definitions``, named like the one ``workspace.yaml`` loads), exactly as
``dagster job launch`` or a UI launch creates it (origin, repository tag, partition tag, asset selection), and
is then executed synchronously in this process with Dagster's own ``execute_run``: with the in-process executor
the steps of one ``hyperinf run`` share one Python process (torch imported once, the model loaded once); with a
distributed one (pipelines/executors.py) this process orchestrates and the steps run in the workers, and
``run_many`` executes several runs at once (the gradient shards), each orchestrated in its own process by
``dagster api execute_run``, the command Dagster's own run launchers start.

Every run is tagged with the host and pid of the process that executes it (HOST_TAG, PID_TAG): a run whose
process was killed stays STARTED in the instance and, with one run at a time (dagster.yaml), blocks the queue;
`fail_orphaned_runs` marks such runs failed (``hyperinf run|demo|ui`` call it when they start).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from dagster._core.definitions.selector import JobSubsetSelector
from dagster._core.execution.api import execute_run
from dagster._core.instance.ref import InstanceRef
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.remote_representation.code_location import CodeLocation
from dagster._core.storage.tags import PARTITION_NAME_TAG
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._grpc.types import ExecuteRunArgs
from dagster._utils.error import SerializableErrorInfo
from dagster._utils.hosted_user_process import recon_job_from_origin
from dagster_shared.serdes import serialize_value

from assets_defs.resources import CONFIG_ENV_VAR
from hyperinf_ops.errors import HyperinfError
from hyperinf_ops.store.lease import process_alive
from pipelines.instance import LOCATION_NAME
from pipelines.loggers import run_config_loggers

__all__ = ["HOST_TAG", "PID_TAG", "Launcher", "PipelineRunError", "fail_orphaned_runs", "failure_message"]

DEFINITIONS_MODULE = "pipelines.definitions"
LOG_FOLDER = "logs"  # under the instance's folder: the full trace of every failed CLI run
HOST_TAG = "hyperinf/host"  # the host of the process executing the run
PID_TAG = "hyperinf/pid"  # that process's id


class PipelineRunError(HyperinfError):
    """A run failed; the message names the step, the error that stopped it and the file with its trace."""


class Launcher:
    """Creates and executes runs of the ``hyperinf`` code location in one Dagster instance."""

    def __init__(self, instance: dg.DagsterInstance, location: CodeLocation, config_path: str | Path, *,
                 verbose: bool = False) -> None:
        self.instance, self.location = instance, location
        self.repository = location.get_repository("__repository__")
        # Quiet: only the steps' own lines reach the terminal (pipelines/loggers.py); verbose: every event.
        # The config file is named in the run config, not only in this process's environment: a step that runs
        # in another process (a dask worker, a Kubernetes pod) reads the same file.
        self.run_config = {"loggers": run_config_loggers(verbose),
                           "resources": {"hyperinf": {"config": {"config_path": str(config_path)}}}}

    @classmethod
    @contextmanager
    def open(cls, instance: dg.DagsterInstance, config_path: str | Path, *, verbose: bool = False) -> Iterator[Launcher]:
        """A launcher whose runs read the config at `config_path` (named in each run's config, and in
        ``$HYPERINF_CONFIG`` while it is open, restored afterwards)."""
        origin = InProcessCodeLocationOrigin(
            LoadableTargetOrigin(executable_path=sys.executable, module_name=DEFINITIONS_MODULE,
                                 working_directory=str(Path(__file__).resolve().parents[1])),
            location_name=LOCATION_NAME)
        previous = os.environ.get(CONFIG_ENV_VAR)
        os.environ[CONFIG_ENV_VAR] = str(config_path)
        try:
            with origin.create_location(instance) as location:
                yield cls(instance, location, Path(config_path).resolve(), verbose=verbose)
        finally:
            if previous is None:
                os.environ.pop(CONFIG_ENV_VAR, None)
            else:
                os.environ[CONFIG_ENV_VAR] = previous

    def run(self, job_name: str, *, partition_key: str | None = None, assets: Sequence[str] | None = None,
            tags: Mapping[str, str] | None = None) -> dg.DagsterRun:
        """Create the run as a UI launch would and execute it here; PipelineRunError if it fails."""
        return self._execute(self._create(job_name, partition_key, assets, tags))

    def run_many(self, job_name: str, partition_keys: Iterable[str], *, assets: Sequence[str] | None = None,
                 tags: Mapping[str, str] | None = None) -> Iterator[dg.DagsterRun]:
        """One run per partition, all executing at once, yielded as they succeed; PipelineRunError for the first
        that failed, once every run has finished.

        Each run is orchestrated by its own ``dagster api execute_run`` process (its steps go to the distributed
        executor's workers). Not threads: a run's start configures Python logging (``dictConfig`` of the
        instance's ``python_logs`` settings), which closes other runs' handlers and deadlocks against a thread
        that is logging an event."""
        runs = [self._create(job_name, key, assets, tags) for key in partition_keys]
        ref = self.instance.get_ref()
        started = []
        for run in runs:
            process = subprocess.Popen(_execute_run_command(run, ref))
            # That process executes the run and outlives a kill of this one: its run is orphaned only once it ends.
            self.instance.add_run_tags(run.run_id, {PID_TAG: str(process.pid)})
            started.append((run, process))
        failure: PipelineRunError | None = None
        # The threads only wait for the processes; every Dagster call stays in this thread.
        with ThreadPoolExecutor(max_workers=max(len(runs), 1), thread_name_prefix="hyperinf-run") as pool:
            waits = {pool.submit(process.wait): run for run, process in started}
            for done in as_completed(waits):
                done.result()  # the process ran (its exit status says nothing the run's status does not)
                try:
                    yield self._finished(waits[done])
                except PipelineRunError as err:
                    failure = failure or err
        if failure is not None:
            raise failure

    def _create(self, job_name: str, partition_key: str | None, assets: Sequence[str] | None,
                tags: Mapping[str, str] | None) -> dg.DagsterRun:
        selector = JobSubsetSelector(
            location_name=self.location.name, repository_name=self.repository.name, job_name=job_name,
            op_selection=None, asset_selection=[dg.AssetKey(a) for a in assets] if assets else None)
        remote_job = self.location.get_job(selector)
        plan = self.location.get_execution_plan(remote_job, self.run_config, step_keys_to_execute=None,
                                                known_state=None, instance=self.instance)
        run_tags = {**remote_job.tags, **(tags or {}), HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
        if partition_key is not None:
            run_tags[PARTITION_NAME_TAG] = partition_key
        return self.instance.create_run(
            job_name=job_name, run_id=None, run_config=self.run_config,
            resolved_op_selection=remote_job.resolved_op_selection,
            step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute, op_selection=None,
            status=None, root_run_id=None, parent_run_id=None, tags=run_tags, job_snapshot=remote_job.job_snapshot,
            execution_plan_snapshot=plan.execution_plan_snapshot, parent_job_snapshot=remote_job.parent_job_snapshot,
            remote_job_origin=remote_job.get_remote_origin(), job_code_origin=remote_job.get_python_origin(),
            asset_selection=frozenset(selector.asset_selection) if assets else None, asset_check_selection=None,
            asset_graph=self.repository.asset_graph)

    def _execute(self, run: dg.DagsterRun) -> dg.DagsterRun:
        execute_run(recon_job_from_origin(run.job_code_origin), run, self.instance)
        return self._finished(run)

    def _finished(self, run: dg.DagsterRun) -> dg.DagsterRun:
        """The run as stored after it ended; PipelineRunError if it did not succeed."""
        finished = self.instance.get_run_by_id(run.run_id)
        if not finished.is_success:
            raise PipelineRunError(failure_message(self.instance, finished))
        return finished


def fail_orphaned_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Mark failed every run of this host still STARTING or STARTED whose executing process (PID_TAG) is gone,
    e.g. a `hyperinf run` killed mid-step; returns them. Such a run holds the one run slot of the queue forever
    (Dagster's run monitoring cannot see a dead worker of the default run launcher, dagster.yaml)."""
    host = socket.gethostname()
    records = instance.get_run_records(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED], tags={HOST_TAG: host}))
    orphans = []
    for record in records:
        run = record.dagster_run
        pid = int(run.tags.get(PID_TAG, "0"))
        if pid and not process_alive(pid):
            instance.report_run_failed(run, message=f"the process that executed this run (pid {pid} on {host}) "
                                                    "ended without finishing it (killed or crashed)")
            orphans.append(run)
    return orphans


def _execute_run_command(run: dg.DagsterRun, instance_ref: InstanceRef) -> list[str]:
    """``python -m dagster api execute_run <args>`` for `run`, with this interpreter (its origin names the bare
    ``dagster`` entry point, which is on PATH only in an activated virtual environment)."""
    args = ExecuteRunArgs(job_origin=run.job_code_origin, run_id=run.run_id, instance_ref=instance_ref)
    return [sys.executable, "-m", "dagster", "api", "execute_run", serialize_value(args)]


def failure_message(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    """``<step>[<partition>] failed: <message of the error the step raised> (full trace: <file>)`` for the first
    failed step; the file (``<instance>/logs/<run id>.log``) holds the error with its causes and stack traces."""
    partition = run.tags.get(PARTITION_NAME_TAG)
    where = f"[{partition}]" if partition else ""
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in records:
        event = record.event_log_entry.dagster_event
        error = event.step_failure_data.error if event is not None and event.step_failure_data else None
        if error is None:
            continue
        trace = _write_trace(instance, run, error.to_string())
        while error.cause is not None and error.cls_name.startswith("Dagster"):
            error = error.cause
        return f"{event.step_key}{where} failed: {_error_text(error)} (full trace: {trace})"
    return f"run {run.run_id} of {run.job_name}{where} failed (its events: `hyperinf ui`, Runs)"


def _error_text(error: SerializableErrorInfo) -> str:
    """hyperinf's own errors whole, without their module path (their message is written for a person, e.g. every
    config problem on its own line); any other error's first line, with its class (the trace file has the rest)."""
    text = error.message.strip()
    own = f"hyperinf_ops.errors.{error.cls_name}: "
    if text.startswith(own):
        return text.removeprefix(own)
    return text.splitlines()[0] if text else error.cls_name


def _write_trace(instance: dg.DagsterInstance, run: dg.DagsterRun, trace: str) -> Path:
    folder = Path(instance.root_directory) / LOG_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run.run_id}.log"
    path.write_text(f"run {run.run_id} of {run.job_name} {dict(run.tags)}\n\n{trace}", encoding="utf-8")
    return path
