"""Sensors: the pool folder becomes partitions and observations; Dagster's automation does the rest.

``pool_folder_sensor`` keeps the ``pool_shards`` partitions equal to the pool's data files (a new file adds its
partition) and reports a ``pool_files`` observation whose data version is the file's sha256 whenever a file's
size or mtime changed (the cursor holds the signatures), and the data version ``removed`` when a file is gone
(deleted or renamed: its partition's ``pool_examples`` and ``lora_gradients`` then remove the shard's rows). It launches nothing itself: ``hyperinf_automation``
(declarative automation, assets_defs/automation.py) materializes what a new data version makes stale: the
shard's rows, its gradients, then the preconditioners, queries, scores and curated subset once no shard is
still running. Both start switched off, as Dagster's sensors do; turn them on in the UI.
"""

import json
import os

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from assets_defs.partitions import REMOVED, missing_partitions, pool_shards
from assets_defs.resources import HyperinfResource
from hyperinf_ops.data.io import discover_shards, file_digest
from hyperinf_ops.errors import DataError


def pool_file_observation(shard: str, path: os.PathLike | str) -> dg.AssetObservation:
    """A ``pool_files`` observation of one file: data version = the sha256 of its bytes."""
    return dg.AssetObservation("pool_files", partition=shard, tags={DATA_VERSION_TAG: file_digest(path)})


def file_signature(path: os.PathLike | str) -> str:
    """Size and modification time: a changed file gets a new signature (and a new observation)."""
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


@dg.sensor(
    name="pool_folder_sensor",
    minimum_interval_seconds=60,
    description="Pool files -> shard partitions and `pool_files` observations (data version: the file's sha256).",
)
def pool_folder_sensor(context: dg.SensorEvaluationContext, hyperinf: HyperinfResource) -> dg.SensorResult:
    seen = json.loads(context.cursor) if context.cursor else {}
    try:
        files = discover_shards(hyperinf.config.data.path)
    except DataError as err:  # e.g. a file of another type: nothing is marked gone until the folder reads again
        return dg.SensorResult(skip_reason=f"pool folder not read: {err}", cursor=context.cursor)
    signatures = {key: file_signature(path) for key, path in files.items()}
    changed = sorted(key for key, sig in signatures.items() if seen.get(key) != sig)
    gone = sorted(set(seen) - set(signatures))
    new = missing_partitions(context.instance, changed)
    observations = [pool_file_observation(key, files[key]) for key in changed]
    observations += [dg.AssetObservation("pool_files", partition=key, tags={DATA_VERSION_TAG: REMOVED})
                     for key in gone]
    if changed or gone:
        context.log.info(f"pool files new or changed: {changed} (new partitions: {new}); gone: {gone}")
    return dg.SensorResult(
        dynamic_partitions_requests=[pool_shards.build_add_request(new)] if new else [],
        asset_events=observations,
        cursor=json.dumps(signatures, sort_keys=True),
        skip_reason=None if changed or gone else "no new, changed or gone pool files",
    )


automation_sensor = dg.AutomationConditionSensorDefinition(
    "hyperinf_automation",
    target=dg.AssetSelection.all(),
    minimum_interval_seconds=30,
    description="Materializes what new pool data makes stale (assets_defs/automation.py); off until turned on.",
)
