"""The UI for real: `dagster dev` on 127.0.0.1 with a tmp instance, the asset graph over GraphQL, the runs a
`hyperinf run` made beforehand on the timeline and their job's page, a materialization launched through
GraphQL (as the UI's Materialize button does), then a clean stop."""

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
from hyperinf_project import make_project
from tiny_models import save_tiny_model

from assets_defs.resources import CONFIG_ENV_VAR
from hyperinf_ops.config import load_config
from pipelines.devserver import free_port, group_alive, start_dagster_dev, stop_dagster_dev, wait_until_ready
from pipelines.instance import LOCATION_NAME, WORKSPACE_YAML, open_instance, prepare_dagster_home
from pipelines.runner import materialize_all

REPO = {"repositoryLocationName": LOCATION_NAME, "repositoryName": "__repository__"}


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        payload = json.loads(resp.read())
    assert "errors" not in payload, payload["errors"]
    return payload["data"]


def _wait_for_location(url: str, timeout: float = 180) -> None:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "\
            "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = _graphql(url, query)["workspaceOrError"]["locationEntries"]
        entry = next(e for e in entries if e["name"] == LOCATION_NAME)
        if entry["loadStatus"] == "LOADED":
            assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation", entry
            return
        time.sleep(1)
    raise TimeoutError("code location did not load")


def _processes_with_home(home: Path) -> list[int]:
    """PIDs whose environment carries DAGSTER_HOME=<home> (ours: any survivor is an orphan)."""
    needle = f"DAGSTER_HOME={home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_dagster_dev_graph_launch_and_clean_stop(tmp_path):
    cfg_path = make_project(tmp_path / "project", save_tiny_model(tmp_path / "model"), n_pool=40, n_target=8)
    home = prepare_dagster_home(tmp_path / "dagster_home")
    with open_instance(home) as instance:  # what `hyperinf run` does before anyone opens the UI
        cli_runs = materialize_all(instance, cfg_path, load_config(cfg_path), log=lambda _: None).runs
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "dagster_dev.log").open("w") as log:
        proc = start_dagster_dev(dagster_home=home, workspace=WORKSPACE_YAML, port=port,
                                 env={CONFIG_ENV_VAR: str(cfg_path)}, output=log)
    try:
        info = wait_until_ready(proc, url, timeout=180)
        assert info["dagster_version"] == "1.13.27"
        _wait_for_location(url)

        nodes = _graphql(url, "{ assetNodes { assetKey { path } isPartitioned groupName dependencyKeys { path } "
                              "assetChecksOrError { ... on AssetChecks { checks { name } } } } }")["assetNodes"]
        graph = {n["assetKey"]["path"][0]: n for n in nodes}
        assert set(graph) == {"pool_files", "pool_examples", "target_sets", "lora_adapter", "row_codec",
                              "lora_gradients", "cross_fit", "checkpoint_scores", "preconditioners",
                              "target_queries", "influence_scores", "curated_subset", "mislabel_report",
                              "evaluation"}
        assert graph["lora_gradients"]["isPartitioned"] and not graph["preconditioners"]["isPartitioned"]
        assert {d["path"][0] for d in graph["lora_gradients"]["dependencyKeys"]} == {"pool_examples", "lora_adapter",
                                                                                      "row_codec"}
        checks = {c["name"] for n in nodes for c in n["assetChecksOrError"].get("checks", [])}
        assert {"gradients_finite", "inverses_converged", "agreement_with_exact", "curated_subset_size",
                "warmup_learns"} <= checks

        # The CLI's runs carry the location's origin: the Overview timeline lists only such runs
        # (useRunsForTimeline skips a run without repositoryOrigin), and each job's Runs tab filters by the
        # repository tag.
        runs = _graphql(url, "{ runsOrError { ... on Runs { results { runId pipelineName "
                             "repositoryOrigin { repositoryLocationName repositoryName } } } } }")["runsOrError"]
        by_id = {r["runId"]: r for r in runs["results"]}
        assert {r.run_id for r in cli_runs} <= set(by_id)
        assert all(by_id[r.run_id]["repositoryOrigin"] == REPO for r in cli_runs)
        job_page = _graphql(url, "query($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { results { runId } } } }",
                            {"f": {"pipelineName": "refresh_job", "tags": [
                                {"key": ".dagster/repository", "value": "__repository__@hyperinf"}]}})
        assert [r["runId"] for r in job_page["runsOrError"]["results"]] == [cli_runs[-1].run_id]

        added = _graphql(url, "mutation($s: RepositorySelector!) { addDynamicPartition(partitionsDefName: "
                              "\"pool_shards\", partitionKey: \"shard-9\", repositorySelector: $s) { __typename } }",
                         {"s": REPO})
        assert added["addDynamicPartition"]["__typename"] == "AddDynamicPartitionSuccess"

        params = {
            "selector": {**REPO, "jobName": "shard_job", "assetSelection": [{"path": ["pool_examples"]}]},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "shard-0"}]},
            "runConfigData": {},
        }
        launched = _graphql(url, "mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename "
                                 "... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }",
                            {"p": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        status, deadline = None, time.monotonic() + 240
        while status not in ("SUCCESS", "FAILURE", "CANCELED") and time.monotonic() < deadline:
            time.sleep(2)
            status = _graphql(url, "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }",
                              {"id": run_id})["runOrError"]["status"]
        assert status == "SUCCESS", (tmp_path / "dagster_dev.log").read_text()[-3000:]

        asset = _graphql(url, "{ assetOrError(assetKey: {path: [\"pool_examples\"]}) { ... on Asset { "
                              "assetMaterializations(limit: 1) { partition runId metadataEntries { label } } } } }")
        latest = asset["assetOrError"]["assetMaterializations"][0]
        assert latest["partition"] == "shard-0" and latest["runId"] == run_id
        assert "dagster/row_count" in {m["label"] for m in latest["metadataEntries"]}
    finally:
        stop_dagster_dev(proc)
    assert proc.returncode is not None
    assert not group_alive(proc.pid)
    assert _processes_with_home(home) == []
