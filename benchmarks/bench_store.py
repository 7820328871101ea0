"""Benchmark of the Lance store and the streaming scorer.

Measures, each size in its own subprocess so that memory high-water marks do not mix:
  - write throughput (MB/s of stored vectors) of `LanceStore.write_gradients`;
  - streaming scorer rows/s (scan + matmul + ranks + score commits) vs a numpy matmul over the same rows
    already in memory as float32 (goal: ratio >= 0.5);
  - the scorer's peak RSS above its post-import baseline at each size (goal: flat in the row count);
  - bytes per example on disk at several row widths and dtypes.

    .venv/bin/python benchmarks/bench_store.py                   # 20k and 200k rows x 8192 fp16
    .venv/bin/python benchmarks/bench_store.py --dtype float32 --repeat 3 --storage-dims
    .venv/bin/python benchmarks/bench_store.py --rows 20000 --json /tmp/bench.json

--repeat N scores the same table N times, each scorer run followed by its in-memory reference, and prints every
pair: on a shared machine the ratio of one pair is noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHUNK = 4096  # rows generated (once) and written per batch


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _fingerprint(dim: int, dtype: str):
    """Rows of `dim` values: raw rank-8 blocks of one LoRA matrix (8, dim / 8), stored as `dtype`."""
    from hyperinf_ops.fingerprint import Fingerprint
    from hyperinf_ops.settings import CompressionSpec

    if dim % 8:
        raise SystemExit(f"--dim/--storage-dims must be multiples of the rank 8, got {dim}")
    return Fingerprint.create(
        model_id="bench",
        model_hash="-",
        adapter_hash="-",
        task="classification",
        lora_modules=["q"],
        shapes={"q.lora_A": (8, dim // 8)},
        compression=CompressionSpec(dtype=dtype),
    )


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child_write(root: str, rows: int, dim: int, dtype: str, shard_rows: int) -> dict:
    """Write `rows` rows as shards of `shard_rows`; one random chunk reused (generation not timed)."""
    from hyperinf_ops.store import GradientBatch, LanceStore

    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((CHUNK, dim), dtype=np.float32)
    sq = rng.random((CHUNK, 1), dtype=np.float32)
    store, fp = LanceStore(root), _fingerprint(dim, dtype)
    start = time.perf_counter()
    for first in range(0, rows, shard_rows):
        n = min(shard_rows, rows - first)

        def batches(first=first, n=n):
            for i in range(first, first + n, CHUNK):
                m = min(CHUNK, first + n - i)
                yield GradientBatch([f"ex{j:08d}" for j in range(i, i + m)], chunk[:m], sq[:m])

        store.write_gradients(f"s{first // shard_rows:04d}", batches(), fp)
    seconds = time.perf_counter() - start
    vector_bytes = rows * fp.row_format.stored_width * fp.row_format.value_type.bit_width // 8
    disk = _dir_bytes(Path(store.uri("gradients")))
    return {"seconds": seconds, "mb_per_s": vector_bytes / seconds / 1e6, "bytes_per_row": disk / rows}


def child_score(root: str, queries: int, batch_rows: int) -> dict:
    import torch

    from hyperinf_ops.scorer import score_store
    from hyperinf_ops.store import LanceStore, Query
    from hyperinf_ops.store.vectors import plain_pages

    store = LanceStore(root)
    ds = store.open("gradients")
    dim = store.fingerprint("gradients").row_format.width
    digest = store.row_fingerprints("gradients")[0]
    gen = torch.Generator().manual_seed(0)
    qs = [Query("bench", f"m{i}", torch.randn(dim, generator=gen), digest) for i in range(queries)]
    # fragments whose pages the scorer reads directly (the rest go through Lance's decoder)
    fragments = ds.get_fragments()
    direct = f"{sum(plain_pages(ds, f, 'grad') is not None for f in fragments)}/{len(fragments)}"
    base_rss = _rss_mb()
    summary = score_store(store, qs, batch_rows=batch_rows)
    return {
        "direct_fragments": direct,
        "rows": summary.rows,
        "seconds": summary.seconds,
        "rows_per_s": summary.rows_per_second,
        "device": summary.device,
        "baseline_rss_mb": base_rss,
        "peak_rss_mb": _peak_mb(),
        "peak_above_baseline_mb": _peak_mb() - base_rss,
    }


def child_numpy(root: str, queries: int, batch_rows: int) -> dict:
    """The same scores from rows already in memory as float32 (decoded once, untimed): one BLAS matmul.

    The strongest in-memory baseline: no decoding, no float16 conversion (numpy's own float16 -> float32
    cast runs at ~30 M values/s here, so an in-memory float16 baseline would flatter the scorer); integer rows
    are held decoded (8x their stored bytes for int4), their scales applied.
    """
    import torch

    from hyperinf_ops.store import LanceStore

    store = LanceStore(root)
    ds = store.open("gradients")
    fmt = store.fingerprint("gradients").row_format
    n, dim = ds.count_rows(), fmt.width
    x = torch.empty((n, dim), dtype=torch.float32)
    scale = np.ones(n, dtype=np.float32)
    columns = ["grad", "grad_scale"] + (["block_scales"] if fmt.integer else [])
    row = 0
    for batch in ds.to_batches(columns=columns, batch_size=batch_rows):
        grad = batch.column("grad")
        values = torch.from_numpy(grad.flatten().to_numpy(zero_copy_only=False).reshape(len(grad), -1).copy())
        rows = slice(row, row + len(grad))
        if fmt.integer:
            steps = np.stack(batch.column("block_scales").to_numpy(zero_copy_only=False))
            fmt.decode(values, torch.ones(len(grad)), torch.from_numpy(steps), out=x[rows])
        else:
            x[rows].copy_(values)
            scale[rows] = batch.column("grad_scale").to_numpy()
        row += len(grad)
    x = x.numpy()
    q = np.random.default_rng(0).standard_normal((queries, dim), dtype=np.float32)
    start = time.perf_counter()
    out = (x @ q.T) * scale[:, None]
    seconds = time.perf_counter() - start
    assert out.shape == (n, queries)
    return {"rows": n, "seconds": seconds, "rows_per_s": n / seconds, "peak_rss_mb": _peak_mb()}


def _run_child(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "int8", "int4"])
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--batch-rows", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=1, help="scorer + reference pairs per table")
    parser.add_argument("--shard-rows", type=int, default=20_000)
    parser.add_argument("--storage-dims", type=int, nargs="*", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--storage-rows", type=int, default=5000)
    parser.add_argument("--out", default="/tmp/hyperinf_bench")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the tables under --out")
    parser.add_argument("--reuse", action="store_true",
                        help="score the tables a --keep run left under --out instead of writing them again")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    # run_all.py passes flags meant for other benchmarks (--device: the scorer picks CUDA by itself).
    args, _ = parser.parse_known_args(argv)

    if args.child:
        kind, root, *rest = args.child
        result = {
            "write": lambda: child_write(root, int(rest[0]), int(rest[1]), rest[2], int(rest[3])),
            "score": lambda: child_score(root, int(rest[0]), int(rest[1])),
            "numpy": lambda: child_numpy(root, int(rest[0]), int(rest[1])),
        }[kind]()
        print(json.dumps(result))
        return result

    out = Path(args.out)
    results: dict = {"scoring": [], "storage": []}
    for rows in args.rows:
        root = out / f"score_{rows}"
        if args.reuse and (root / "lance" / "gradients.lance").is_dir():
            write = {"seconds": math.nan, "mb_per_s": math.nan, "bytes_per_row": math.nan}  # not measured
        else:
            shutil.rmtree(root, ignore_errors=True)
            write = _run_child(["write", str(root), str(rows), str(args.dim), args.dtype, str(args.shard_rows)])
        for _ in range(args.repeat):
            score = _run_child(["score", str(root), str(args.queries), str(args.batch_rows)])
            numpy_ = _run_child(["numpy", str(root), str(args.queries), str(args.batch_rows)])
            entry = {
                "rows": rows,
                "dim": args.dim,
                "dtype": args.dtype,
                "queries": args.queries,
                "write": write,
                "scorer": score,
                "numpy_in_memory": numpy_,
                "ratio": score["rows_per_s"] / numpy_["rows_per_s"],
            }
            results["scoring"].append(entry)
            print(
                f"{rows:>8} rows x {args.dim} {args.dtype}: write {write['mb_per_s']:.0f} MB/s | scorer "
                f"{score['rows_per_s']:.0f} rows/s ({score['device']}, direct fragments "
                f"{score.get('direct_fragments', 'n/a')}) vs numpy in memory {numpy_['rows_per_s']:.0f} rows/s "
                f"-> ratio {entry['ratio']:.2f} | scorer peak RSS {score['peak_rss_mb']:.0f} MB "
                f"({score['peak_above_baseline_mb']:.0f} MB above post-import baseline), numpy peak "
                f"{numpy_['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    for dim in args.storage_dims:
        for dtype in ("float16", "float32"):
            root = out / f"storage_{dim}_{dtype}"
            shutil.rmtree(root, ignore_errors=True)
            w = _run_child(
                ["write", str(root), str(args.storage_rows), str(dim), dtype, str(args.storage_rows)]
            )
            results["storage"].append({"dim": dim, "dtype": dtype, **w})
            print(
                f"storage dim {dim:>6} {dtype}: {w['bytes_per_row']:.0f} bytes/example on disk "
                f"(vector alone {dim * (2 if dtype == 'float16' else 4)}), write {w['mb_per_s']:.0f} MB/s",
                flush=True,
            )
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
