"""The README's "Your own data in five minutes", run as written: its YAML and its commands, on a small CSV pool
with the section's column names (real MiniLM weights)."""

import contextlib
import io
import json
import math
import re
import shlex
from pathlib import Path

import pytest
from hyperinf_project import sentences

from hyperinf_ops.config.sections import DROP_ISSUES_MAX_FRACTION
from hyperinf_ops.store import LanceStore
from pipelines.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Your own data in five minutes"


def _section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def _write_csv(path: Path, n: int, seed: int, flip_fraction: float) -> None:
    frame = sentences(n, seed=seed, flip_fraction=flip_fraction).drop(columns=["flipped"])
    frame.rename(columns={"text": "review", "label": "sentiment"}).to_csv(path, index=False)


@pytest.mark.slow
@pytest.mark.real_weights
def test_the_readme_walkthrough_runs_as_written(tmp_path, monkeypatch):
    section = _section()
    (config_text,) = _blocks(section, "yaml")
    (commands,) = _blocks(section, "bash")
    (tmp_path / "hyperinf.yaml").write_text(config_text)
    _write_csv(tmp_path / "reviews.csv", 200, seed=1, flip_fraction=0.1)
    _write_csv(tmp_path / "wanted.csv", 40, seed=2, flip_fraction=0.0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    outputs = []
    for line in commands.strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == ".venv/bin/hyperinf", line
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(argv[1:]) == 0, (line, out.getvalue())
        outputs.append(out.getvalue())

    export = tmp_path / "store" / "exports" / "drop_issues"
    subset = [json.loads(row) for row in (export / "subset.jsonl").read_text().splitlines()]
    manifest = json.loads((export / "manifest.json").read_text())
    # the default curation
    assert manifest["params"] == {"target_set": "wanted", "method": "hyperinf", "max_fraction": DROP_ISSUES_MAX_FRACTION}
    # the pool without the k most harmful by HyperINF on `wanted`, k = the label issues cleanlab counts (at most
    # max_fraction of the pool)
    issues = LanceStore(str(tmp_path / "store")).open("label_suggestions").count_rows("issue")
    pool = {r["label"]: r["pool"] for r in manifest["report"]["labels"]}
    dropped = min(issues, math.ceil(DROP_ISSUES_MAX_FRACTION * 200))
    assert sum(pool.values()) == 200 and 0 < issues < 200 and len(subset) == 200 - dropped
    assert {r["label"] for r in subset} == {"pos", "neg"} and not any(r["relabelled"] for r in subset)
    harmful = outputs[1].splitlines()
    assert harmful[0].split()[:5] == ["sample_id", "target_set", "method", "score", "rank"] and len(harmful) == 6
    assert [int(line.split()[4]) for line in harmful[1:]] == [200, 199, 198, 197, 196]  # the most harmful first
    counts = dict(line.split() for line in outputs[2].splitlines()[1:])
    assert counts == {label: str(n) for label, n in sorted(pool.items())}
