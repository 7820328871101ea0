"""The wheel is a working product on its own: built from the sources, installed without `-e` into a fresh venv,
its `hyperinf sql` runs a named curation query (sql/ ships inside the package)."""

import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from hyperinf_ops.store import LanceStore, scores_schema

REPO = Path(__file__).resolve().parents[1]
_NOT_SOURCES = shutil.ignore_patterns(".venv", ".git", ".hyperinf_demo", ".dagster_home", "hyperinf_data", "build",
                                      "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".gl",
                                      ".whl", "out")


def _store_with_scores(root: Path) -> None:
    """Four scored examples, as a pipeline run leaves them (no model needed)."""
    store = LanceStore(str(root))
    ids = ["a", "b", "c", "d"]
    store.write_examples("s0", pa.table({"sample_id": ids, "content_hash": ids, "text": ["w", "x", "y", "z"],
                                         "label": ["p", "n", "p", "n"], "shard": ["s0"] * 4}))
    scores = pa.table({
        "sample_id": ids, "target_set": ["t"] * 4, "method": ["hyperinf"] * 4, "score": [0.4, 0.3, -0.1, -0.5],
        "rank": [1, 2, 3, 4], "percentile": [1.0, 0.75, 0.5, 0.25], "fingerprint": ["f"] * 4,
        "gradients_version": [1] * 4, "run_id": ["r"] * 4,
        "created_at": pa.array([0] * 4, pa.timestamp("us", tz="UTC")),
    }, schema=scores_schema())
    store.replace_where("scores", {"target_set": "t", "method": "hyperinf"}, scores)


@pytest.mark.slow
def test_wheel_without_editable_install_runs_a_named_query(tmp_path):
    sources = tmp_path / "src"
    shutil.copytree(REPO, sources, ignore=_NOT_SOURCES)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(sources),
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("hyperinf-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The dependencies come from this interpreter's site-packages, added as a plain path: its .pth files (the
    # editable install of this checkout among them) are not processed, so hyperinf comes from the wheel alone.
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import hyperinf_ops.query as q; print(q.SQL_DIR)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv) and (Path(where) / "top_fraction.sql").is_file()

    (tmp_path / "pool.csv").write_text("text,label\nw,p\nx,n\n")
    _store_with_scores(tmp_path / "store")
    config = tmp_path / "hyperinf.yaml"
    config.write_text(yaml.safe_dump({"storage_root": "store", "data": {"path": "pool.csv"},
                                      "targets": {"t": {"path": "pool.csv"}}}))
    out = subprocess.run([str(venv / "bin" / "hyperinf"), "sql", "--config", str(config), "top_fraction",
                          "--param", "target_set=t", "--param", "method=hyperinf", "--param", "fraction=0.5",
                          "--param", "balance=false", "--format", "csv"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("sample_id,target_set,method,score,rank")
    assert [line.split(",")[0] for line in lines[1:]] == ["a", "b"]  # the top half by score


def test_every_python_package_of_the_sources_is_in_the_wheel():
    """pyproject.toml lists the packages explicitly (sql/ is mapped into hyperinf_ops.sql): a new subpackage
    missing from the list would import in the checkout and fail in an installed product."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for top in ("hyperinf_ops", "assets_defs", "pipelines")
             for p in (REPO / top).rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
