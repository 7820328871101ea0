"""The deployment configs docs/deploy.md gives, checked by Dagster's own validation without a cluster: the
Kubernetes instance (K8sRunLauncher, PostgreSQL storage, a shared volume), the k8s executor's run config on the
code location loaded with ``HYPERINF_EXECUTOR=k8s``, the gradient step's GPU request, and the dask deployment's
PostgreSQL instance. The same code location loads with every executor."""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import UserDefinedDagsterK8sConfig, get_user_defined_k8s_config
from dagster_postgres import DagsterPostgresStorage

from pipelines.definitions import build_definitions
from pipelines.executors import EXECUTOR_ENV_VAR, SCHEDULER_ENV_VAR

DOCS = Path(__file__).resolve().parents[1] / "docs"
DEPLOY = DOCS / "deploy"


def _yaml(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", ["dagster-k8s.yaml", "dagster-postgres.yaml", "k8s-run-config.yaml"])
def test_the_doc_shows_each_config_file_as_it_is(name):
    """docs/deploy.md embeds every file verbatim, so the validated file is the one a reader copies."""
    blocks = re.findall(r"```yaml\n(.*?)```", (DOCS / "deploy.md").read_text(), flags=re.S)
    assert (DEPLOY / name).read_text() in blocks


def test_kubernetes_instance_validates(monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused")
    config, custom_class = dagster_instance_config(str(DEPLOY), "dagster-k8s.yaml")
    assert custom_class is None
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    checked = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, checked.errors
    assert "HYPERINF_EXECUTOR=k8s" in checked.value["env_vars"]
    # every pod mounts the one shared volume the config file and storage_root live on
    assert [m["mountPath"] for m in checked.value["volume_mounts"]] == ["/shared"]
    assert any(v.startswith("HYPERINF_CONFIG=/shared/") for v in checked.value["env_vars"])
    storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert storage.success, storage.errors
    assert storage.value["postgres_db"]["scheme"] == "postgresql+psycopg2"


def test_dask_deployment_instance_validates(monkeypatch):
    monkeypatch.setenv("HYPERINF_DAGSTER_PG_URL", "postgresql+psycopg2://dagster@db:5432/dagster")
    config, _ = dagster_instance_config(str(DEPLOY), "dagster-postgres.yaml")
    storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert storage.success, storage.errors
    assert storage.value["postgres_url"].startswith("postgresql+psycopg2://")


def test_kubernetes_run_config_validates_on_the_code_location(monkeypatch):
    monkeypatch.setenv(EXECUTOR_ENV_VAR, "k8s")
    job = build_definitions("unused.yaml").resolve_job_def("shard_job")
    assert job.executor_def.name == "k8s"
    executor = dg.validate_run_config(job, _yaml("k8s-run-config.yaml"))["execution"]["k8s"]
    assert executor["per_step_k8s_config"]["lora_gradients"]["pod_spec_config"]["node_selector"]
    with pytest.raises(dg.DagsterInvalidConfigError):  # the validation is real: a wrong type fails it
        dg.validate_run_config(job, {"execution": {"config": {"max_concurrent": "two"}}})


def test_the_gradient_step_asks_kubernetes_for_one_gpu():
    job = build_definitions("unused.yaml").resolve_job_def("shard_job")
    tags = {node.name: node.tags for node in job.graph.node_dict.values()}
    gpu_steps = [name for name, t in tags.items()
                 if "nvidia.com/gpu" in str(get_user_defined_k8s_config(t).container_config)]
    assert gpu_steps == ["lora_gradients"]
    # as the executor combines them: the step's tag, then the run config's per-step settings (a deep merge)
    tag = get_user_defined_k8s_config(tags["lora_gradients"])
    per_step = _yaml("k8s-run-config.yaml")["execution"]["config"]["per_step_k8s_config"]["lora_gradients"]
    merged = K8sContainerContext(run_k8s_config=tag).merge(
        K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(per_step)))
    assert merged.run_k8s_config.container_config["resources"]["limits"] == {"nvidia.com/gpu": 1, "memory": "16Gi"}


@pytest.mark.parametrize("kind", ["in_process", "dask", "k8s"])
def test_one_code_location_for_every_executor(monkeypatch, kind):
    monkeypatch.setenv(EXECUTOR_ENV_VAR, kind)
    monkeypatch.setenv(SCHEDULER_ENV_VAR, "tcp://127.0.0.1:8786")
    defs = build_definitions("unused.yaml")
    dg.Definitions.validate_loadable(defs)
    assert {defs.resolve_job_def(j).executor_def.name for j in ("shard_job", "adapter_job", "refresh_job")} == {kind}


def test_a_dask_executor_without_a_scheduler_or_an_unknown_executor_is_refused(monkeypatch):
    monkeypatch.setenv(EXECUTOR_ENV_VAR, "dask")
    monkeypatch.delenv(SCHEDULER_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=SCHEDULER_ENV_VAR):
        build_definitions("unused.yaml")
    monkeypatch.setenv(EXECUTOR_ENV_VAR, "celery")
    with pytest.raises(ValueError, match="in_process, dask, k8s"):
        build_definitions("unused.yaml")
