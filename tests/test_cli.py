"""The `hyperinf` command line: the reduced bundled demo (real MiniLM weights), sql, and one-line errors."""

import contextlib
import io
import json
import re
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml

from hyperinf_ops.store import LanceStore
from pipelines.cli import main

# Smallest demo that still separates flipped labels reliably on 2 CPU cores.
DEMO_ARGS = ["--n-pool", "300", "--n-target", "100"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`hyperinf demo` on a reduced size, in-process; returns (workdir, exit status, stdout, stderr)."""
    workdir = tmp_path_factory.mktemp("demo")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        env.delenv("DAGSTER_HOME", raising=False)  # the default: <workdir>/.dagster_home
        status = main(["demo", *DEMO_ARGS, "--workdir", str(workdir)])
    return workdir, status, out.getvalue(), err.getvalue()


def _aurocs(out: str) -> dict[str, float]:
    return {m: float(v) for m, v in re.findall(r"^  (\w+)\s+(0\.\d+)$", out, flags=re.M)}


@pytest.mark.slow
@pytest.mark.real_weights
def test_demo_runs_every_asset_into_the_instance(demo):
    workdir, status, out, err = demo
    assert status == 0, err[-3000:]  # 1 would mean: every run succeeded but an asset check failed
    aurocs = _aurocs(out)
    assert {"hyperinf", "datainf", "tracin", "lissa", "self_influence_hyperinf", "fused", "loss", "probe",
            "hyperinf_cp", "aum"} <= set(aurocs)
    # the default curation: the pool without as many examples as cleanlab counts label issues, the most
    # harmful by HyperINF influence on the target set
    subset = workdir / "store" / "exports" / "drop_issues" / "subset.parquet"
    manifest = json.loads((subset.parent / "manifest.json").read_text())
    issues = LanceStore(str(workdir / "store")).open("label_suggestions").count_rows("issue")
    assert manifest["query_name"] == "drop_issues" and manifest["params"]["method"] == "hyperinf" and 0 < issues < 300
    assert str(subset) in out and pq.read_metadata(subset).num_rows == 300 - issues
    assert "hyperinf ui --config" in out and "hyperinf shell --config" in out
    # the summary says whether the warm-up learned, what the numbers mean and what curation removed
    warmup = re.search(r"Warm-up adapter on target set clean_val \(not trained on\): accuracy (0\.\d+) \(always "
                       r"predicting the majority class: (0\.\d+)\)", out)
    assert warmup and float(warmup[1]) > float(warmup[2]) == 0.5  # the demo's target set is class-balanced
    assert "0.5 = no better than random order" in out and "self_influence_* need no target set" in out
    removed = re.search(r"flipped labels removed: (\d+) of 60 \(a random subset of the same size removes "
                        r"(\d+\.\d)", out)
    assert removed and int(removed[1]) > 2 * float(removed[2])
    assert re.search(r"kept per label: fresh \d+ of \d+, rotten \d+ of \d+", out)
    home = workdir / ".dagster_home"
    assert yaml.safe_load((home / "dagster.yaml").read_text())["telemetry"] == {"enabled": False}
    with dg.DagsterInstance.from_config(str(home)) as instance:  # what `hyperinf ui` shows
        runs = instance.get_runs()
        assert len(runs) == 4 + 1 + 4 + 1 and all(r.is_success for r in runs)  # shards, adapter, shards, refresh
        assert instance.get_latest_materialization_event(dg.AssetKey("mislabel_report")) is not None


@pytest.mark.slow
@pytest.mark.real_weights
def test_demo_ranks_flipped_labels_as_harmful(demo):
    """Flipped labels rank as harmful, and the curvature helps: HyperINF beats the plain gradient dot
    product (TracIn), as in the paper. At this reduced size (300 pool / 100 targets, seeded) HyperINF
    measured 0.662 and TracIn 0.605; the issue's 0.7 is reached only on the full demo (0.70; 0.83 for the
    self-influence ranking), see the README."""
    aurocs = _aurocs(demo[2])
    assert aurocs["hyperinf"] > 0.6 and aurocs["hyperinf"] > aurocs["tracin"], aurocs
    assert aurocs["self_influence_hyperinf"] > 0.6, aurocs


@pytest.mark.slow
@pytest.mark.real_weights
def test_sql_over_the_demo_tables(demo, capsys):
    from hyperinf_ops.query import open_snapshot

    workdir = demo[0]
    config = str(workdir / "hyperinf.yaml")
    # The run ended with a sync that no later commit or cleanup made stale: `hyperinf sql` reads the synced file.
    snapshot = open_snapshot(str(workdir / "store"))
    assert snapshot is not None
    snapshot[0].close()
    assert main(["sql", "--config", config, "SELECT method, count(*) AS n FROM scores GROUP BY 1 ORDER BY 1",
                 "--format", "json"]) == 0
    # hyperinf and tracin also rank self-influence (target set "self"): 300 rows more each; beside them the
    # target set's hyperinf_cp and fused, and self's loss, margin, aum, probe
    counts = {"aum": 300, "datainf": 300, "fused": 300, "hyperinf": 600, "hyperinf_cp": 300, "lissa": 300,
              "loss": 300, "margin": 300, "probe": 300, "tracin": 600}
    assert json.loads(capsys.readouterr().out) == [{"method": m, "n": n} for m, n in counts.items()]
    assert main(["sql", "--config", config, "mislabel_candidates", "--param", "target_set=clean_val",
                 "--param", "method=hyperinf", "--param", "n=5", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("sample_id,target_set,method,score,rank,percentile") and len(lines) == 6
    assert main(["sql", "--config", config, "SELECT count(*) AS n FROM examples"]) == 0
    assert capsys.readouterr().out.split() == ["n", "300"]


@pytest.mark.slow
@pytest.mark.real_weights
def test_sql_mistakes_are_one_line_with_what_exists(demo, capsys):
    config = str(demo[0] / "hyperinf.yaml")
    cases = [
        (["top_fractoin"], "hyperinf: error: no query 'top_fractoin' in sql/ (did you mean 'top_fraction'?); queries: "),
        (["mislabel_candidates", "--param", "target_set=clean_val", "--param", "method=hyperinff", "--param", "n=5"],
         "hyperinf: error: --param method=hyperinff: no scores for method 'hyperinff' (did you mean 'hyperinf'?); "
         "scored: ['aum', 'datainf', 'fused', 'hyperinf', 'hyperinf_cp', 'lissa', 'loss', 'margin', 'probe', 'tracin']"),
        (["mislabel_candidates", "--param", "target_set=clean", "--param", "method=hyperinf", "--param", "n=5"],
         "hyperinf: error: --param target_set=clean: no scores for target set 'clean' (did you mean 'clean_val'?)"),
        (["mislabel_candidates", "--param", "target_set=clean_val", "--param", "method=hyperinf", "--param", "n=five"],
         "hyperinf: error: --param n=five: input should be a valid integer, got 'five'"),
    ]
    for args, message in cases:
        assert main(["sql", "--config", config, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err, err


def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"path": "nowhere.parquet"}, "targets": {}, "compresion": {"sketch_dim": 3}}))
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert re.match(rf"hyperinf: error: {re.escape(str(bad))}: \d+ problem\(s\):\n", err)
    assert "compresion: unknown key (did you mean 'compression'?)" in err
    assert "Traceback" not in err and not (tmp_path / ".dagster_home").exists()


def test_sql_errors_are_one_line(tmp_path, capsys):
    assert main(["sql", "--config", str(tmp_path / "missing.yaml"), "SELECT 1"]) == 2
    assert capsys.readouterr().err.strip() == f"hyperinf: error: config file '{tmp_path / 'missing.yaml'}' does not exist"


def test_ui_without_a_config_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["ui"]) == 2
    assert "run `hyperinf demo` first" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("demo", "run", "sql", "ui"))


def test_workspace_loads_the_code_location():
    workspace = yaml.safe_load((Path(__file__).parents[1] / "workspace.yaml").read_text())
    module = workspace["load_from"][0]["python_module"]
    assert module["module_name"] == "pipelines.definitions" and module["location_name"] == "hyperinf"
