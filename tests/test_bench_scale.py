"""benchmarks/bench_scale.py --quick: every stage of the pipeline runs at two pool sizes, each in its own process,
and the table it prints has a wall time and a peak RSS per stage, bytes and examples/s per size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


def test_quick_scale_benchmark_runs_every_stage_and_prints_the_table(capsys):
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--quick"])
    assert [r["size"] for r in results] == [60, 120]
    for r in results:
        assert r["examples"] == r["size"]  # every pool example has a gradient row
        assert list(r["stages"]) == list(bench.STAGES)
        for stage in r["stages"].values():
            assert stage["seconds"] > 0 and 100 < stage["peak_mb"] < 4000
        # the default int4 rows of the tiny model: 8 matrices (2 layers x q, v x A, B) of r x d = 4 x 32, half a
        # byte a value = 512 bytes (4096 as float32), plus 2 x 8 float32 block scales and norms, the id, ...
        assert 512 + 64 < r["bytes_per_example"] < 4096 / 4
        assert r["gradient_examples_per_s"] > 0
    table = capsys.readouterr().out
    assert "60 ex" in table and "120 ex" in table
    for stage in bench.STAGES:
        assert stage in table
