"""Does curation help? Fresh adapters fit on each method's curated subset vs random subsets vs the full pool.

Experiments (c) and (d) of the paper's "does curation help?" section, run through the product's own `evaluation`
asset (hyperinf_ops/stages/evaluation.py): the whole pipeline (warm-up LoRA, gradients, preconditioners,
influence scores) runs in-process on an ephemeral Dagster instance (`pipelines.runner.materialize_all`) with an
`evaluation:` block, which fine-tunes a fresh adapter with the warm-up recipe (seed s = 0, 1, ...) on

    curated  the `top_fraction` rows of one method's ranking of the target set (sql/top_fraction.sql)
    random   as many pool rows, drawn with seed s (one random subset per seed)
    full     the whole pool

and tests it on a held-out test file. Reported per (subset, method, fraction): mean +- sample std over the seeds
of test accuracy and test loss (`stages.evaluation_plan.summarize`), and the mean number of planted label flips kept.

    (c) BBC News: MiniLM, the bundled BBC recipe (data/bbc.py: demo warm-up, max_length 128), 20% of the pool's
        labels flipped, target = the clean topic-balanced target set, test = a clean held-out split.
    (d) SmolLM2-135M-Instruct (causal_lm, LoRA q_proj/v_proj r=8, bench_scale.py's CAUSAL_CONFIG) on chatterbot
        prompt/response pairs: target = held-out pairs of one topic, test = other held-out pairs of that topic,
        metric = test loss on the topic (lower is better).
    Rotten Tomatoes: the bundled demo (`hyperinf demo --evaluate`), read from its finished store with --report.

Commands (2 shared CPU cores: one torch thread each, run one after the other; a rerun resumes from the stored fits):

    python benchmarks/bench_selection.py --quick        # tiny random BERT, synthetic pool, seconds (the test suite)
    python benchmarks/bench_selection.py --dataset bbc --out /tmp/selection/bbc --n-pool 400 --n-test 150 \\
        --fractions 0.5 --methods hyperinf datainf tracin --train '{"epochs": 2}' --seeds 2 \\
        --json benchmarks/results/paper/selection/bbc.json
    python benchmarks/bench_selection.py --dataset chatterbot --out /tmp/selection/chatterbot --n-pool 120 \\
        --topic emotion --fractions 0.2 --methods hyperinf datainf tracin \\
        --train '{"epochs": 1, "lr": 2e-3, "batch_size": 4}' --seeds 2 \\
        --json benchmarks/results/paper/selection/chatterbot.json
    python benchmarks/bench_selection.py --report "BBC News=/tmp/selection/bbc" \\
        "SmolLM2 chatterbot=/tmp/selection/chatterbot" "Rotten Tomatoes (bundled demo)=/tmp/demo_eval" \\
        --markdown benchmarks/results/paper/selection_tables.md --png-dir docs/img/results \\
        --json benchmarks/results/paper/selection/report.json

--report takes NAME=DIR (DIR: a --out folder, a `hyperinf demo --workdir` folder, or a storage root); it only
reads the finished `evaluation` tables and writes one Markdown table and one PNG (`selection_<slug>.png`: test
accuracy, or test loss for a causal LM, vs the fraction kept; a line per curated method and random with error
bars = std over seeds; the full pool dashed) per dataset. Results and their reading:
benchmarks/results/paper/selection.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

METHODS = ("hyperinf", "datainf", "tracin")
DEFAULTS: dict[str, dict[str, Any]] = {
    # pool / target / test sizes, fractions kept, training seeds
    "bbc": {"n_pool": 400, "n_target": 300, "n_test": 150, "fractions": [0.5], "seeds": 3},
    "chatterbot": {"n_pool": 120, "n_target": 30, "n_test": 40, "fractions": [0.2], "seeds": 3},
    "quick": {"n_pool": 120, "n_target": 40, "n_test": 40, "fractions": [0.5], "seeds": 2},
}


# ------------------------------------------------------------------------------------------------ configs


def _evaluation_block(fractions: Sequence[float], seeds: int, methods: Sequence[str], target_set: str) -> dict:
    # the paper's selection: top_fraction subsets (keep the best fraction); full and balance explicit:
    # write_demo_config would otherwise merge the demo's own defaults (DEMO_EVALUATION)
    return {"queries": ["top_fraction"], "fractions": list(fractions), "seeds": seeds, "methods": list(methods),
            "target_set": target_set, "full": True, "balance": False}


def build_quick(out: Path, fractions: Sequence[float], seeds: int, methods: Sequence[str], n_pool: int,
                n_target: int) -> Path:
    """tests/hyperinf_project.py's tiny project (random 2-layer BERT, synthetic pool with 20% flips, clean target
    set and test split) with an evaluation block; returns the config path."""
    sys.path.insert(0, str(REPO / "tests"))
    from hyperinf_project import make_project  # noqa: PLC0415 (test fixture, quick mode only)

    evaluation = {"test": {"path": "test/test.parquet"}, **_evaluation_block(fractions, seeds, methods, "clean")}
    return make_project(out, out / "model", n_pool=n_pool, n_target=n_target, estimators=list(methods),
                        evaluation=evaluation,
                        curation={"method": "fixed", "query": "top_fraction",
                                  "params": {"fraction": fractions[0], "target_set": "clean", "method": methods[0]}})


def build_bbc(out: Path, fractions: Sequence[float], seeds: int, methods: Sequence[str], n_pool: int, n_target: int,
              n_test: int, train: Mapping[str, Any]) -> Path:
    """BBC News (data/bbc.py, 20% flips) and the bundled BBC config (`train` merged into its recipe) with an
    evaluation block; the config path."""
    from hyperinf_ops.data.bbc import build_bbc_dataset, write_bbc_config

    paths = build_bbc_dataset(out / "data", n_target=n_target, n_pool=n_pool, n_test=n_test, seed=0)
    overrides = {"estimators": list(methods), **({"train": dict(train)} if train else {}),
                 "curation": {"method": "fixed", "query": "top_fraction",
                              "params": {"fraction": fractions[0], "target_set": "clean_val", "method": methods[0]}}}
    return write_bbc_config(paths, out / "hyperinf.yaml", overrides=overrides,
                            evaluation=_evaluation_block(fractions, seeds, methods, "clean_val"))


def build_chatterbot(out: Path, fractions: Sequence[float], seeds: int, methods: Sequence[str], n_pool: int,
                     n_target: int, n_test: int, topic: str, train: Mapping[str, Any]) -> Path:
    """Chatterbot pairs (data/chatterbot.py: target and test = held-out pairs of `topic`) and bench_scale.py's
    SmolLM2 config (`train` merged into its recipe) with an evaluation block; the config path."""
    import yaml
    from bench_scale import CAUSAL_CONFIG

    from hyperinf_ops.data.chatterbot import build_chatterbot_dataset

    paths = build_chatterbot_dataset(out / "data", n_pool=n_pool, n_target=n_target, target_topic=topic,
                                     n_test=n_test, n_shards=2, seed=0)
    rel = lambda p: str(Path(p).resolve().relative_to(out.resolve()))  # noqa: E731
    doc = {**CAUSAL_CONFIG, "storage_root": "store",
           "train": {**CAUSAL_CONFIG["train"], "seed": 0, **train},
           "estimators": list(methods),
           "data": {"path": rel(paths.pool_dir), "label_column": "label"},
           "targets": {topic: {"path": rel(paths.target)}},
           "curation": {"query": "top_fraction",
                        "params": {"fraction": fractions[0], "target_set": topic, "method": methods[0]}},
           "evaluation": {"test": {"path": rel(paths.test)}, **_evaluation_block(fractions, seeds, methods, topic)}}
    path = out / "hyperinf.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ running


def run_pipeline(config_path: Path, log=print) -> dict[str, Any]:
    """Everything the config asks for (the evaluation asset included) on an ephemeral Dagster instance."""
    import dagster as dg

    from hyperinf_ops.config import load_config
    from pipelines.runner import failed_checks, materialize_all

    cfg = load_config(config_path)
    start = time.perf_counter()
    with dg.DagsterInstance.ephemeral() as instance:
        report = materialize_all(instance, config_path, cfg, log=log)
        failed = failed_checks(instance, report.runs)
        if not all(r.is_success for r in report.runs):
            raise SystemExit(f"{config_path}: a pipeline run failed")
    return {"config": cfg.to_dict(), "storage_root": str(cfg.storage_root), "failed_checks": failed,
            "pipeline_seconds": time.perf_counter() - start}


def store_root(folder: str | Path) -> Path:
    """A storage root (has lance/), or the `store` folder of a run / demo workdir."""
    folder = Path(folder)
    return folder if (folder / "lance").is_dir() else folder / "store"


def read_evaluation(root: str | Path) -> dict[str, Any]:
    """The stored `evaluation` rows of a finished run, their summary (`stages.evaluation_plan.summarize`), the pool's
    size and flips, and per curated (method, fraction) what `top_fraction` selects now: its size, flips and label
    counts (the evaluation rows must agree: `matches_query`)."""
    from hyperinf_ops.query import connect, run_query
    from hyperinf_ops.stages.evaluation import EVALUATION_TABLE
    from hyperinf_ops.stages.evaluation_plan import summarize
    from hyperinf_ops.store import LanceStore

    store = LanceStore(str(store_root(root)))
    rows = store.open(EVALUATION_TABLE).to_table().to_pylist()
    for r in rows:
        r["created_at"] = r["created_at"].isoformat()
    rows.sort(key=lambda r: (r["seed"], r["subset"], r["method"] or "", r["fraction"]))
    con = connect(store)
    try:
        examples = con.sql("SELECT * FROM examples").to_arrow_table()
        has_flips = "flipped" in examples.schema.names
        flipped = dict(zip(examples["sample_id"].to_pylist(),
                           examples["flipped"].to_pylist() if has_flips else [None] * examples.num_rows, strict=True))
        label = dict(zip(examples["sample_id"].to_pylist(), map(str, examples["label"].to_pylist()), strict=True))
        queries = {}
        for r in rows:
            key = (r["method"], r["fraction"], r["target_set"], r["balance"])
            if r["subset"] != "curated" or key in queries:
                continue
            ids = run_query(con, "top_fraction", {"target_set": r["target_set"], "method": r["method"],
                                                  "fraction": r["fraction"], "balance": r["balance"]})
            ids = ids["sample_id"].to_pylist()
            counts: dict[str, int] = {}
            for i in ids:
                counts[label[i]] = counts.get(label[i], 0) + 1
            queries[key] = {"method": r["method"], "fraction": r["fraction"], "n_examples": len(ids),
                            "n_flipped": int(sum(flipped[i] for i in ids)) if has_flips else None,
                            "label_counts": dict(sorted(counts.items()))}
    finally:
        con.close()
    for r in rows:
        if r["subset"] == "curated":
            q = queries[(r["method"], r["fraction"], r["target_set"], r["balance"])]
            # label_counts of a causal-LM fit count the records' labels too (the topic column)
            r["matches_query"] = (r["n_examples"] == q["n_examples"] and r["n_flipped"] == q["n_flipped"]
                                  and json.loads(r["label_counts"]) == q["label_counts"])
    pool_counts: dict[str, int] = {}
    for v in label.values():
        pool_counts[v] = pool_counts.get(v, 0) + 1
    summary = summarize(rows)
    # a target set named after a pool label (chatterbot: the topic): how many of its label each subset kept
    topic = next((r["target_set"] for r in rows if r["target_set"] in pool_counts), None)
    for s in summary:
        members = [r for r in rows if (r["subset"], variant(r), r["fraction"]) == (s["subset"], variant(s),
                                                                                     s["fraction"])]
        s["topic_kept"] = None if topic is None else \
            sum(json.loads(r["label_counts"]).get(topic, 0) for r in members) / len(members)
    return {"storage_root": str(store_root(root)), "n_pool": len(flipped), "topic": topic,
            "vs_random": versus_random(rows),
            "pool_flipped": int(sum(flipped.values())) if has_flips else None,
            "pool_label_counts": dict(sorted(pool_counts.items())),
            "fits": len(rows), "fit_seconds": float(sum(r["seconds"] for r in rows)),
            "summary": summary, "queries": list(queries.values()), "rows": rows}


def variant(row: Mapping[str, Any]) -> str | None:
    """The curated subset's method, marked when class-balanced (`balance`); None for random and full."""
    if not row["method"]:
        return None
    return f"{row['method']}, balanced" if row.get("balance") else row["method"]


def versus_random(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per curated (method, fraction) and metric: curated minus random, per seed (the same training seed) and on
    average, beside the spread over seeds of each (accuracy: higher is better; loss: lower is better)."""
    out = []
    for metric in ("test_accuracy", "test_loss"):
        by = {(r["subset"], variant(r), r["fraction"], r["seed"]): r[metric] for r in rows if r[metric] is not None}
        for (subset, method, fraction, _) in sorted({k[:3] + (0,) for k in by if k[0] == "curated"}):
            seeds = sorted(k[3] for k in by if k[:3] == (subset, method, fraction) and ("random", None, fraction, k[3])
                           in by)
            if not seeds:
                continue
            cur = np.array([by[subset, method, fraction, s] for s in seeds])
            rnd = np.array([by["random", None, fraction, s] for s in seeds])
            out.append({"metric": metric, "method": method, "fraction": fraction, "seeds": seeds,
                        "paired_diff": (cur - rnd).tolist(), "mean_diff": float((cur - rnd).mean()),
                        "curated_std": float(cur.std(ddof=1)) if len(seeds) > 1 else None,
                        "random_std": float(rnd.std(ddof=1)) if len(seeds) > 1 else None})
    return out


def run_dataset(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    kind = "quick" if args.quick else args.dataset
    d = DEFAULTS[kind]
    n_pool, n_target, n_test = args.n_pool or d["n_pool"], args.n_target or d["n_target"], args.n_test or d["n_test"]
    fractions, seeds = args.fractions or d["fractions"], args.seeds or d["seeds"]
    methods = args.methods
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if kind == "quick":
        config_path = build_quick(out, fractions, seeds, methods, n_pool, n_target)
    elif kind == "bbc":
        config_path = build_bbc(out, fractions, seeds, methods, n_pool, n_target, n_test, args.train or {})
    else:
        config_path = build_chatterbot(out, fractions, seeds, methods, n_pool, n_target, n_test, args.topic,
                                       args.train or {})
    run = run_pipeline(config_path, log=print if not args.quick else (lambda _: None))
    result = {"dataset": kind, "n_target": n_target, "n_test": n_test, "fractions": list(fractions),
              "seeds": seeds, "methods": list(methods), "topic": args.topic if kind == "chatterbot" else None,
              "config_path": str(config_path), **run, **read_evaluation(run["storage_root"]),
              "wall_seconds": time.perf_counter() - start}
    print(markdown_table(result["summary"], result["topic"]))
    print(f"{kind}: {result['fits']} fits, pipeline + evaluation {result['pipeline_seconds']:.0f} s "
          f"(fits {result['fit_seconds']:.0f} s), failed checks: {result['failed_checks'] or 'none'}")
    return result


# ------------------------------------------------------------------------------------------------ report


def _pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(summary: Sequence[Mapping[str, Any]], topic: str | None = None) -> str:
    """One row per (subset, method, fraction) of `summarize`: mean ± std over seeds (and, with `topic`, the mean
    number of that topic's pairs kept)."""
    extra = f" {topic} pairs kept |" if topic else ""
    lines = ["| subset | method | fraction | examples | fits (seeds) | test accuracy | test loss | flipped kept |"
             + extra, "|---|---|---|---|---|---|---|---|" + ("---|" if topic else "")]
    for r in summary:
        flips = "-" if r["n_flipped"] is None else f"{r['n_flipped']:.1f}"
        kept = f" {r['topic_kept']:.1f} |" if topic and r.get("topic_kept") is not None else (" - |" if topic else "")
        lines.append(f"| {r['subset']} | {variant(r) or '-'} | {r['fraction']:g} | {r['n_examples']} | {r['fits']} "
                     f"| {_pm(r['test_accuracy'], r['test_accuracy_std'])} "
                     f"| {_pm(r['test_loss'], r['test_loss_std'])} | {flips} |" + kept)
    return "\n".join(lines)


def versus_table(vs: Sequence[Mapping[str, Any]]) -> str:
    """Curated minus random (same training seed), per method and fraction: mean and per seed."""
    lines = ["| method | fraction | metric | curated - random (mean) | per seed | std curated / random |",
             "|---|---|---|---|---|---|"]
    for v in vs:
        stds = "-" if v["curated_std"] is None else f"{v['curated_std']:.3f} / {v['random_std']:.3f}"
        lines.append(f"| {v['method']} | {v['fraction']:g} | {v['metric'].replace('test_', 'test ')} "
                     f"| {v['mean_diff']:+.3f} | {', '.join(f'{d:+.3f}' for d in v['paired_diff'])} | {stds} |")
    return "\n".join(lines)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def plot(name: str, summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Test accuracy (test loss when there is none) vs fraction kept: a line per curated method and random,
    error bars = std over seeds, the full pool dashed (its std as a band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "test_accuracy" if any(r["test_accuracy"] is not None for r in summary) else "test_loss"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[str, list[Mapping[str, Any]]] = {}
    for r in summary:
        if r["subset"] in ("curated", "random"):
            series.setdefault(f"curated ({variant(r)})" if r["method"] else "random", []).append(r)
    fractions = sorted({r["fraction"] for r in summary if r["subset"] in ("curated", "random")})
    for i, (label, rows) in enumerate(sorted(series.items(), key=lambda kv: kv[0] == "random")):
        rows = sorted(rows, key=lambda r: r["fraction"])
        offset = 0.006 * (i - (len(series) - 1) / 2)  # so the error bars do not overlap
        ax.errorbar([r["fraction"] + offset for r in rows], [r[key] for r in rows],
                    yerr=[r[f"{key}_std"] or 0.0 for r in rows], marker="o" if label != "random" else "s",
                    color="0.4" if label == "random" else f"C{i}", capsize=3,
                    linestyle=":" if label == "random" else "-", label=label)
    for r in summary:
        if r["subset"] in ("full", "oracle"):
            ax.axhline(r[key], color="k" if r["subset"] == "full" else "g", linestyle="--",
                       label=f"{r['subset']} pool ({r['n_examples']}): {r[key]:.3f}")
            if r[f"{key}_std"]:
                ax.axhspan(r[key] - r[f"{key}_std"], r[key] + r[f"{key}_std"], color="k", alpha=0.07)
    if fractions:
        pad = max(0.05, 0.1 * (fractions[-1] - fractions[0]))
        ax.set_xlim(fractions[0] - pad, fractions[-1] + pad)
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    seeds = sorted({r["fits"] for r in summary})
    ax.set_xlabel("fraction of the pool kept")
    ax.set_ylabel(key.replace("_", " ") + (" (lower is better)" if key == "test_loss" else ""))
    ax.set_title(f"{name}: fresh adapters, seeds per point: {', '.join(map(str, seeds))}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(specs: Sequence[str], markdown: Path | None, png_dir: Path | None) -> dict[str, Any]:
    """NAME=DIR per dataset: read its finished evaluation table, a Markdown table and a PNG each."""
    out, sections = {}, []
    for spec in specs:
        name, _, folder = spec.rpartition("=")
        name = name or Path(folder).name
        result = read_evaluation(folder)
        result.pop("rows")
        flips = f", {result['pool_flipped']} flipped labels" if result["pool_flipped"] is not None else ""
        text = f"### {name}\n\n{result['n_pool']} pool examples{flips}; {result['fits']} fits " \
               f"({result['fit_seconds']:.0f} s of fitting).\n\n{markdown_table(result['summary'], result['topic'])}\n"
        if result["vs_random"]:
            text += f"\nCurated minus random, same training seed:\n\n{versus_table(result['vs_random'])}\n"
        if png_dir is not None:
            result["png"] = str(plot(name, result["summary"], png_dir / f"selection_{slug(name)}.png"))
            text += f"\n![{name}](img/results/{Path(result['png']).name})\n"
        sections.append(text)
        out[name] = result
    doc = "\n".join(sections)
    print(doc)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(doc)
    return out


# --------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, synthetic pool (seconds)")
    parser.add_argument("--dataset", choices=("bbc", "chatterbot"), help="build, run the pipeline, evaluate")
    parser.add_argument("--out", type=Path, help="working folder (data, config, store); a rerun resumes")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--n-pool", type=int, default=None, help="pool size (default bbc 400, chatterbot 120)")
    parser.add_argument("--n-target", type=int, default=None, help="target set size (bbc 300, chatterbot 30)")
    parser.add_argument("--n-test", type=int, default=None, help="test split size (bbc 150, chatterbot 40)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None, help="(bbc 0.5, chatterbot 0.2)")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per subset (default 3)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="rankings to curate from")
    parser.add_argument("--topic", default="emotion", help="chatterbot: the target / test topic")
    parser.add_argument("--train", type=json.loads, default=None,
                        help='train overrides of the dataset\'s recipe, e.g. \'{"epochs": 2}\'')
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared cores)")
    parser.add_argument("--report", nargs="+", metavar="NAME=DIR", help="read finished runs; tables and PNGs")
    parser.add_argument("--markdown", type=Path, help="--report: write the Markdown tables here")
    parser.add_argument("--png-dir", type=Path, help="--report: write selection_<name>.png here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.report:
        result = report(args.report, args.markdown, args.png_dir)
    elif args.quick or args.dataset:
        out = args.out or Path(tempfile.mkdtemp(prefix="bench_selection_"))
        result = run_dataset(args, out)
    else:
        parser.error("one of --quick, --dataset or --report")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
