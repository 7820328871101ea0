"""Run every benchmark in one process and print their tables one after another.

    python benchmarks/run_all.py                 # CPU defaults
    python benchmarks/run_all.py --device cuda   # on a GPU machine (see benchmarks/gpu_check.sh)

Each benchmark module exposes ``main(argv)``; flags after ``--`` are passed to all of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARKS = ("bench_gradients", "bench_inverse", "bench_store")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--device", default=None, help="passed to every benchmark as --device")
    args, rest = parser.parse_known_args(argv)
    extra = (["--device", args.device] if args.device else []) + [a for a in rest if a != "--"]
    for name in args.only:
        print(f"\n=== {name} {' '.join(extra)} ===", flush=True)
        start = time.perf_counter()
        importlib.import_module(name).main(extra)
        print(f"--- {name}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
