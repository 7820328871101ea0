"""``hyperinf run`` / ``hyperinf demo`` as Dagster runs: decide what is needed with the core's own rules, then
launch exactly that through the code location (runs the UI shows on its timeline and job pages).

    (nothing, if a check fails)          -                            stages.preflight.preflight
    pool shards whose file changed       shard_job [pool_examples]    stages.preflight (rows differ)
    shards whose file is gone (unless    shard_job [pool_examples]    stages.pool.gone_shards (an ingest first
    an ingest removed them)              (removes the shard)          removes those holding its ids: a rename)
    the adapter, if not the asked one,   adapter_job                  stages.adapter.adapter_pending,
    or the rows' whitening if missing                                  stages.codec.codec_pending
    shards whose gradients are stale     shard_job [lora_gradients]   stages.freshness.gradient_shard_current
    unless nothing it reads changed      refresh_job                  stages.refresh_record (an identical run
    since the last one                                                writes nothing)

The assets apply the same rules when launched from the UI or by automation, so a current shard is never
recomputed whoever asks. With a distributed executor (``$HYPERINF_EXECUTOR``, pipelines/executors.py) the stale
shards' gradient runs execute at once, their steps spread over the workers; in-process they run one after another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from assets_defs.partitions import POOL_SHARDS, missing_partitions
from hyperinf_ops.config import HyperinfConfig
from hyperinf_ops.progress import ProgressMeter
from hyperinf_ops.stages.preflight import PreflightSummary, preflight
from hyperinf_ops.stages.refresh_record import REFRESH_RECORD, current_refresh, save_refresh_record
from hyperinf_ops.store import LanceStore
from hyperinf_ops.store.lease import INVOCATION_TAG, LeaseHolder, hold_root
from pipelines.executors import executor_kind
from pipelines.jobs import adapter_job, refresh_job, shard_job
from pipelines.launcher import Launcher
from pipelines.sensors import pool_file_observation

__all__ = ["INVOCATION_TAG", "RunReport", "failed_checks", "materialize_all"]


@dataclass
class RunReport:
    """The runs one `materialize_all` launched and what they were for."""

    runs: list[dg.DagsterRun] = field(default_factory=list)
    ingested: list[str] = field(default_factory=list)  # shards whose rows changed
    removed: list[str] = field(default_factory=list)  # shards whose pool file was gone: their rows were removed
    adapter: bool = False  # the adapter step ran (train, copy, or switch to a stored one)
    gradients: list[str] = field(default_factory=list)  # shards whose gradients were computed


def materialize_all(instance: dg.DagsterInstance, config_path: str | Path, cfg: HyperinfConfig, *,
                    log: Callable[[str], None] = print, verbose: bool = False,
                    checked: PreflightSummary | None = None, lease: LeaseHolder | None = None) -> RunReport:
    """Everything the config asks for, as the fewest runs the rules of the module docstring allow, after the
    preflight checks (`checked`, run here when not given): a mistake in the data ends there, before any run or
    write. `verbose`: every Dagster event on the console (default: the steps' own lines). `lease`: the caller's
    hold on the storage root (store/lease.py), else it is taken here (RootInUseError if another run has it);
    every run is tagged with its invocation id."""
    with nullcontext(lease) if lease is not None else hold_root(cfg.storage_root, config_path) as held:
        return _materialize_all(instance, config_path, cfg, log=log, verbose=verbose, checked=checked,
                                invocation=held.invocation)


def _materialize_all(instance: dg.DagsterInstance, config_path: str | Path, cfg: HyperinfConfig, *,
                     log: Callable[[str], None], verbose: bool, checked: PreflightSummary | None,
                     invocation: str) -> RunReport:
    from hyperinf_ops.stages.adapter import adapter_pending
    from hyperinf_ops.stages.codec import codec_pending, row_fingerprint
    from hyperinf_ops.stages.freshness import gradient_shard_current
    from hyperinf_ops.stages.pool import gone_shards

    store = LanceStore(str(cfg.storage_root))
    if checked is None:
        checked = preflight(store, cfg, log=log)
    files = checked.shards
    # A gone shard keeps its partition (its history stays; a file of that name again reuses it): the removal is
    # that partition's pool_examples materialization.
    new = missing_partitions(instance, [*files, *checked.gone])
    if new:
        instance.add_dynamic_partitions(POOL_SHARDS, new)
    _observe_changed(instance, files)
    report = RunReport(ingested=checked.pending, removed=checked.gone)
    tags = {INVOCATION_TAG: invocation}
    with Launcher.open(instance, config_path, verbose=verbose) as launcher:
        for shard in report.ingested:
            log(f"ingest shard {shard}")
            report.runs.append(launcher.run(shard_job.name, partition_key=shard, assets=["pool_examples"], tags=tags))
        for shard in gone_shards(store, files):  # those no ingest removed (none held the ingested ids)
            log(f"remove shard {shard} (its pool file is gone)")
            report.runs.append(launcher.run(shard_job.name, partition_key=shard, assets=["pool_examples"], tags=tags))
        settings = cfg.gradient_settings
        if adapter_pending(store, cfg.model_spec, cfg.lora, cfg.train, cfg.adapter.path) or \
                codec_pending(store, settings):
            log("LoRA adapter and row codec")
            report.adapter = True
            report.runs.append(launcher.run(adapter_job.name, tags=tags))
        fingerprint = row_fingerprint(store, settings)
        report.gradients = [s for s in files if not gradient_shard_current(store, s, fingerprint)]
        # One line per shard run with the rate and ETA of the whole gradient pass (the run logs its own rows).
        meter = ProgressMeter("gradient pass", len(report.gradients), lambda e: log(str(e)), unit="shards", every=1)
        if executor_kind() == "in_process":
            runs = _one_by_one(launcher, report.gradients, tags, log)
        else:
            log(f"gradients of shards {report.gradients} in parallel ({executor_kind()} executor)")
            runs = launcher.run_many(shard_job.name, report.gradients, assets=["lora_gradients"], tags=tags)
        for run in runs:
            report.runs.append(run)
            meter.update(1)
        last = current_refresh(cfg, store)
        if last is not None and instance.has_run(last):
            log(f"refresh: nothing it reads changed since the last one (tables, config, target and test files, "
                f"code; {REFRESH_RECORD}): the stored scores and export are current, nothing written")
            return report
        skipped = sorted(set(files) - set(report.gradients))
        log("refresh: target sets, preconditioners, queries, scores, curated subset, mislabel report"
            + (f" (gradients of {len(skipped)} shards were current: {skipped})" if skipped else ""))
        refresh = launcher.run(refresh_job.name, tags=tags)
        report.runs.append(refresh)
    if not failed_checks(instance, [refresh]):  # a failed check shows again at the next run
        save_refresh_record(cfg, store, refresh.run_id)
    return report


def _one_by_one(launcher: Launcher, shards: list[str], tags: dict[str, str],
                log: Callable[[str], None]) -> Iterator[dg.DagsterRun]:
    """The shards' gradient runs one after another, each announced as it starts."""
    for shard in shards:
        log(f"gradients of shard {shard}")
        yield launcher.run(shard_job.name, partition_key=shard, assets=["lora_gradients"], tags=tags)


def _observe_changed(instance: dg.DagsterInstance, files: dict[str, Path]) -> None:
    """Record the files this run reads as ``pool_files`` observations (where their content is new to the
    instance), so the UI's staleness and the automation sensor see what the run saw."""
    for shard, path in files.items():
        observation = pool_file_observation(shard, path)
        latest = instance.get_latest_data_version_record(dg.AssetKey("pool_files"), is_source=True,
                                                         partition_key=shard)
        seen = latest.asset_observation.data_version if latest and latest.asset_observation else None
        if seen != observation.data_version:
            instance.report_runless_asset_event(observation)


def failed_checks(instance: dg.DagsterInstance, runs: list[dg.DagsterRun]) -> list[str]:
    """``asset:check: description`` of every asset check that did not pass in these runs."""
    out = []
    for run in runs:
        records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
        for record in records:
            evaluation = record.event_log_entry.dagster_event.event_specific_data
            if not evaluation.passed:
                desc = evaluation.description or ""
                out.append(f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
                           f"{': ' + desc if desc else ''}")
    return out
