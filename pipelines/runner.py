"""Materialize the whole asset graph in-process, in dependency order, into a Dagster instance.

Used by ``hyperinf demo`` / ``hyperinf run`` (and the tests). Every run is recorded in the instance, so
``hyperinf ui`` shows them with their logs, metadata and check results afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dagster as dg

from assets_defs.partitions import POOL_SHARDS
from hyperinf_ops.config import HyperinfConfig
from hyperinf_ops.data import discover_shards
from pipelines.jobs import adapter_job, refresh_job, shard_job

# Only user log lines (progress, warnings) reach the console; Dagster's own events stay in the instance.
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


class PipelineRunError(Exception):
    """A run failed; the message names the step and the error that stopped it."""


def register_shards(instance: dg.DagsterInstance, cfg: HyperinfConfig) -> list[str]:
    """Add a ``pool_shards`` partition for every data file of the pool; returns all shard keys."""
    shards = sorted(discover_shards(cfg.data))
    new = [s for s in shards if not instance.has_dynamic_partition(POOL_SHARDS, s)]
    if new:
        instance.add_dynamic_partitions(POOL_SHARDS, new)
    return shards


def materialize_all(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    cfg: HyperinfConfig,
    *,
    log: Callable[[str], None] = print,
) -> list[dg.ExecuteInProcessResult]:
    """Pool shards -> adapter -> gradient shards -> refresh (curvature ... curated subset, mislabel report)."""
    shards = register_shards(instance, cfg)
    shard, adapter, refresh = (defs.resolve_job_def(j.name) for j in (shard_job, adapter_job, refresh_job))
    results = []
    for key in shards:
        log(f"ingest shard {key}")
        results.append(_run(shard, instance, partition_key=key, assets=["pool_examples"]))
    log("LoRA adapter")
    results.append(_run(adapter, instance))
    # A freshly trained adapter makes every stored gradient row stale: replace them, shard by shard.
    trained = _metadata(results[-1], "lora_adapter").get("source") == "trained"
    config = {"ops": {"lora_gradients": {"config": {"overwrite_stale": trained}}}}
    for key in shards:
        log(f"gradients of shard {key}")
        results.append(_run(shard, instance, partition_key=key, assets=["lora_gradients"], config=config))
    log("refresh: target sets, curvature, queries, scores, curated subset, mislabel report")
    results.append(_run(refresh, instance))
    return results


def _run(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    *,
    partition_key: str | None = None,
    assets: Sequence[str] | None = None,
    config: dict | None = None,
) -> dg.ExecuteInProcessResult:
    result = job.execute_in_process(
        run_config={**QUIET_RUN_CONFIG, **(config or {})},
        instance=instance,
        partition_key=partition_key,
        asset_selection=[dg.AssetKey(a) for a in assets] if assets else None,
        raise_on_error=False,
    )
    if not result.success:
        raise PipelineRunError(failure_message(result))
    return result


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    events = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in events[-1].metadata.items()} if events else {}


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    """``<step>[<partition>] failed: <message of the error the step raised>`` for the first failed step."""
    partition = result.dagster_run.tags.get("dagster/partition")
    where = f"[{partition}]" if partition else ""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            error = event.step_failure_data.error
            while error is not None and error.cause is not None and error.cls_name.startswith("Dagster"):
                error = error.cause
            text = error.message.strip() if error is not None else "unknown error"
            return f"{event.step_key}{where} failed: {text}"
    return f"run {result.run_id} of {result.job_def.name}{where} failed"


def failed_checks(results: Sequence[dg.ExecuteInProcessResult]) -> list[str]:
    """``asset:check: description`` of every asset check that did not pass in these runs."""
    out = []
    for result in results:
        for ev in result.get_asset_check_evaluations():
            if not ev.passed:
                desc = ev.description or ""
                out.append(f"{ev.asset_key.to_user_string()}:{ev.check_name}{': ' + desc if desc else ''}")
    return out
