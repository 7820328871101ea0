"""benchmarks/compare_layouts.py: rank agreement, export overlap, selection and bytes read from finished stores."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_layouts.py"
N = 40


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_layouts", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _store(root: Path, scores: np.ndarray, row_bytes: int, test_loss: float) -> Path:
    """A storage root with the tables compare_layouts reads: scores (one target set, one method), examples (a
    `label` column), gradients (fixed-size rows) and evaluation (a curated 10% fit and a full-pool fit)."""
    ids = [f"s{i:02d}" for i in range(N)]
    lance.write_dataset(pa.table({"sample_id": ids, "target_set": ["t"] * N, "method": ["hyperinf"] * N,
                                  "score": scores.astype(float)}), root / "lance" / "scores.lance")
    lance.write_dataset(pa.table({"sample_id": ids, "label": ["a" if i % 2 else "b" for i in range(N)]}),
                        root / "lance" / "examples.lance")
    rng = np.random.default_rng(row_bytes)  # random bytes: Lance would compress constant ones away
    lance.write_dataset(pa.table({"sample_id": ids, "vector": [rng.bytes(row_bytes) for _ in ids]}),
                        root / "lance" / "gradients.lance")
    # a random subset records its own share (4 of 40 here; 408 of 2,038 = 0.2002 in the LLM demo), a random fit of
    # another size (a 20% candidate's) must not be read as the 10% one's
    lance.write_dataset(pa.table({"subset": ["curated", "random", "random", "full"],
                                  "method": ["hyperinf", None, None, None], "fraction": [0.1, 0.1003, 0.2, 1.0],
                                  "n_examples": [4, 4, 8, N], "seed": [0, 0, 0, 0],
                                  "test_loss": [test_loss, 0.9, 0.8, 0.5], "test_accuracy": [0.8, 0.1, 0.2, 0.7]}),
                        root / "lance" / "evaluation.lance")
    return root


def test_agreement_overlap_selection_and_bytes(bench, tmp_path):
    reference = np.arange(N, dtype=float)
    near = reference.copy()
    near[[0, 1]] = near[[1, 0]]  # two of the least helpful swap: ranks move, the top 10% export does not
    stores = {"raw": _store(tmp_path / "raw", reference, 4000, 0.30),
              "k=8": _store(tmp_path / "k8", near, 400, 0.31),
              "reversed": _store(tmp_path / "rev", -reference, 40, 0.60)}
    result = bench.compare(stores, "t", 0.1, group_by="label")

    near_agreement = result["agreement"]["k=8"]["hyperinf"]
    assert 0.99 < near_agreement["spearman"] < 1.0
    assert near_agreement["export_overlap"] == 1.0
    assert near_agreement["rows"] == N
    assert set(near_agreement["spearman_by_group"]) == {"a", "b"}
    reversed_agreement = result["agreement"]["reversed"]["hyperinf"]
    assert reversed_agreement["spearman"] == pytest.approx(-1.0)
    assert reversed_agreement["pearson"] == pytest.approx(-1.0)
    assert reversed_agreement["export_overlap"] == 0.0  # its top 4 are the reference's bottom 4
    assert result["bytes_per_row"]["raw"] > result["bytes_per_row"]["k=8"] > result["bytes_per_row"]["reversed"]
    assert result["bytes_per_row"]["raw"] >= 4000
    assert result["selection"]["k=8"]["hyperinf"]["test_loss"] == [0.31]
    assert result["selection"]["raw"]["full"]["test_loss"] == [0.5]
    assert result["selection"]["raw"]["random"]["test_loss"] == [0.9]
    table = bench.markdown(result)
    assert "| hyperinf | 1.000 / 1.000 / 1.00 / a " in table and "-1.000 / -1.000 / 0.00 / a -1.000" in table
    selection_row = next(line for line in table.splitlines() if line.startswith("| reversed |"))
    assert selection_row.endswith("| 0.500 | 0.600 | 0.900 |")  # full pool, the curated fit, random


def test_names_may_hold_equals_signs(bench, tmp_path):
    root = _store(tmp_path / "one", np.arange(N, dtype=float), 100, 0.3)
    result = bench.main(["--stores", f"raw={root}", f"k=128 (default)={root}", "--target-set", "t",
                         "--fraction", "0.1"])
    assert result["agreement"]["k=128 (default)"]["hyperinf"]["spearman"] == pytest.approx(1.0)
