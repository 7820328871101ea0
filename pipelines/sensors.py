"""Sensor watching the pool folder: new or changed data files become shard partitions.

Each tick compares the files ``discover_shards`` finds with the cursor (file -> size and mtime):

1. New or changed files: ``AddDynamicPartitionsRequest`` for the new shard keys and one ``shard_job``
   run per changed shard (ingest + gradients for that shard only). The shards become *pending*.
2. No file changes, shards pending: once every pending shard has a ``lora_gradients`` materialization
   recorded after the request, one ``refresh_job`` run re-merges curvature and re-scores everything.

Files whose partition already exists when the sensor first sees them (a ``hyperinf run`` built them) are
recorded without a run; before the first full build (no LoRA adapter yet) new files only become
partitions. The cursor is JSON: ``{"files": {shard: signature}, "pending": [...], "after": id}``.
"""

import json
import os
from dataclasses import asdict, dataclass, field

import dagster as dg

from assets_defs.partitions import POOL_SHARDS
from hyperinf_ops.data import discover_shards
from pipelines.jobs import refresh_job, shard_job
from pipelines.resources import HyperinfConfigResource


@dataclass
class PoolCursor:
    """What the sensor has seen: file signatures, shards waiting for gradients, event-log watermark."""

    files: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    after: int = 0

    @classmethod
    def parse(cls, raw: str | None) -> "PoolCursor":
        return cls(**json.loads(raw)) if raw else cls()

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def file_signature(path: os.PathLike | str) -> str:
    """Size and modification time: a changed file gets a new signature (and a new run key)."""
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


@dg.sensor(
    name="pool_folder_sensor",
    jobs=[shard_job, refresh_job],
    minimum_interval_seconds=60,
    description="New data files in the pool folder -> new shard partitions, their gradients, then a refresh.",
)
def pool_folder_sensor(context: dg.SensorEvaluationContext, hyperinf: HyperinfConfigResource):
    cursor = PoolCursor.parse(context.cursor)
    instance = context.instance
    shards = discover_shards(hyperinf.config.data)
    signatures = {key: file_signature(path) for key, path in shards.items()}
    known = set(instance.get_dynamic_partitions(POOL_SHARDS))
    changed = sorted(
        key for key, sig in signatures.items()
        if (key in cursor.files and cursor.files[key] != sig) or (key not in cursor.files and key not in known)
    )
    cursor.files = signatures
    new = [key for key in changed if key not in known]
    partitions = [dg.AddDynamicPartitionsRequest(POOL_SHARDS, new)] if new else []
    if changed and instance.get_latest_materialization_event(dg.AssetKey("lora_adapter")) is None:
        return dg.SensorResult(  # gradients need the adapter: the first full build covers these shards
            skip_reason=f"new shards {changed} but no LoRA adapter yet: materialize every asset once "
                        "(`hyperinf run`, or Materialize all in the UI)",
            dynamic_partitions_requests=partitions,
            cursor=cursor.dump(),
        )
    if changed:
        cursor.pending = sorted(set(cursor.pending) | set(changed))
        cursor.after = instance.event_log_storage.get_maximum_record_id() or 0
        context.log.info(f"pool files changed: {changed} (new partitions: {new})")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(run_key=f"{key}@{signatures[key]}", job_name=shard_job.name, partition_key=key)
                for key in changed
            ],
            dynamic_partitions_requests=partitions,
            cursor=cursor.dump(),
        )
    if not cursor.pending:
        return dg.SensorResult(skip_reason="no new or changed pool files", cursor=cursor.dump())
    done = _gradients_materialized_since(instance, cursor.pending, cursor.after)
    waiting = sorted(set(cursor.pending) - done)
    if waiting:
        return dg.SensorResult(skip_reason=f"waiting for the gradients of {waiting}", cursor=cursor.dump())
    run_key = f"refresh@{cursor.after}:{','.join(cursor.pending)}"
    cursor.pending = []
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=run_key, job_name=refresh_job.name)], cursor=cursor.dump()
    )


def _gradients_materialized_since(instance: dg.DagsterInstance, shards: list[str], after: int) -> set[str]:
    """Shard keys whose ``lora_gradients`` partition was materialized after event-log record ``after``."""
    key = dg.AssetKey("lora_gradients")
    return {
        shard for shard in shards
        if instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[shard], after_storage_id=after), limit=1
        ).records
    }
