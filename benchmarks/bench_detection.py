"""Mislabel detection vs LoRA rank (the paper's experiment (b)): does HyperINF's detection hold as the rank grows?

For every (dataset, LoRA rank, seed) the WHOLE pipeline runs (warm-up LoRA fine-tune, row codec, per-example
gradients stored as the product's default compressed rows (half-whitened int4), preconditioners, queries, the
streaming score scan), with 20% of the pool labels flipped by the dataset builder (the truth kept as `flipped`).
The rankings are read back from the stored `scores` table (`stages.scores.read_scores`):

    hyperinf, datainf, lissa, tracin     target set `clean_val` (a clean held-out set); score = -I(k), higher = more
                                         helpful, so harm = -score
    self_influence_hyperinf / _tracin    target set `self`; score = -S(k) (S = self-influence), harm = -score = S(k)
                                         (as `stages.reports.mislabel_report` reads them)
    loss                                 baseline without any influence: each pool example's cross-entropy on its
                                         (noisy) label under the stored warm-up adapter (harm = loss), one no-grad
                                         forward pass of the pool (`stages.loading.load_current_model`)

Metrics per ranking (`stages.reports.detection_metrics`, the product's mislabel report's): AUROC of the planted
flips (Mann-Whitney, ties half) and the detection rate at 10 / 20 / 30%: the share of ALL flipped examples among
the 10 / 20 / 30% most harmful. Every run also calls the
product's `mislabel_report` on the same store and records the largest difference to it (must be 0).

Recipes: `write_demo_config` (Rotten Tomatoes, `build_demo_dataset`) and `write_bbc_config` (BBC News,
`build_bbc_dataset`) with overrides ONLY for `lora.rank` (alpha = 2 * rank, the recipe's ratio) and `train.seed`
(also the dataset seed: which snippets, which flips, the target split). Nothing else is changed: compression is the
pipeline default, lr 2e-3 linear, 2 epochs (`demo_epochs` for pools >= 450), LoRA on query+value of MiniLM.

Commands (from the repository root, PY=.venv/bin/python):

    $PY benchmarks/bench_detection.py --quick            # tiny random BERT, synthetic pool, 2 ranks (test suite)
    # the grid (one process, runs in order seed > dataset > rank; a run whose JSON exists is skipped)
    nice -n 5 $PY benchmarks/bench_detection.py --dataset demo bbc --ranks 4 8 16 --seeds 0 1 2 \\
        --n-pool 600 --n-target 300 --bbc-n-pool 400 --bbc-n-target 200 --out /tmp/hyperinf_detection/runs \\
        --results-dir benchmarks/results/paper/detection
    # mean +- std over seeds per dataset x rank x ranking, Markdown tables and the PNGs
    $PY benchmarks/bench_detection.py --aggregate benchmarks/results/paper/detection/*_r*_s*.json \\
        --markdown benchmarks/results/paper/detection_tables.md --png-dir docs/img/results

Results and their reading: benchmarks/results/paper/detection.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hyperinf_ops  # noqa: E402
from hyperinf_ops.stages.reports import DETECTION_CUTS, SELF_INFLUENCE_PREFIX, detection_metrics  # noqa: E402

METHODS = ("hyperinf", "datainf", "lissa", "tracin")
SELF_METHODS = ("hyperinf", "tracin")
RANKINGS = (*METHODS, *(f"{SELF_INFLUENCE_PREFIX}{m}" for m in SELF_METHODS), "loss")
METRICS = ("auroc", *(f"detection_at_{p}" for p in DETECTION_CUTS))
TARGET_SET = "clean_val"
SELF_TARGET = "self"
DEFAULT_N_TARGET = {"demo": 500, "bbc": 300, "quick": 40}
DATASET_ORDER = {"demo": 0, "bbc": 1}


def per_example_losses(storage_root: str | Path, spec: Any, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Cross-entropy of every record on its stored (noisy) label under the current adapter
    (`evaluation.example_losses`: eval mode, no grad)."""
    from hyperinf_ops.evaluation import example_losses
    from hyperinf_ops.stages.loading import load_current_model

    loaded, _ = load_current_model(storage_root, spec)
    return example_losses(loaded, records, max_length=spec.max_length)[0].numpy()


def evaluate_store(config_path: Path) -> dict[str, Any]:
    """Every ranking's metrics from a finished pipeline run; the product's mislabel report as a cross-check."""
    from hyperinf_ops.adapters import AdapterStore
    from hyperinf_ops.config import load_config
    from hyperinf_ops.stages.reports import mislabel_report
    from hyperinf_ops.stages.scores import read_scores
    from hyperinf_ops.store import LanceStore

    cfg = load_config(config_path)
    target = next(iter(cfg.targets))
    store = LanceStore(str(cfg.storage_root))
    examples = store.open("examples").to_table(columns=["sample_id", "text", "label", "flipped"]).to_pandas()
    truth = examples.set_index("sample_id")["flipped"].astype(bool)
    rankings: dict[str, dict[str, float]] = {}
    for target_set, method, name in ([(target, m, m) for m in METHODS]
                                     + [(SELF_TARGET, m, f"{SELF_INFLUENCE_PREFIX}{m}") for m in SELF_METHODS]):
        s = read_scores(store, target_set, method)
        if len(s) != len(examples):
            raise SystemExit(f"{target_set}/{method}: {len(s)} scores for {len(examples)} pool examples")
        flipped = truth.reindex(s["sample_id"]).to_numpy(dtype=bool)
        rankings[name] = detection_metrics(-s["score"].to_numpy(dtype=np.float64), flipped)  # harm = -score

    start = time.perf_counter()
    losses = per_example_losses(cfg.storage_root, cfg.model_spec, examples.to_dict("records"))
    loss_seconds = time.perf_counter() - start
    flipped = examples["flipped"].to_numpy(dtype=bool)
    rankings["loss"] = detection_metrics(losses, flipped)

    # the product's own report on the same store: our numbers must be its numbers
    report = mislabel_report(store, list(METHODS), target_set=target, task=cfg.task)
    diff = max(abs(rankings[name][k] - v) for name, row in report.methods.items() if name in rankings
               and name != "loss" for k, v in row.items() if k in rankings[name])
    manifest = AdapterStore(cfg.storage_root).require_current()
    fp = store.fingerprint("gradients")
    return {
        "examples": int(len(examples)), "flipped": int(flipped.sum()), "rankings": rankings,
        "report_max_abs_diff": float(diff), "report_rankings": sorted(report.methods),
        "loss_seconds": loss_seconds,
        "loss_mean": {"clean": float(losses[~flipped].mean()), "flipped": float(losses[flipped].mean())},
        # share of flips the warm-up fits (loss below log 2: the adapter predicts the wrong, given label)
        "flips_fit": float((losses[flipped] < math.log(2)).mean()),
        "rows": {"dtype": fp.row_dtype if fp else None, "whitening": bool(fp and fp.whitening),
                 "sketch_dim": fp.sketch_dim if fp else None},
        "warmup": manifest.train,
    }


# --------------------------------------------------------------------------------------------------- runs


def build_config(dataset: str, out: Path, *, rank: int, seed: int, n_pool: int, n_target: int,
                 model_dir: Path | None = None) -> Path:
    """The dataset under `out` and its bundled recipe with lora.rank (alpha 2 * rank) and train.seed overridden."""
    overrides = {"lora": {"rank": rank, "alpha": 2 * rank}, "train": {"seed": seed}}
    if dataset == "demo":
        from hyperinf_ops.data.demo import build_demo_dataset, write_demo_config

        return write_demo_config(build_demo_dataset(out, n_pool=n_pool, n_target=n_target, seed=seed),
                                 overrides=overrides)
    if dataset == "bbc":
        from hyperinf_ops.data.bbc import build_bbc_dataset, write_bbc_config

        return write_bbc_config(build_bbc_dataset(out, n_target=n_target, seed=seed, n_pool=n_pool),
                                overrides=overrides)
    # quick: a tiny random BERT and a synthetic sentiment pool (the test fixtures), the pipeline unchanged
    sys.path.insert(0, str(REPO / "tests"))
    from hyperinf_project import make_project  # noqa: PLC0415 (test fixture, quick mode only)

    assert model_dir is not None
    return make_project(out, model_dir, n_pool=n_pool, n_target=n_target, estimators=list(METHODS),
                        targets={TARGET_SET: {"path": "targets/clean.parquet"}},
                        curation={"query": "top_fraction",
                                  "params": {"fraction": 0.5, "target_set": TARGET_SET, "method": "hyperinf"}},
                        lora={"rank": rank, "alpha": 2 * rank, "modules": ["query", "value"]},
                        train={"epochs": 10, "lr": 3.0e-2, "batch_size": 8, "seed": seed})


def run_one(dataset: str, out: Path, *, rank: int, seed: int, n_pool: int, n_target: int,
            model_dir: Path | None = None, log=print) -> dict[str, Any]:
    """Build, run the whole pipeline (Dagster in-process runner), evaluate; the result dict of one run."""
    import dagster as dg

    from hyperinf_ops.config import load_config
    from pipelines.runner import failed_checks, materialize_all

    start = time.perf_counter()
    config_path = build_config(dataset, out, rank=rank, seed=seed, n_pool=n_pool, n_target=n_target,
                               model_dir=model_dir)
    cfg = load_config(config_path)
    with dg.DagsterInstance.ephemeral() as instance:
        report = materialize_all(instance, config_path, cfg, log=lambda _: None)
        failed = failed_checks(instance, report.runs)
        if not all(r.is_success for r in report.runs):
            raise SystemExit(f"{dataset} r={rank} seed={seed}: a pipeline run failed")
    pipeline_s = time.perf_counter() - start
    result = {"dataset": dataset, "rank": rank, "alpha": 2 * rank, "seed": seed, "n_pool": n_pool,
              "n_target": n_target, "config": cfg.to_dict(), "failed_checks": failed,
              **evaluate_store(config_path), "pipeline_seconds": pipeline_s,
              "seconds": time.perf_counter() - start}
    log(f"{dataset} r={rank:<2d} seed={seed} ({result['examples']} ex, {result['flipped']} flipped): "
        + "  ".join(f"{SHORT[k]} {v['auroc']:.3f}" for k, v in result["rankings"].items())
        + f"  [{pipeline_s:.0f} s pipeline, {result['seconds']:.0f} s total]")
    return result


SHORT = {"hyperinf": "hyper", "datainf": "dinf", "lissa": "lissa", "tracin": "tracin",
         "self_influence_hyperinf": "si_hyp", "self_influence_tracin": "si_tr", "loss": "loss"}


def run_grid(datasets: Sequence[str], ranks: Sequence[int], seeds: Sequence[int], n_pool: Mapping[str, int],
             n_target: Mapping[str, int], out: Path, results_dir: Path | None, json_path: Path | None,
             model_dir: Path | None = None) -> list[dict]:
    """Every (seed, dataset, rank), in that order (seeds outermost: a cut-short grid still covers every cell);
    one JSON per run in `results_dir` as soon as it finishes (an existing one is read, not rerun)."""
    results = []
    for seed in seeds:
        for dataset in datasets:
            for rank in ranks:
                name = f"{dataset}_r{rank}_s{seed}"
                path = results_dir / f"{name}.json" if results_dir else None
                if path is not None and path.is_file():
                    done = json.loads(path.read_text())
                    if done["n_pool"] != n_pool[dataset]:
                        raise SystemExit(f"{path} has n_pool {done['n_pool']}, not {n_pool[dataset]}: move it away")
                    results.append(done)
                    print(f"{name}: done before ({path})", flush=True)
                    continue
                result = run_one(dataset, out / name, rank=rank, seed=seed, n_pool=n_pool[dataset],
                                 n_target=n_target[dataset], model_dir=model_dir,
                                 log=lambda s: print(s, flush=True))
                result["machine"] = machine()
                results.append(result)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(result, indent=1))
                if json_path is not None:
                    json_path.parent.mkdir(parents=True, exist_ok=True)
                    json_path.write_text(json.dumps(results, indent=1))
    return results


def machine() -> dict[str, Any]:
    return {"code": str(Path(hyperinf_ops.__file__).resolve().parents[1]), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "platform": platform.platform(), "load_avg": os.getloadavg()}


# ---------------------------------------------------------------------------------------------- aggregate


def aggregate(results: Sequence[Mapping]) -> dict[str, dict[int, dict[str, dict[str, dict[str, float]]]]]:
    """dataset -> rank -> ranking -> metric -> {mean, std (sample, 0 for one run), n, values}."""
    cells: dict[tuple[str, int, str, str], list[float]] = {}
    for r in sorted(results, key=lambda r: (DATASET_ORDER.get(r["dataset"], 9), r["rank"], r["seed"])):
        for ranking, row in r["rankings"].items():
            for metric in METRICS:
                cells.setdefault((r["dataset"], r["rank"], ranking, metric), []).append(row[metric])
    out: dict = {}
    for (dataset, rank, ranking, metric), values in cells.items():
        out.setdefault(dataset, {}).setdefault(rank, {}).setdefault(ranking, {})[metric] = {
            "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}
    return out


def _cell(stat: Mapping[str, Any]) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown_tables(agg: Mapping) -> str:
    """Per dataset: AUROC (rankings x ranks) and detection at 10 / 20 / 30% (one table per cut)."""
    lines = []
    for dataset, by_rank in agg.items():
        ranks = sorted(by_rank)
        rankings = [k for k in RANKINGS if any(k in by_rank[r] for r in ranks)]
        seeds = sorted({by_rank[r][k]["auroc"]["n"] for r in ranks for k in by_rank[r]})
        for metric in METRICS:
            title = "AUROC" if metric == "auroc" else f"detection at {metric.rsplit('_', 1)[1]}%"
            lines += [f"**{dataset}: {title}** (mean ± std over seeds; runs per cell: "
                      f"{', '.join(map(str, seeds))})", "",
                      "| ranking | " + " | ".join(f"r={r}" for r in ranks) + " |",
                      "|---|" + "---|" * len(ranks)]
            for k in rankings:
                cells = []
                for r in ranks:
                    cells.append(_cell(by_rank[r][k][metric]) if k in by_rank[r] else "-")
                lines.append(f"| {k} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


PAIRS = (("hyperinf", "datainf"), ("hyperinf", "lissa"), ("hyperinf", "tracin"),
         ("self_influence_hyperinf", "hyperinf"), ("loss", "hyperinf"))


def _by_seed(results: Sequence[Mapping], metric: str = "auroc") -> dict[tuple[str, int], dict[int, dict[str, float]]]:
    """(dataset, rank) -> seed -> ranking -> metric."""
    out: dict = {}
    for r in results:
        out.setdefault((r["dataset"], r["rank"]), {})[r["seed"]] = {k: v[metric] for k, v in r["rankings"].items()}
    return out


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.3f} ± {std:.3f}"


def markdown_paired(results: Sequence[Mapping], metric: str = "auroc") -> str:
    """Per dataset: paired differences of `metric` (same dataset, rank and seed) between rankings, with wins of
    the first (e.g. `3/3`), and each ranking's change from the smallest to the largest rank, paired by seed."""
    cells = _by_seed(results, metric)
    lines = []
    for dataset in sorted({d for d, _ in cells}, key=lambda d: (DATASET_ORDER.get(d, 9), d)):
        ranks = sorted(r for d, r in cells if d == dataset)
        lines += [f"**{dataset}: paired {metric} differences (same seed; mean ± std over seeds, wins of the first)**",
                  "", "| difference | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---|" + "---|" * len(ranks)]
        for a, b in PAIRS:
            row = []
            for rank in ranks:
                diffs = [v[a] - v[b] for v in cells[(dataset, rank)].values() if a in v and b in v]
                row.append(f"{_mean_std(diffs)} ({sum(d > 0 for d in diffs)}/{len(diffs)})" if diffs else "-")
            lines.append(f"| {a} − {b} | " + " | ".join(row) + " |")
        lines.append("")
        lo, hi = ranks[0], ranks[-1]
        if lo != hi:
            seeds = sorted(set(cells[(dataset, lo)]) & set(cells[(dataset, hi)]))
            lines += [f"**{dataset}: change of {metric} from r={lo} to r={hi}** (paired by seed; seeds "
                      f"{', '.join(map(str, seeds))})", "", "| ranking | change |", "|---|---|"]
            for k in RANKINGS:
                diffs = [cells[(dataset, hi)][s][k] - cells[(dataset, lo)][s][k] for s in seeds
                         if k in cells[(dataset, hi)][s] and k in cells[(dataset, lo)][s]]
                lines.append(f"| {k} | {_mean_std(diffs)} |")
            lines.append("")
    return "\n".join(lines)


def text_table(agg: Mapping) -> str:
    lines = []
    for dataset, by_rank in agg.items():
        lines.append(f"{dataset}: AUROC / det@10 / det@20 / det@30, mean ± std over seeds")
        for rank in sorted(by_rank):
            for k in RANKINGS:
                if k in by_rank[rank]:
                    row = by_rank[rank][k]
                    lines.append(f"  r={rank:<3d} {k:<24s} n={row['auroc']['n']} "
                                 + "  ".join(f"{m.replace('detection_at_', 'd@')}={_cell(row[m])}" for m in METRICS))
    return "\n".join(lines)


def plot(agg: Mapping, png_dir: Path, metric: str = "auroc") -> list[Path]:
    """One PNG per dataset: `metric` vs LoRA rank, one line per ranking, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    styles = {"hyperinf": ("C0", "o", "-"), "datainf": ("C1", "s", "-"), "lissa": ("C2", "^", "-"),
              "tracin": ("C3", "v", "-"), "self_influence_hyperinf": ("C0", "o", "--"),
              "self_influence_tracin": ("C3", "v", "--"), "loss": ("k", "x", ":")}
    label = "AUROC" if metric == "auroc" else f"detection at {metric.rsplit('_', 1)[1]}%"
    for dataset, by_rank in agg.items():
        ranks = sorted(by_rank)
        fig, ax = plt.subplots(figsize=(8.4, 4.4))
        for i, k in enumerate(r for r in RANKINGS if all(r in by_rank[x] for x in ranks)):
            color, marker, ls = styles[k]
            xs = [r * (1 + 0.03 * (i - 3)) for r in ranks]  # a small offset so error bars do not overlap
            ax.errorbar(xs, [by_rank[r][k][metric]["mean"] for r in ranks],
                        yerr=[by_rank[r][k][metric]["std"] for r in ranks], color=color, marker=marker,
                        linestyle=ls, capsize=3, label=k, mfc="none" if ls == "--" else color)
        n = sorted({by_rank[r][k][metric]["n"] for r in ranks for k in by_rank[r]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank (alpha = 2 rank)")
        ax.set_ylabel(f"mislabel {label}")
        ax.set_title(f"{dataset}: mislabel {label} vs LoRA rank (mean ± std over {'/'.join(map(str, n))} seeds)",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path = png_dir / f"detection_{metric.replace('detection_at_', 'at')}_{dataset}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, synthetic pool, ranks 2 and 4")
    parser.add_argument("--dataset", nargs="+", choices=("demo", "bbc"), default=["demo"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-pool", type=int, default=1000, help="pool size (every dataset)")
    parser.add_argument("--bbc-n-pool", type=int, default=None, help="BBC pool size (default: --n-pool)")
    parser.add_argument("--n-target", type=int, default=None, help="target set size (default demo 500, bbc 300)")
    parser.add_argument("--bbc-n-target", type=int, default=None, help="BBC target set size (default: --n-target)")
    parser.add_argument("--out", type=Path, help="working folder (datasets, stores)")
    parser.add_argument("--results-dir", type=Path, help="one JSON per run, written as it finishes")
    parser.add_argument("--json", type=Path, help="all results of this invocation (rewritten after every run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared cores)")
    parser.add_argument("--aggregate", nargs="+", type=Path, help="per-run JSON files (or lists of results)")
    parser.add_argument("--markdown", type=Path, help="--aggregate: write the Markdown tables here")
    parser.add_argument("--png-dir", type=Path, help="--aggregate: write detection_*.png here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.aggregate:
        results: list[dict] = []
        for p in args.aggregate:
            doc = json.loads(p.read_text())
            results += doc if isinstance(doc, list) else [doc]
        agg = aggregate(results)
        print(text_table(agg))
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(markdown_tables(agg) + "\n" + markdown_paired(results) + "\n")
            print(f"wrote {args.markdown}")
        if args.png_dir:
            for metric in ("auroc", "detection_at_20"):
                for path in plot(agg, args.png_dir, metric):
                    print(f"wrote {path}")
        return agg

    if args.quick:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench_detection_") as tmp:
            sys.path.insert(0, str(REPO / "tests"))
            from tiny_models import save_tiny_model  # noqa: PLC0415 (test fixture, quick mode only)

            model_dir = save_tiny_model(Path(tmp) / "tiny_bert")
            results = run_grid(["quick"], [2, 4], [0], {"quick": 160}, {"quick": DEFAULT_N_TARGET["quick"]},
                               Path(tmp), None, args.json, model_dir=model_dir)
        agg = aggregate(results)
        print(text_table(agg))
        print(f"--quick: {time.perf_counter() - start:.1f} s")
        return results

    if args.out is None:
        parser.error("give --quick, --aggregate, or --out DIR for the grid")
    n_pool = {d: args.n_pool for d in args.dataset}
    if args.bbc_n_pool is not None:
        n_pool["bbc"] = args.bbc_n_pool
    n_target = {d: args.n_target or DEFAULT_N_TARGET[d] for d in args.dataset}
    if args.bbc_n_target is not None:
        n_target["bbc"] = args.bbc_n_target
    start = time.perf_counter()
    results = run_grid(args.dataset, args.ranks, args.seeds, n_pool, n_target, args.out, args.results_dir,
                       args.json)
    print(text_table(aggregate(results)))
    print(f"grid: {len(results)} runs, {time.perf_counter() - start:.0f} s wall")
    return results


if __name__ == "__main__":
    main()
