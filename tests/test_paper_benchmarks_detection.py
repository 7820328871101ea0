"""benchmarks/bench_detection.py --quick: the real pipeline on a tiny random BERT at two LoRA ranks; every ranking
(four estimators against the clean target set, two self-influence rankings, the warm-up loss) is read back for
every rank, its metrics are well formed and agree with the product's own mislabel report, and the aggregate /
Markdown / PNG path works on the results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_detection.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_detection", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quick_detection_benchmark_scores_every_ranking_at_every_rank(tmp_path, capsys):
    bench = _load()
    results = bench.main(["--quick"])
    assert sorted(r["rank"] for r in results) == [2, 4]
    for r in results:
        assert r["examples"] == 160 and r["flipped"] == 32  # 20% of the synthetic pool flipped
        assert r["alpha"] == 2 * r["rank"] and r["config"]["lora"]["rank"] == r["rank"]
        assert r["failed_checks"] == []  # the warm-up learned (quick recipe) and every check of the rows passed
        # the product default rows were used (half-whitened int4), not raw ones
        assert r["rows"] == {"dtype": "int4", "whitening": True, "sketch_dim": 0}
        assert set(r["rankings"]) == set(bench.RANKINGS)
        for ranking, row in r["rankings"].items():
            assert set(row) == set(bench.METRICS), ranking
            assert 0.0 <= row["auroc"] <= 1.0
            d = [row[f"detection_at_{p}"] for p in (10, 20, 30)]
            assert all(0.0 <= x <= 1.0 for x in d) and d[0] <= d[1] <= d[2], (ranking, d)
            # 10% of 160 = 16 inspected of 32 flips: at most half of them can be found
            assert d[0] <= 0.5
        # our numbers are the product's mislabel report's (same stored scores, same helpers); the report also has the
        # product's own rankings beside influence (its `loss` is the gradient pass's, this benchmark's its own pass)
        assert set(r["report_rankings"]) >= set(bench.RANKINGS) | {"aum", "probe", "margin"}
        assert r["report_max_abs_diff"] == 0.0
        # the loss baseline is a real cross-entropy of the stored adapter (binary task: near log 2 when untrained)
        assert all(0.0 < v < 5.0 for v in r["loss_mean"].values()) and 0.0 <= r["flips_fit"] <= 1.0
    # hyperinf against the clean target set finds the planted flips on this toy pool
    assert all(r["rankings"]["hyperinf"]["auroc"] > 0.6 for r in results)

    agg = bench.aggregate(results)
    assert sorted(agg["quick"]) == [2, 4]
    for by_ranking in agg["quick"].values():
        assert set(by_ranking) == set(bench.RANKINGS)
        assert all(s["n"] == 1 and s["std"] == 0.0 for row in by_ranking.values() for s in row.values())
    md = bench.markdown_tables(agg)
    for ranking in bench.RANKINGS:
        assert f"| {ranking} |" in md
    assert "| ranking | r=2 | r=4 |" in md
    paired = bench.markdown_paired(results)
    assert "| hyperinf − datainf |" in paired and "change of auroc from r=2 to r=4" in paired
    pngs = bench.plot(agg, tmp_path)
    assert [p.name for p in pngs] == ["detection_auroc_quick.png"] and pngs[0].stat().st_size > 10_000
    assert "--quick:" in capsys.readouterr().out


def test_detection_metrics_on_known_rankings():
    """The product's metrics (what the benchmark and the mislabel report both use) on rankings with known answers."""
    import numpy as np

    from hyperinf_ops.stages.reports import detection_metrics

    flipped = np.array([True, True, False, False, False, False, False, False, False, False])
    harm = np.arange(10, 0, -1, dtype=float)  # the two flips are the most harmful: a perfect ranking
    assert detection_metrics(harm, flipped) == {"auroc": 1.0, "detection_at_10": 0.5, "detection_at_20": 1.0,
                                                "detection_at_30": 1.0}
    reversed_ = detection_metrics(-harm, flipped)  # the flips are the least harmful
    assert reversed_["auroc"] == 0.0 and reversed_["detection_at_30"] == 0.0
    assert detection_metrics(np.ones(10), flipped)["auroc"] == 0.5  # all ties: chance
