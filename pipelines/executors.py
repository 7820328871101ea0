"""Which Dagster executor runs the steps: chosen by the environment, so one code location serves every deployment.

``HYPERINF_EXECUTOR``:

- ``in_process`` (default): every step of a run in the process that runs it (one machine; torch imported once).
- ``dask``: every step in a worker of the dask cluster whose scheduler is ``HYPERINF_DASK_SCHEDULER``
  (``tcp://host:8786``). Long-lived workers keep torch imported and the model loaded between steps.
- ``k8s``: every step as its own Kubernetes Job (dagster-k8s); image, namespace, volumes and environment come
  from the instance's ``K8sRunLauncher`` (docs/deploy.md).

The distributed executors need what Dagster's multi-process executors need: a reconstructable job (runs of the
code location are), a persistent instance that every worker reaches (PostgreSQL for more than one machine) and
outputs in shared storage (the assets write only under the config's ``storage_root``, a shared folder).
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import dagster as dg

__all__ = ["EXECUTOR_ENV_VAR", "SCHEDULER_ENV_VAR", "ExecutorKind", "executor_from_env", "executor_kind"]

EXECUTOR_ENV_VAR = "HYPERINF_EXECUTOR"
SCHEDULER_ENV_VAR = "HYPERINF_DASK_SCHEDULER"

ExecutorKind = Literal["in_process", "dask", "k8s"]


def executor_kind() -> ExecutorKind:
    """``$HYPERINF_EXECUTOR`` (default ``in_process``); a ValueError names the allowed values."""
    kind = os.environ.get(EXECUTOR_ENV_VAR) or "in_process"
    if kind not in get_args(ExecutorKind):
        raise ValueError(f"{EXECUTOR_ENV_VAR}={kind!r}: expected one of {', '.join(get_args(ExecutorKind))}")
    return kind  # type: ignore[return-value]


def executor_from_env() -> dg.ExecutorDefinition:
    """The executor of every job of the code location, as the environment asks (module docstring)."""
    kind = executor_kind()
    if kind == "dask":
        address = os.environ.get(SCHEDULER_ENV_VAR)
        if not address:
            raise ValueError(f"{EXECUTOR_ENV_VAR}=dask needs {SCHEDULER_ENV_VAR}=tcp://host:port (the dask scheduler)")
        from pipelines.dask_executor import dask_executor

        return dask_executor.configured({"cluster": {"existing": {"address": address}}}, name="dask")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    return dg.in_process_executor
