"""Tables on object storage: `storage_root: s3://bucket/prefix` against a real S3-compatible HTTP server (moto's
server mode, started on 127.0.0.1 by the fixture). The whole tiny pipeline runs there and scores as it does on a
local folder; `hyperinf sql` reads the tables live; two processes writing different shards at once lose and
duplicate nothing."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import dagster as dg
import pytest
from hyperinf_project import make_project
from local_cluster import free_port, wait_for_port
from shard_writer import shard_ids, write_shard

from hyperinf_ops.adapters import AdapterStore
from hyperinf_ops.config import load_config
from hyperinf_ops.location import Location, lance_storage_options
from hyperinf_ops.store import LanceStore
from pipelines.cli import main as cli_main
from pipelines.runner import materialize_all

BUCKET = "hyperinf-test"
KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on a free local port with the bucket BUCKET; the AWS_* variables point at it (and the
    download cache at a temporary folder) while the module's tests run. The server is stopped (and waited for)
    at teardown."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        endpoint = f"http://127.0.0.1:{port}"
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {**KEYS, "AWS_ENDPOINT_URL": endpoint, "RUST_LOG": "error"}.items():
                mp.setenv(name, value)
            mp.setattr("hyperinf_ops.location.CACHE_DIR", tmp_path_factory.mktemp("s3-cache"))
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _objects(endpoint: str, prefix: str) -> set[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix):] for o in listing.get("Contents", [])}


def test_storage_root_uri_is_kept_and_options_come_from_the_environment(tmp_path: Path, monkeypatch):
    cfg_path = make_project(tmp_path, tmp_path / "model", n_pool=8, n_target=4, storage_root="s3://bkt/some/prefix/")
    assert load_config(cfg_path).storage_root == "s3://bkt/some/prefix"  # not resolved against the config folder
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert lance_storage_options("s3://bkt/p") == {} and lance_storage_options(str(tmp_path)) is None
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert lance_storage_options("s3://bkt/p") == {"aws_region": "eu-west-1", "aws_endpoint": "http://127.0.0.1:9",
                                                   "allow_http": "true"}
    assert LanceStore("s3://bkt/p").storage_options["allow_http"] == "true"


@pytest.mark.slow
def test_pipeline_on_s3_scores_like_a_local_folder(tmp_path: Path, s3_endpoint: str, capsys):
    """The tiny project (every asset: adapter folders, whitening, tables, exports) on S3 gives the scores of the
    same project on a local folder; the export files are on S3 and `hyperinf sql` reads the tables there."""
    model = tmp_path / "model"
    small = {"n_pool": 60, "n_target": 16}
    local_cfg = make_project(tmp_path / "local", model, **small)
    s3_cfg = make_project(tmp_path / "s3", model, **small, storage_root=f"s3://{BUCKET}/run")
    stores = {}
    for name, path in (("local", local_cfg), ("s3", s3_cfg)):
        cfg = load_config(path)
        with dg.instance_for_test() as instance:
            report = materialize_all(instance, path, cfg, log=lambda _: None)
        assert report.runs and all(r.is_success for r in report.runs), name
        stores[name] = LanceStore(str(cfg.storage_root))

    def scores(store: LanceStore) -> dict[tuple[str, str, str], float]:
        rows = store.open("scores").to_table(columns=["sample_id", "target_set", "method", "score"]).to_pylist()
        return {(r["target_set"], r["method"], r["sample_id"]): r["score"] for r in rows}

    local, remote = scores(stores["local"]), scores(stores["s3"])
    assert remote.keys() == local.keys() and len(local) > 60
    scale = max(abs(v) for v in local.values())
    assert all(abs(remote[k] - local[k]) <= 1e-6 * scale for k in local)

    stored = _objects(s3_endpoint, "run/")
    assert {"exports/top_fraction/subset.parquet", "exports/top_fraction/subset.jsonl",
            "exports/top_fraction/manifest.json", "adapters/current.json"} <= stored
    assert any(k.startswith("lance/gradients.lance/") for k in stored)
    assert any(k.startswith("row_codecs/") and k.endswith(".safetensors") for k in stored)
    assert "hyperinf.duckdb" not in stored  # DuckDB writes local files only: the sync is skipped on S3
    adapters = AdapterStore(f"s3://{BUCKET}/run")
    current = adapters.require_current()
    assert adapters.find(current.recipe_key) == current  # a rerun with the same settings reuses the S3 adapter
    export = Location(f"s3://{BUCKET}/run/exports/top_fraction")
    local_export = Location(tmp_path / "local" / "store" / "exports" / "top_fraction")
    assert (export / "subset.parquet").read_parquet(["sample_id"]).equals(
        (local_export / "subset.parquet").read_parquet(["sample_id"]))

    capsys.readouterr()
    assert cli_main(["sql", "--config", str(s3_cfg), "--format", "csv",
                     "SELECT method, count(*) AS n FROM scores WHERE target_set = 'clean' GROUP BY ALL ORDER BY ALL"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["method,n", "datainf,60", "fused,60", "hyperinf,60", "hyperinf_cp,60", "tracin,60"]


@pytest.mark.slow
def test_two_processes_write_different_shards_at_once(s3_endpoint: str):
    """Two processes, started together on a table that does not exist yet, each rewrite their own shard: both
    create the table, every commit lands, and each shard holds exactly its last write."""
    root, rounds = f"s3://{BUCKET}/concurrent", 6
    ctx = multiprocessing.get_context("spawn")  # no forked Lance / S3 client threads
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=write_shard, args=(root, shard, rounds, barrier, queue)) for shard in ("a", "b")]
    for w in workers:
        w.start()
    reports = {shard: (versions, start, end) for shard, versions, start, end in (queue.get(timeout=120) for _ in workers)}
    for w in workers:
        w.join(timeout=30)
    assert [w.exitcode for w in workers] == [0, 0]
    assert max(r[1] for r in reports.values()) < min(r[2] for r in reports.values())  # the writes overlapped
    table = LanceStore(root).open("examples").to_table(columns=["sample_id", "shard"])
    rows = list(zip(table["shard"].to_pylist(), table["sample_id"].to_pylist(), strict=True))
    for shard in ("a", "b"):
        assert sorted(i for s, i in rows if s == shard) == shard_ids(shard, rounds - 1)
    assert table.num_rows == 2 * len(shard_ids("a", rounds - 1))
    # every write is its own commit (2 x rounds versions besides the table's creation)
    assert len(set(reports["a"][0]) | set(reports["b"][0])) == 2 * rounds
