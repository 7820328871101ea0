"""Benchmark of `hyperinf sql`: wall time and peak RSS of one query, each run in its own process.

Runs the console script `hyperinf sql` as a subprocess `--repeat` times for each of three queries (a count
over `examples`, a GROUP BY over `scores`, the named curation query `top_fraction`) and prints the median
wall time and the peak RSS of each, side by side with the goal (<= 1.0 s, <= 200 MB), in both ways `hyperinf sql`
reads: the synced `hyperinf.duckdb` (the default while it is current: `query.open_snapshot`) and the live Lance
tables (`--live`, or when a commit made the file stale). Peak RSS is the child's own high-water mark
(`os.wait4`), so runs do not mix.

    .venv/bin/python benchmarks/bench_sql_cli.py                        # builds a store of --n-pool examples
    .venv/bin/python benchmarks/bench_sql_cli.py --config .hyperinf_demo/hyperinf.yaml --target-set clean_val

Without --config, the store is the test project's (tests/hyperinf_project.py: tiny BERT, synthetic pool)
filled directly through the store's writers and the streaming scorer with random gradient rows (no warm-up,
no Dagster): the tables `hyperinf sql` reads have the demo's shape (examples, scores of three methods on one
target set). It is built once under --workdir and reused.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_WALL_S = 1.0
GOAL_RSS_MB = 200.0
HYPERINF = Path(sys.executable).parent / "hyperinf"  # the console script of this venv


def queries(target_set: str) -> dict[str, list[str]]:
    """The benchmarked `hyperinf sql` arguments, by name."""
    return {
        "count examples": ["SELECT count(*) AS n FROM examples"],
        "scores by method": ["SELECT target_set, method, count(*) AS n, avg(score) AS mean FROM scores GROUP BY ALL"],
        "top_fraction": ["top_fraction", "--param", f"target_set={target_set}", "--param", "method=hyperinf",
                         "--param", "fraction=0.5", "--param", "balance=true"],
    }


def build_store(workdir: Path, n_pool: int) -> Path:
    """The test project's config under `workdir` with its store filled (once); returns the config path."""
    done = workdir / ".built"  # written last: a build cut short is redone
    if done.is_file():
        return workdir / "hyperinf.yaml"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import pandas as pd
    import torch
    from hyperinf_project import make_project

    from hyperinf_ops.config import load_config
    from hyperinf_ops.data.prepare import prepare_examples
    from hyperinf_ops.fingerprint import Fingerprint
    from hyperinf_ops.query import sync_duckdb
    from hyperinf_ops.scorer import score_store
    from hyperinf_ops.settings import CompressionSpec
    from hyperinf_ops.store import GradientBatch, LanceStore, Query

    path = make_project(workdir, workdir / "model", n_pool=n_pool, n_shards=4)
    cfg = load_config(path)
    store = LanceStore(str(cfg.storage_root))
    dim = 32
    fp = Fingerprint.create(model_id="bench", model_hash="-", adapter_hash="-", task="classification",
                            lora_modules=["q"], shapes={"q.lora_A": (2, 8), "q.lora_B": (2, 8)},
                            compression=CompressionSpec(dtype="float16"))  # rows of 2 * (2 * 8) = dim floats
    gen = torch.Generator().manual_seed(0)
    for shard_file in sorted((workdir / "pool").glob("*.parquet")):
        table = prepare_examples(pd.read_parquet(shard_file), cfg.data, cfg.task, shard_file.stem)
        store.write_examples(shard_file.stem, table)
        ids = table.column("sample_id").to_pylist()
        store.write_gradients(shard_file.stem, GradientBatch(ids, torch.randn(len(ids), dim, generator=gen),
                                                             torch.rand(len(ids), 2, generator=gen)), fp)
    queries = [Query(t, m, torch.randn(dim, generator=gen), fp.digest(), {}) for t in cfg.targets
               for m in cfg.estimators]
    store.write_queries(queries)
    score_store(store, queries)
    sync_duckdb(store)
    done.touch()
    return path


def ensure_synced(config: Path) -> None:
    """Sync the store's DuckDB file unless it is current (a store built by an older version may lack it)."""
    from hyperinf_ops.config import load_config
    from hyperinf_ops.query import open_snapshot, sync_duckdb
    from hyperinf_ops.store import LanceStore

    root = str(load_config(config).storage_root)
    snapshot = open_snapshot(root)
    if snapshot is None:
        sync_duckdb(LanceStore(root))
    else:
        snapshot[0].close()


def run_once(config: Path, query: list[str]) -> tuple[float, float]:
    """One `hyperinf sql` process: (wall seconds, peak RSS in MB); raises if it does not exit 0."""
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = subprocess.Popen([str(HYPERINF), "sql", "--config", str(config), *query],
                                stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            out.seek(0)
            raise SystemExit(f"hyperinf sql {query} exited {proc.returncode}:\n{out.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="an existing project (default: build the test project)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hyperinf_bench_sql",
                        help="where the built project goes (reused when present)")
    parser.add_argument("--n-pool", type=int, default=4000, help="pool examples of the built project")
    parser.add_argument("--repeat", type=int, default=5, help="processes per query")
    parser.add_argument("--target-set", default="clean", help="target set of top_fraction (the demo's: clean_val)")
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)  # the child that builds the store
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)  # the child that syncs a config's store
    args = parser.parse_args()
    if args.build:
        build_store(args.workdir.resolve(), args.n_pool)
        return
    if args.prepare:
        ensure_synced(args.prepare)
        return
    if args.config:
        config = args.config.resolve()
    else:
        build = [sys.executable, __file__, "--workdir", str(args.workdir), "--n-pool", str(args.n_pool), "--build"]
        subprocess.run(build, check=True)
        config = args.workdir.resolve() / "hyperinf.yaml"
    # The store is built and synced in a child: a child's peak RSS counts its parent's at fork time (Linux keeps
    # the pre-exec high-water mark), so this process must stay small.
    subprocess.run([sys.executable, __file__, "--prepare", str(config)], check=True)
    print(f"config {config}; {args.repeat} runs per query; goal < {GOAL_WALL_S} s and < {GOAL_RSS_MB:.0f} MB")
    print(f"{'query':<18} {'reads':<12} {'median wall s':>13} {'max wall s':>10} {'median peak RSS MB':>18} "
          f"{'goal met':>8}")
    for name, query in queries(args.target_set).items():
        for reads, flags in (("synced file", []), ("live Lance", ["--live"])):
            runs = [run_once(config, [*flags, *query]) for _ in range(args.repeat)]
            wall = statistics.median(w for w, _ in runs)
            rss = statistics.median(r for _, r in runs)
            met = "yes" if wall < GOAL_WALL_S and rss < GOAL_RSS_MB else "no"
            print(f"{name:<18} {reads:<12} {wall:>13.2f} {max(w for w, _ in runs):>10.2f} {rss:>18.0f} {met:>8}")


if __name__ == "__main__":
    main()
