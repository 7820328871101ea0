"""Top-k by vector index (hyperinf_ops/topk.py) against the exact scan, side by side in one run.

    .venv/bin/python benchmarks/bench_ann.py --rows 20000 --width 73728     # the default MiniLM row width
    .venv/bin/python benchmarks/bench_ann.py --rows 1000000 --width 2048    # 1M rows at a reduced width
    .venv/bin/python benchmarks/bench_ann.py --store /tmp/demo/store        # real rows and queries of a store

Synthetic rows (int4, rank-8 blocks of 384 values like MiniLM's) are `z M + noise`: z has `--latent`
directions with variances (1 + i)^-decay (`--decay`; the demo store's real whitened rows measured ~0.5, the
default 1.5 is steeper than real), M is a seeded Gaussian (latent, width) map, and isotropic noise carries
`--noise` (10%) of a row's energy (no basis captures it). Queries mimic a HyperINF query: a target mean v over
200 rows, preconditioned as v_i / (s_i + lambda) with lambda = `--damping` (0.1; a comma-separated list gives
`--queries` queries for each) x mean(s); a small lambda weighs the small-variance directions up (the hard case
for a reduced representation).

It prints first the rows' spectrum on a sample (eigenvalue decay, the rows' and each query's energy share in the
top-m directions, the correlation of the reduced score with the exact one), then builds the index and, per query
and per `--configs` entry (search "lance" = the IVF_HNSW_SQ index or "flat" = the projections in memory, and the
candidates reranked), the exact scan (`score_store`, the product's scan: every row, ranks and a score commit)
next to the index query's candidate stage, rerank and total time, the speed-up and recall@k, helpful / harmful.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from hyperinf_ops.core.whitening import Whitening
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.scorer import score_store
from hyperinf_ops.settings import CompressionSpec
from hyperinf_ops.store import GradientBatch, LanceStore, Query
from hyperinf_ops.topk import TopKIndex, _take_rows, build_index

BLOCK = 8 * 384  # one MiniLM LoRA matrix's (r, d) block
CHUNK = 4096  # rows generated and written per batch


def _fingerprint(width: int) -> Fingerprint:
    if width % BLOCK:
        raise SystemExit(f"--width must be a multiple of {BLOCK} (rank-8 blocks of 384)")
    shapes = {f"m{i:02d}.lora": (8, 384) for i in range(width // BLOCK)}
    return Fingerprint.create(model_id="bench", model_hash="-", adapter_hash="-", task="classification",
                              lora_modules=["m"], shapes=shapes, compression=CompressionSpec(dtype="int4"))


def synthetic_store(root: Path, rows: int, width: int, latent: int, queries: int, *, decay: float = 1.5,
                    noise_share: float = 0.1, dampings: tuple[float, ...] = (0.1,)) -> tuple[LanceStore, list[Query]]:
    """Write `rows` synthetic int4 rows of `width` (module docstring; latent variances (1 + i)^-decay, isotropic
    noise `noise_share` of a row's energy) under `root`; return the store and, for each damping of `dampings`
    (lambda = damping x the mean variance), `queries` HyperINF-like queries (width,) carrying the rows'
    fingerprint."""
    gen = torch.Generator().manual_seed(0)
    variances = torch.arange(1, latent + 1, dtype=torch.float32) ** -decay
    mixing = torch.randn(latent, width, generator=gen) / width ** 0.5
    noise = (noise_share / (1 - noise_share) * variances.sum() / width) ** 0.5
    store, fp = LanceStore(str(root)), _fingerprint(width)

    def batches():
        for first in range(0, rows, CHUNK):
            n = min(CHUNK, rows - first)
            z = torch.randn(n, latent, generator=gen) * variances.sqrt()
            x = z @ mixing + noise * torch.randn(n, width, generator=gen)
            yield GradientBatch([f"ex{i:08d}" for i in range(first, first + n)], x, torch.ones(n, width // BLOCK))

    store.write_gradients("s0", batches(), fp)
    out = []
    for damping in dampings:
        for j in range(queries):
            target = (torch.randn(200, latent, generator=gen) * variances.sqrt()
                      + 0.2 * torch.randn(latent, generator=gen) * variances.sqrt())
            vector = (target.mean(0) / (variances + damping * variances.mean())) @ mixing
            out.append(Query(f"t{j}_d{damping:g}", "hyperinf", vector, fp.digest()))
    return store, out


def _whitening(store: LanceStore) -> Whitening | None:
    """The whitening a real store's rows are stored under (its row_codecs/ file of that digest), else None."""
    digest = store.fingerprint("gradients").whitening
    for path in sorted(Path(store.root, "row_codecs").glob("*.safetensors")) if digest else []:
        whitening = Whitening.load(path)
        if whitening.digest() == digest:
            return whitening
    return None


def _exact(store: LanceStore, query: Query) -> tuple[float, dict[str, float]]:
    """The exact scan's seconds and every row's score."""
    summary = score_store(store, [query], whitening=_whitening(store))
    table = store.open("scores").to_table(columns=["sample_id", "score"],
                                          filter=f"target_set = '{query.target_set}'")
    return summary.seconds, dict(zip(table["sample_id"].to_pylist(), table["score"].to_pylist(), strict=True))


def spectrum(store: LanceStore, queries: list[Query], dims: int, sample_rows: int) -> dict:
    """The rows' spectrum and how much of each query the top-`dims` principal directions carry, on a seeded
    sample of decoded rows: eigenvalue decay exponent (log-log slope of the Gram eigenvalues 1..dims), the
    energy share of the first `dims` directions, and per query its energy share in their span and the
    correlation of the reduced score with the exact score over the sample."""
    ds = store.open("gradients")
    fmt = store.fingerprint("gradients").row_format
    n = ds.count_rows()
    positions = np.sort(np.random.default_rng(1).choice(n, size=min(n, sample_rows), replace=False))
    _, x = _take_rows(ds, fmt, positions)
    values, vectors = torch.linalg.eigh((x @ x.T).double())
    order = torch.argsort(values, descending=True)
    values, vectors = values[order].clamp_min(0), vectors[:, order]
    m = min(dims, int((values > values[0] * 1e-7).sum()))
    ranks = np.arange(1, m + 1)
    slope = float(np.polyfit(np.log(ranks[4:]), np.log(values[4:m].numpy()), 1)[0])
    basis = (vectors[:, :m] / values[:m].sqrt()).float().T @ x
    out = {"sample_rows": len(positions), "dims": m, "eigen_decay": -slope,
           "row_energy_in_top_m": float(values[:m].sum() / values.sum()), "queries": {}}
    for query in queries:
        q = query.vector.float().reshape(-1)
        exact = x @ q
        reduced = x @ (basis.T @ (basis @ q))
        out["queries"][query.target_set] = {
            "energy_in_top_m": float((basis @ q).square().sum() / q.square().sum()),
            "score_corr": float(np.corrcoef(exact.numpy(), reduced.numpy())[0, 1])}
    return out


def parse_configs(text: str) -> list[dict]:
    """"flat:5000,lance:1000:nprobes=16:refine_factor=2" -> [{search, candidates, options}, ...]."""
    out = []
    for item in text.split(","):
        search, candidates, *options = item.split(":")
        out.append({"search": search, "candidates": int(candidates),
                    "options": {key: int(value) for key, value in (o.split("=") for o in options)}})
    return out


def run(store: LanceStore, queries: list[Query], *, k: int, dims: int, configs: list[dict], sample_rows: int,
        nprobes: int | None, ef: int | None) -> dict:
    """Build the index, then per query, configuration (search, candidates) and side: the exact scan vs the
    index query; prints one line per configuration and query (helpful / harmful side by side)."""
    info = build_index(store, dims=dims, sample_rows=sample_rows)
    fp = store.fingerprint("gradients")
    print(f"{info.rows:,} rows x {fp.row_width:,} values ({fp.row_dtype}), index over {dims} principal "
          f"directions: build {info.seconds:.1f} s ({info.num_partitions} IVF_HNSW_SQ partitions)", flush=True)
    start = time.perf_counter()
    index = TopKIndex(store)
    open_seconds = time.perf_counter() - start
    print(f"  index opened (basis, scale columns, row pages mapped: {index._rows.mapped}) in {open_seconds:.2f} s",
          flush=True)
    lines = []
    print(f"  {'query':<20} {'search':<6} {'cand':>6} | {'exact':>7} | {'search s':>17} | {'rerank s':>17} | "
          f"{'total s':>17} | {'speed-up':>15} | recall@{k} help/harm", flush=True)
    for query in queries:
        exact_seconds, exact = _exact(store, query)
        ranked = sorted(exact, key=exact.get)
        for config in configs:
            search, candidates = config["search"], config["candidates"]
            options = {"nprobes": nprobes, "ef": ef, **config["options"]}
            label = ":".join([search, *(f"{key}={value}" for key, value in config["options"].items())])
            if search == "flat" and index.projections is None:
                t = time.perf_counter()
                index.projections = index._load_projections()
                print(f"  flat: projections read into memory once in {time.perf_counter() - t:.2f} s "
                      f"({index.projections.nbytes / 2**20:.0f} MiB)", flush=True)
            sides = []
            for harmful, truth in ((False, ranked[::-1][:k]), (True, ranked[:k])):
                start = time.perf_counter()
                got = index.top_k(query, k, harmful=harmful, candidates=candidates, search=search, **options)
                seconds = time.perf_counter() - start
                line = {"query": f"{query.target_set}/{query.method}", "side": "harmful" if harmful else "helpful",
                        "search": label, "candidates": got.candidates, "exact_scan_s": exact_seconds,
                        "search_s": got.search_seconds, "rerank_s": got.rerank_seconds, "index_query_s": seconds,
                        "speedup": exact_seconds / seconds, f"recall@{k}": len(set(got.sample_ids) & set(truth)) / k}
                lines.append(line)
                sides.append(line)
            h, x = sides

            def pair(key: str, form: str, h=h, x=x) -> str:
                return f"{format(h[key], form)} / {format(x[key], form)}"

            print(f"  {h['query']:<20} {label:<6} {candidates:>6} | {exact_seconds:6.2f}s | {pair('search_s', '7.3f')} | "
                  f"{pair('rerank_s', '7.3f')} | {pair('index_query_s', '7.3f')} | {pair('speedup', '5.1f')}x | "
                  f"{pair(f'recall@{k}', '.2f')}", flush=True)
    for config in configs:
        search = ":".join([config["search"], *(f"{key}={value}" for key, value in config["options"].items())])
        candidates = config["candidates"]
        mine = [line for line in lines if line["search"] == search and line["candidates"] == min(candidates, info.rows)]
        recalls = [line[f"recall@{k}"] for line in mine]
        speedups = [line["speedup"] for line in mine]
        met = min(recalls) >= 0.95 and min(speedups) >= 10
        print(f"  => {search} {candidates}: recall@{k} min {min(recalls):.2f} / mean {np.mean(recalls):.3f} (goal >= "
              f"0.95); speed-up min {min(speedups):.1f}x / median {np.median(speedups):.1f}x (goal >= 10x)"
              f"{' BOTH MET' if met else ''}", flush=True)
    return {"rows": info.rows, "width": fp.row_width, "dtype": fp.row_dtype, "dims": dims, "k": k,
            "configs": configs, "nprobes": nprobes, "ef": ef, "build_s": info.seconds, "open_s": open_seconds,
            "partitions": info.num_partitions, "threads": torch.get_num_threads(), "lines": lines}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--width", type=int, default=24 * BLOCK, help="values per row (default MiniLM's 73,728)")
    parser.add_argument("--latent", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--store", default=None, help="score this store's rows and stored queries instead "
                                                      "(the index tables are written into it)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--dims", type=int, default=256)
    parser.add_argument("--configs", default="lance:1000,lance:5000,flat:1000,flat:5000,flat:20000",
                        help="search:candidates[:option=value...] entries, comma separated (search: lance = "
                             "IVF_HNSW_SQ, options nprobes / ef / refine_factor; flat)")
    parser.add_argument("--decay", type=float, default=1.5, help="synthetic latent variances (1 + i)^-decay")
    parser.add_argument("--noise", type=float, default=0.1, help="synthetic isotropic noise share of a row's energy")
    parser.add_argument("--damping", default="0.1", help="synthetic queries' lambda / mean variance, comma "
                                                        "separated: --queries queries for each")
    parser.add_argument("--ef", type=int, default=None)
    parser.add_argument("--sample-rows", type=int, default=2048)
    parser.add_argument("--nprobes", type=int, default=None)
    parser.add_argument("--out", default="/tmp/hyperinf_bench_ann")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.store:
        store = LanceStore(args.store)
        queries = [q for q in store.read_queries() if q.method == "hyperinf"]
        source = f"store {args.store}"
    else:
        root = Path(args.out) / f"rows_{args.rows}_{args.width}"
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        store, queries = synthetic_store(root, args.rows, args.width, args.latent, args.queries, decay=args.decay,
                                         noise_share=args.noise,
                                         dampings=tuple(float(d) for d in args.damping.split(",")))
        print(f"synthetic rows written in {time.perf_counter() - start:.0f} s", flush=True)
        source = (f"synthetic, latent {args.latent}, decay {args.decay}, noise {args.noise}, "
                  f"damping {args.damping}")
    measured = spectrum(store, queries, args.dims, args.sample_rows)
    print(f"spectrum ({measured['sample_rows']} sampled rows): eigenvalues ~ i^-{measured['eigen_decay']:.2f}, top "
          f"{measured['dims']} directions hold {measured['row_energy_in_top_m']:.1%} of the rows' energy; per query: "
          + ", ".join(f"{t}: {v['energy_in_top_m']:.1%} of its energy in them, reduced-score corr "
                      f"{v['score_corr']:.3f}" for t, v in measured["queries"].items()), flush=True)
    configs = parse_configs(args.configs)
    result = {"source": source, "spectrum": measured,
              **run(store, queries, k=args.k, dims=args.dims, configs=configs, sample_rows=args.sample_rows,
                    nprobes=args.nprobes, ef=args.ef)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
