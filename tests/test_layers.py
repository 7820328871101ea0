"""The layering the architecture promises, checked on the sources: the core never imports Dagster, the assets
never import `pipelines`, and the stages that only read stored rows never import transformers or peft."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    """file -> the top-level module names it imports (at any depth of the file)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        out[str(path.relative_to(REPO))] = {n.split(".")[0] for n in names}
    return out


def test_core_never_imports_dagster_and_assets_never_import_pipelines():
    assert {f for f, names in _imports("hyperinf_ops").items() if "dagster" in names} == set()
    assert {f for f, names in _imports("assets_defs").items() if "pipelines" in names} == set()


@pytest.mark.parametrize("module", ["hyperinf_ops.stages.scores", "hyperinf_ops.stages.preconditioners",
                                    "hyperinf_ops.stages.curation", "hyperinf_ops.stages.reports",
                                    "hyperinf_ops.query", "hyperinf_ops.export", "hyperinf_ops.config"])
def test_stages_that_read_stored_rows_load_no_model_library(module):
    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'peft'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
