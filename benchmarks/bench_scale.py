"""The pipeline at growing pool sizes: wall time and peak memory of every stage, bytes and examples per second.

    python benchmarks/bench_scale.py                       # 1k, 4k and 20k pool examples (MiniLM, demo recipe)
    python benchmarks/bench_scale.py --sizes 1000 4000     # a subset
    python benchmarks/bench_scale.py --quick               # tiny random BERT, 60 and 120 examples (the test suite)
    python benchmarks/bench_scale.py --causal --sizes 44   # SmolLM2-135M on chatterbot prompt/response pairs

Each size runs in a fresh subprocess, stage by stage with the same stage functions the Dagster assets call
(`hyperinf_ops.stages`), so a stage's peak RSS is its own: the kernel's high-water mark (VmHWM) is reset
before each stage (`/proc/self/clear_refs`) and read after it. Pools above the bundled Rotten Tomatoes
snippets (12.8k) are topped up with synthetic snippets: two real snippets of the same label joined, a
distinct text each. The table prints one row per stage and size, side by side, then bytes per example (the
gradient rows on disk) and examples/s of the gradient pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "targets", "adapter", "row_codec", "gradients", "preconditioners", "queries", "scores",
          "reports", "curation")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak resident set size (Linux >= 4.0)
        fh.write("5")


def _status_mb(field: str) -> float:
    """A /proc/self/status memory field in MB: VmHWM (the peak since `_reset_peak`) or VmRSS (now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# The causal-LM run: SmolLM2-135M-Instruct (30 layers, q/v LoRA r=8: 120 matrices), chatterbot pairs, target =
# held-out pairs of the "ai" topic.
CAUSAL_CONFIG = {
    "model": "smollm2", "task": "causal_lm", "lora": {"rank": 8, "alpha": 16, "modules": ["q_proj", "v_proj"]},
    "train": {"epochs": 1, "lr": 1e-3, "batch_size": 8}, "max_length": 64, "gradient_batch_size": 8,
    "estimators": ["hyperinf", "datainf", "tracin"], "curation": {"query": "top_fraction", "params": {"fraction": 0.5}},
}


def _pool(n: int, workdir: Path, quick: bool, causal: bool = False) -> Path:
    """Write the pool (4 shards), the target set and the config for n examples; returns the config path."""
    import numpy as np
    import pandas as pd
    import yaml

    from hyperinf_ops.data.demo import build_demo_dataset, write_demo_config

    if causal:
        from hyperinf_ops.data.chatterbot import build_chatterbot_dataset

        paths = build_chatterbot_dataset(workdir, n_pool=n, n_target=20, n_shards=4)
        config = workdir / "hyperinf.yaml"
        config.write_text(yaml.safe_dump({**CAUSAL_CONFIG, "storage_root": "store", "data": {"path": "pool", "label_column": "label"},
                                          "targets": {"ai": {"path": f"targets/{paths.target.name}"}}}))
        return config
    if quick:
        sys.path.insert(0, str(REPO / "tests"))
        from hyperinf_project import make_project  # noqa: PLC0415 (test fixture, quick mode only)

        return make_project(workdir, workdir / "model", n_pool=n, n_shards=4, n_target=20)
    real = min(n, 12000)
    paths = build_demo_dataset(workdir, n_pool=real, n_target=500)
    if n > real:  # synthetic top-up: distinct texts, the labels (and flips) of the snippets they join
        rng = np.random.default_rng(0)
        frames = [pd.read_parquet(p) for p in paths.shards]
        base = pd.concat(frames, ignore_index=True)
        extra = n - real
        a, b = rng.integers(0, real, extra), rng.integers(0, real, extra)
        synthetic = base.iloc[a].reset_index(drop=True).copy()
        synthetic["text"] = [f"{x} {y}" for x, y in zip(base["text"].iloc[a], base["text"].iloc[b], strict=True)]
        for i, rows in enumerate(np.array_split(np.arange(extra), len(paths.shards))):
            pd.concat([frames[i], synthetic.iloc[rows]], ignore_index=True).to_parquet(paths.shards[i], index=False)
    return write_demo_config(paths)


def run_size(n: int, work: Path, quick: bool, causal: bool = False) -> dict:
    """Every stage once on an n-example pool built under `work` (in this process); {stage: {seconds, peak_mb}}
    + totals."""
    from hyperinf_ops.config import load_config
    from hyperinf_ops.data.io import discover_shards
    from hyperinf_ops.stages import (
        adapter,
        codec,
        curation,
        gradients,
        pool,
        preconditioners,
        queries,
        reports,
        scores,
    )
    from hyperinf_ops.store import LanceStore

    cfg = load_config(_pool(n, work, quick, causal))
    store = LanceStore(str(cfg.storage_root))
    shards = discover_shards(cfg.data.path)
    settings, methods = cfg.gradient_settings, [cfg.estimator(m) for m in cfg.estimators]
    target, method = next(iter(cfg.targets)), cfg.estimators[0]
    quiet = lambda _: None  # noqa: E731
    steps = {
        "ingest": lambda: [pool.ingest_shard(store, k, p, cfg.data, cfg.task, log=quiet) for k, p in shards.items()],
        "targets": lambda: pool.ingest_targets(store, cfg.targets, cfg.data, cfg.task, log=quiet),
        "adapter": lambda: adapter.train_or_load_adapter(store, cfg.model_spec, cfg.lora, cfg.train,
                                                         given=cfg.adapter.path, log=quiet),
        "row_codec": lambda: codec.prepare_row_codec(store, cfg.model_spec, settings, log=quiet),
        "gradients": lambda: [gradients.compute_gradient_shard(store, k, cfg.model_spec, settings, log=quiet)
                              for k in shards],
        "preconditioners": lambda: preconditioners.prepare_preconditioners(store, settings, methods, log=quiet),
        "queries": lambda: queries.build_target_queries(store, list(cfg.targets), cfg.model_spec, settings,
                                                        methods, log=quiet),
        "scores": lambda: scores.score(store, settings, [(t, m) for t in cfg.targets for m in cfg.estimators],
                                       task=cfg.task, shown=(target, method),
                                       self_influence=cfg.self_influence_estimators, log=quiet),
        "reports": lambda: (reports.mislabel_report(store, list(cfg.estimators), target_set=target, task=cfg.task),
                            reports.agreement_check(store, cfg.model_spec, settings, cfg.estimator("hyperinf"),
                                                    list(cfg.targets), log=quiet)),
        "curation": lambda: curation.curate(store, cfg.curation.query, cfg.curation.params, log=quiet),
    }
    out = {"examples": store.open("examples").count_rows() if store.exists("examples") else n, "stages": {}}
    for name in STAGES:
        _reset_peak()
        start = time.perf_counter()
        steps[name]()
        out["stages"][name] = {"seconds": time.perf_counter() - start, "peak_mb": _status_mb("VmHWM"),
                               "rss_after_mb": _status_mb("VmRSS")}
    grad_dir = Path(store.uri("gradients"))
    disk = sum(f.stat().st_size for f in grad_dir.rglob("*") if f.is_file())
    out["examples"] = store.open("gradients").count_rows()
    out["bytes_per_example"] = disk / out["examples"]
    out["gradient_examples_per_s"] = out["examples"] / out["stages"]["gradients"]["seconds"]
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, 60 and 120 examples")
    parser.add_argument("--causal", action="store_true", help="SmolLM2 on chatterbot pairs instead of MiniLM")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)  # run_all passes it; CPU/CUDA = auto
    args = parser.parse_args(argv)
    if args.child is not None:  # one size, in this fresh process, in a folder removed afterwards
        with tempfile.TemporaryDirectory(prefix=f"bench_scale_{args.child}_") as work:
            print(json.dumps(run_size(args.child, Path(work), args.quick, args.causal)))
        return []
    sizes = args.sizes or ([60, 120] if args.quick else [1000, 4000, 20000])
    results = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--child", str(n)] + (["--quick"] if args.quick else []) + \
            (["--causal"] if args.causal else [])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:  # the sizes measured so far are still printed and saved
            print(f"size {n} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            break
        results.append({"size": n, **json.loads(proc.stdout.strip().splitlines()[-1])})
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    if results:
        _print(results)
    if len(results) < len(sizes):
        raise SystemExit(1)
    return results


def _print(results: list[dict]) -> None:
    head = f"{'stage':<16}" + "".join(f"{r['size']:>9} ex: s   peak MB" for r in results)
    print(head)
    for stage in STAGES:
        cells = "".join(f"{r['stages'][stage]['seconds']:>16.1f} {r['stages'][stage]['peak_mb']:>9.0f}"
                        for r in results)
        print(f"{stage:<16}{cells}")
    print(f"{'max peak MB':<16}" + "".join(f"{max(s['peak_mb'] for s in r['stages'].values()):>26.0f}"
                                        for r in results))
    print(f"{'bytes/example':<16}" + "".join(f"{r['bytes_per_example']:>26.0f}" for r in results))
    print(f"{'gradient ex/s':<16}" + "".join(f"{r['gradient_examples_per_s']:>26.1f}" for r in results))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
