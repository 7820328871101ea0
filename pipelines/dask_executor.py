"""dagster-dask's executor, with two fixes for running partitioned jobs concurrently on dask 2026.

- Task keys name the run. Upstream keys a step's dask task ``<job>.<step>``, and dask treats equal keys as one
  task: concurrent runs of one job (the four shard runs of ``shard_job``) would all receive the events of
  whichever run submitted first, and the other shards would never be computed (dagster-io/dagster#21418). Here
  the key is ``<job>.<step>.<run id>``.
- The step's arguments reach the worker inside a ``functools.partial``. ``Client.submit`` walks tuple arguments
  looking for futures, and a ``DagsterRun`` is a tuple that holds a partition subset which refuses iteration, so
  upstream's ``submit`` of a partitioned run raises before any step starts.

Everything else is dagster-dask's own: its config schema, its worker function (``query_on_dask_worker``: the step
runs in the worker through ``execute_plan`` and writes its events to the instance) and its resource tags.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import dagster as dg
import dask.distributed
from dagster._core.errors import raise_execution_interrupts
from dagster._core.events import DagsterEvent
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._utils import iterate_with_context
from dagster_dask.executor import DaskExecutor, get_dask_resource_requirements, query_on_dask_worker
from dagster_dask.executor import dask_executor as upstream_dask_executor

__all__ = ["RunScopedDaskExecutor", "dask_executor"]


class RunScopedDaskExecutor(DaskExecutor):
    """Submits every step of a run to an existing dask scheduler, each under a run-unique task key."""

    def execute(self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan) -> Iterator[DagsterEvent]:
        if self.cluster_type != "existing":
            # A cluster made for one run would import torch and load the model again in every run.
            raise dg.DagsterInvariantViolationError("hyperinf's dask executor runs on an existing cluster "
                                                    "(cluster: {existing: {address: tcp://host:port}})")
        if not plan_context.instance.is_persistent:
            raise dg.DagsterInvariantViolationError("dask execution needs a persistent Dagster instance")
        run, instance_ref = plan_context.dagster_run, plan_context.instance.get_ref()
        with dask.distributed.Client(self.cluster_configuration["address"]) as client:
            futures: dict[str, dask.distributed.Future] = {}
            for level in execution_plan.get_steps_to_execute_by_level():
                for step in level:
                    # The upstream steps' futures as an argument: dask starts the step after they finished.
                    upstream = [futures[key] for step_input in step.step_inputs for key in step_input.dependency_keys]
                    step_fn = partial(query_on_dask_worker, recon_job=plan_context.reconstructable_job,
                                      dagster_run=run, run_config=plan_context.run_config, step_keys=[step.key],
                                      instance_ref=instance_ref, known_state=execution_plan.known_state)
                    futures[step.key] = client.submit(step_fn, upstream, key=f"{run.job_name}.{step.key}.{run.run_id}",
                                                      resources=get_dask_resource_requirements(step.tags))
            done = dask.distributed.as_completed(list(futures.values()), with_results=True)
            for _, events in iterate_with_context(raise_execution_interrupts, done):
                yield from events


@dg.executor(name="dask", config_schema=upstream_dask_executor.config_schema,
             requirements=dg.multiple_process_executor_requirements())
def dask_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
    """dagster-dask's ``dask_executor`` (same config), with run-scoped task keys (module docstring)."""
    ((cluster_type, cluster_configuration),) = init_context.executor_config["cluster"].items()
    return RunScopedDaskExecutor(cluster_type, cluster_configuration)
