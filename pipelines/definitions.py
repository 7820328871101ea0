"""The hyperinf code location: assets, asset checks, jobs, the pool sensor, automation, the nightly schedule.

Load it with ``dagster dev -w workspace.yaml`` (or ``hyperinf ui``). The YAML config reaches every run through
the ``hyperinf`` resource; in this module its path is ``$HYPERINF_CONFIG``, read when a run starts.

Executor: in-process unless ``$HYPERINF_EXECUTOR`` says ``dask`` or ``k8s`` (pipelines/executors.py; the code
location is the same either way). On one machine steps are torch-heavy and cores few: one process per run avoids
re-importing torch/transformers per step (~350 MB and ~3 s each) and the instance's run queue
(``max_concurrent_runs: 1`` in pipelines/dagster.yaml) keeps runs from competing for the cores. With several
machines, the gradient shards run in parallel on a dask cluster or as Kubernetes Jobs (docs/deploy.md).
"""

from __future__ import annotations

import dagster as dg

from assets_defs import ASSET_CHECKS, ASSETS
from assets_defs.resources import CONFIG_ENV_VAR, HyperinfResource
from pipelines.executors import executor_from_env
from pipelines.jobs import adapter_job, refresh_job, shard_job
from pipelines.loggers import LOGGERS
from pipelines.schedules import nightly_refresh
from pipelines.sensors import automation_sensor, pool_folder_sensor


def build_definitions(config_path: str | None = None) -> dg.Definitions:
    """The Definitions, on ``config_path`` when given, else on ``$HYPERINF_CONFIG`` at run time; the executor
    ``$HYPERINF_EXECUTOR`` names."""
    resource = HyperinfResource(config_path=config_path or dg.EnvVar(CONFIG_ENV_VAR))
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=ASSET_CHECKS,
        jobs=[shard_job, adapter_job, refresh_job],
        sensors=[pool_folder_sensor, automation_sensor],
        schedules=[nightly_refresh],
        resources={"hyperinf": resource},
        loggers=LOGGERS,
        executor=executor_from_env(),
    )


defs = build_definitions()
