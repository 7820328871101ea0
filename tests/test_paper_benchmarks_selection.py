"""benchmarks/bench_selection.py --quick: the real pipeline with an `evaluation:` block on a tiny random BERT; every
planned fit (full pool, oracle, each method's curated subset, one random subset per seed) is in the table with the
planned size, the curated subsets are exactly the `top_fraction` SQL rows, the full pool keeps every planted flip,
a rerun refits nothing, and --report writes the Markdown table and the PNG."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_selection.py"
METHODS = ("hyperinf", "datainf", "tracin")


def _load():
    spec = importlib.util.spec_from_file_location("bench_selection", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quick_selection_benchmark_fits_every_planned_subset(tmp_path):
    from hyperinf_ops.query import connect, run_query
    from hyperinf_ops.store import LanceStore

    bench = _load()
    out = tmp_path / "run"
    result = bench.main(["--quick", "--out", str(out), "--json", str(tmp_path / "quick.json")])
    assert json.loads((tmp_path / "quick.json").read_text())["fits"] == result["fits"]
    assert result["failed_checks"] == []
    rows = result["rows"]
    n_pool, half = 120, math.ceil(0.5 * 120)

    # every planned fit, once: per seed the full pool, the oracle (the pool without its flips), each method's
    # curated half and one random half
    planned = sorted((s, sub, m) for s in (0, 1) for sub, m in
                     [("full", None), ("oracle", None), ("random", None)] + [("curated", m) for m in METHODS])
    assert sorted((r["seed"], r["subset"], r["method"]) for r in rows) == sorted(planned)
    assert len({r["fit_key"] for r in rows}) == len(rows) == 12

    # the pool, read independently of the benchmark
    con = connect(LanceStore(result["storage_root"]))
    examples = con.sql("SELECT sample_id, label, flipped FROM examples").fetchall()
    flipped = {i: f for i, _, f in examples}
    label = {i: lab for i, lab, _ in examples}
    assert len(examples) == result["n_pool"] == n_pool
    pool_flips = sum(flipped.values())
    assert pool_flips == result["pool_flipped"] == round(0.2 * n_pool)

    for r in rows:  # the 40 test rows, half of them reported
        assert r["test_examples"] == r["validation_examples"] == 20 and r["test_loss"] > 0
        assert 0 <= r["test_accuracy"] <= 1 and sum(json.loads(r["label_counts"]).values()) == r["n_examples"]
        if r["subset"] == "full":
            assert (r["n_examples"], r["fraction"], r["n_flipped"]) == (n_pool, 1.0, pool_flips)
            assert r["target_set"] is None
        elif r["subset"] == "oracle":
            assert (r["n_examples"], r["n_flipped"]) == (n_pool - pool_flips, 0)
        else:
            assert (r["n_examples"], r["fraction"]) == (half, 0.5)
        if r["subset"] == "curated":  # exactly the rows the curation query selects from that ranking
            ids = run_query(con, "top_fraction", {"target_set": "clean", "method": r["method"], "fraction": 0.5,
                                                  "balance": False})["sample_id"].to_pylist()
            counts: dict[str, int] = {}
            for i in ids:
                counts[label[i]] = counts.get(label[i], 0) + 1
            assert r["target_set"] == "clean" and r["matches_query"]
            assert r["n_flipped"] == sum(flipped[i] for i in ids)
            assert json.loads(r["label_counts"]) == counts
    con.close()

    # one random subset per seed, and they differ; a curated subset is the same for both seeds
    randoms = sorted((r for r in rows if r["subset"] == "random"), key=lambda r: r["seed"])
    assert [r["seed"] for r in randoms] == [0, 1]
    assert (randoms[0]["n_flipped"], randoms[0]["label_counts"]) != (randoms[1]["n_flipped"], randoms[1]["label_counts"])
    for m in METHODS:
        cur = [r for r in rows if r["method"] == m]
        assert len(cur) == 2 and cur[0]["label_counts"] == cur[1]["label_counts"]
    # hyperinf against the clean target set keeps fewer planted flips than its share (20% of the half)
    hyper = next(r for r in rows if r["method"] == "hyperinf")
    assert hyper["n_flipped"] < 0.2 * half

    # the summary is the product's: mean and std over the two seeds
    summary = {(s["subset"], s["method"]): s for s in result["summary"]}
    assert set(summary) == {("full", None), ("oracle", None), ("random", None), *(("curated", m) for m in METHODS)}
    full = [r["test_accuracy"] for r in rows if r["subset"] == "full"]
    assert np.isclose(summary["full", None]["test_accuracy"], np.mean(full))
    assert np.isclose(summary["full", None]["test_accuracy_std"], np.std(full, ddof=1))
    assert summary["random", None]["n_flipped"] == np.mean([r["n_flipped"] for r in randoms])

    # a rerun resumes: every fit is reused, nothing is refit
    again = bench.main(["--quick", "--out", str(out)])
    assert sorted((r["fit_key"], r["created_at"]) for r in again["rows"]) == \
        sorted((r["fit_key"], r["created_at"]) for r in rows)

    # --report: the Markdown table and the PNG of the finished run
    md, png_dir = tmp_path / "tables.md", tmp_path / "png"
    rep = bench.main(["--report", f"Toy pool={out}", "--markdown", str(md), "--png-dir", str(png_dir)])
    png = png_dir / "selection_toy_pool.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "### Toy pool" in text and "img/results/selection_toy_pool.png" in text
    assert text.count("| curated |") == 3 and text.count("| random |") == 1 and text.count("| full |") == 1
    assert text.count("| oracle |") == 1
    assert rep["Toy pool"]["summary"] == result["summary"]
