"""The LLM demo's evaluation, read back and tabulated: does curated 5% / 20% of a mixed instruction pool beat random
subsets of the same size, the embedding-similarity baseline and the full pool on the target task?

The run is the product's own (`hyperinf demo --llm --evaluate`, hyperinf_ops/data/instructions.py): SmolLM2-135M-
Instruct, 2,038 prompt/response pairs from four packaged sources (30% of the templated answers wrong), a target
set of 50 BBC News headline -> section pairs and 142 test pairs of that task; the `evaluation` asset fine-tunes a
fresh LoRA adapter with the warm-up recipe on every candidate (`top_fraction` of each configured ranking at each
configured fraction; the subsets for `evaluation.subset_epochs` epochs when set), on random subsets of the same
sizes and on the full pool, for 3 training seeds, and scores each on the reported half of the test split: mean
response-token loss and exact match (greedy decoding reproduces the section word). This script reads that
`evaluation` table, the `scores` and the pool, and prints (and writes as JSON / markdown):

    per option     test loss and exact match, mean +- std over seeds; the subset's share of target-task pairs
                   and of wrong answers (from the pool's `wrong_answer` column, which the pipeline never reads)
    per candidate  its paired difference with random of its size and with similarity at its fraction, per seed:
                   "beats" = lower test loss in every seed

Commands (PY=.venv/bin/python; 2 shared CPU cores):

    $PY -m pipelines.cli demo --llm --evaluate --workdir /tmp/llm       # or: hyperinf demo --llm --evaluate
    $PY benchmarks/bench_llm.py --workdir /tmp/llm --out benchmarks/results/llm

Another target task from the same sources (the pool is built the same way; the target set and test split are
held-out pairs of that source, balanced by answer), then the same pipeline and table:

    $PY benchmarks/bench_llm.py --workdir /tmp/llm_rt --build-task rotten_tomatoes [--methods m1 m2 ...]
    $PY -m pipelines.cli run --config /tmp/llm_rt/llm/hyperinf.yaml
    $PY benchmarks/bench_llm.py --workdir /tmp/llm_rt --out benchmarks/results/llm/rotten_tomatoes

Another warm-up of the same pool (a store whose config differs only in `train.seed`, say, with the rankings
scored): its curated subsets fitted with the workdir's evaluation recipe, seeds and test halves, so each fit pairs
seed by seed with the workdir's own random, similarity and full-pool fits (`--fit-from NAME=STORE_ROOT`, appended to
the tables; with `--methods` only those rankings):

    $PY benchmarks/bench_llm.py --workdir /tmp/llm --fit-from "warm-up seed 0=/tmp/other/store" --out OUT
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from hyperinf_ops.data.instructions import LLM_EVALUATION, SOURCES, build_instruction_mix, write_llm_config
from hyperinf_ops.store import LanceStore


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _option(row: pd.Series) -> str:
    if row["subset"] == "curated":
        return f"{row['method']} {row['fraction']:.0%}"
    if row["subset"] == "random":
        return f"random {row['fraction']:.0%}"
    return row["subset"]


def composition(store: LanceStore, pool: pd.DataFrame, task: str, method: str, fraction: float,
                target_set: str) -> dict[str, float]:
    """The share of target-task pairs and of wrong answers in the top ceil(fraction N) of `method`'s ranking of
    `target_set` (the fit's: the task's target set, or `self` for a target-free ranking such as the loss): what
    `top_fraction` with balance false keeps."""
    scores = store.open("scores").to_table(
        columns=["sample_id", "score"], filter=f"target_set = '{target_set}' AND method = '{method}'").to_pandas()
    keep = scores.sort_values(["score", "sample_id"], ascending=[False, True]).head(math.ceil(fraction * len(scores)))
    chosen = pool.loc[keep["sample_id"]]
    return {"target_task_share": float((chosen["label"] == task).mean()),
            "wrong_answer_share": float(chosen["wrong_answer"].mean()),
            "wrong_target_answers": int((chosen["wrong_answer"] & (chosen["label"] == task)).sum())}


def summarize(workdir: Path) -> dict[str, Any]:
    root = workdir / "llm"
    config = yaml.safe_load((root / "hyperinf.yaml").read_text())
    task = next(iter(config["targets"]))
    store = LanceStore(str(root / "store"))
    fits = store.open("evaluation").to_table().to_pandas()
    fits["option"] = fits.apply(_option, axis=1)
    # a run still in progress keeps an earlier plan's rows until it ends: the newest fit per (option, seed) counts
    fits = fits.sort_values("created_at").drop_duplicates(["option", "seed"], keep="last")
    # the pool's extra columns ride along in `examples` (the pipeline never reads them)
    pool = store.open("examples").to_table(columns=["sample_id", "label", "wrong_answer"]).to_pandas()
    pool = pool.set_index("sample_id")
    options = {}
    for name, group in fits.groupby("option"):
        loss, exact = _mean_std(group["test_loss"].tolist()), _mean_std(group["test_accuracy"].tolist())
        first = group.iloc[0]
        entry = {"n_examples": int(first["n_examples"]), "seeds": sorted(group["seed"].tolist()),
                 "test_loss": loss, "exact_match": exact}
        if first["subset"] == "curated":
            entry.update(composition(store, pool, task, first["method"], float(first["fraction"]), first["target_set"]))
        options[name] = entry
    comparisons = {}
    for (method, fraction), group in fits[fits["subset"] == "curated"].groupby(["method", "fraction"]):
        by_seed = group.set_index("seed")
        out = {}
        for other in (f"random {fraction:.0%}", f"similarity {fraction:.0%}", "full"):
            ref = fits[fits["option"] == other].set_index("seed")
            seeds = sorted(set(by_seed.index) & set(ref.index))
            if not seeds or other == f"{method} {fraction:.0%}":
                continue
            d_loss = [float(by_seed.loc[s, "test_loss"] - ref.loc[s, "test_loss"]) for s in seeds]
            d_exact = [float(by_seed.loc[s, "test_accuracy"] - ref.loc[s, "test_accuracy"]) for s in seeds]
            out[other] = {"seeds": seeds, "loss_diff": d_loss, "exact_diff": d_exact,
                          "beats_on_loss_every_seed": all(d < 0 for d in d_loss),
                          "loss_diff_mean": float(np.mean(d_loss)), "exact_diff_mean": float(np.mean(d_exact))}
        comparisons[f"{method} {fraction:.0%}"] = out
    evaluation = config.get("evaluation") or {}
    return {"task": task, "pool": int(len(pool)), "sources": pool["label"].value_counts().to_dict(),
            "subset_epochs": evaluation.get("subset_epochs"),
            "test_examples": int(fits["test_examples"].iloc[0]), "options": options, "comparisons": comparisons}


def fit_from(workdir: Path, name: str, root: str, methods: list[str] | None) -> dict[str, Any]:
    """Fit the workdir's curated candidates (those of `methods`, default all) ranked by the store at `root` (the
    same pool under another warm-up) with the workdir's evaluation recipe, seeds and halves (the evaluation's own
    `plan_fits` and `_fit_and_test`); each fit's test loss against the workdir's fits of the same training seed."""
    import dataclasses

    from assets_defs.evaluation import evaluation_plan
    from hyperinf_ops.config import load_config
    from hyperinf_ops.stages.evaluation import (
        _fit_and_test,
        evaluation_halves,
        fit_records,
        pool_labels,
        pool_records,
    )
    from hyperinf_ops.stages.evaluation_plan import plan_fits

    cfg = load_config(workdir / "llm" / "hyperinf.yaml")
    plan = evaluation_plan(cfg)
    plan = dataclasses.replace(plan, candidates=tuple(c for c in plan.candidates if not methods or c.method in methods))
    store, spec = LanceStore(root), cfg.model_spec
    labels, pool = pool_labels(store, spec.task), pool_records(store, spec.task)
    validation, test = evaluation_halves(plan, cfg.data, spec.task, labels)
    by_id = {r["sample_id"]: r for r in pool}
    own = LanceStore(str(workdir / "llm" / "store"))
    if by_id.keys() != {r["sample_id"] for r in pool_records(own, spec.task)}:
        raise SystemExit(f"{root} holds another pool than {workdir / 'llm'}: its fits would pair with nothing")
    reference = own.open("evaluation").to_table().to_pandas()
    reference["option"] = reference.apply(_option, axis=1)
    fits = []
    for fit in plan_fits(store, plan, pool):
        if fit.subset != "curated":
            continue
        row = _fit_and_test(spec, cfg.lora, cfg.train, labels, fit_records(fit, by_id), validation, test, fit, print,
                            epochs=plan.epochs(fit))
        option = f"{fit.candidate.method} {fit.fraction:.0%}"
        versus = {}
        for other in (f"random {fit.fraction:.0%}", f"similarity {fit.fraction:.0%}", option, "full"):
            same = reference[(reference["option"] == other) & (reference["seed"] == fit.seed)]
            if len(same):
                versus[other] = float(row["test_loss"] - same.sort_values("created_at")["test_loss"].iloc[-1])
        fits.append({"option": option, "seed": fit.seed, "test_loss": row["test_loss"],
                     "exact_match": row["test_accuracy"], "versus": versus, "sample_ids": list(fit.ids)})
        print(f"{name}: {option} seed {fit.seed}: test loss {row['test_loss']:.4f}, exact match "
              f"{row['test_accuracy']:.3f}; minus the workdir's " + ", ".join(f"{k} {v:+.3f}" for k, v in versus.items()))
    return {"name": name, "root": root, "fits": fits}


def markdown_fit_from(result: dict[str, Any]) -> str:
    """The `fit_from` fits: test loss and exact match per seed, and the paired differences."""
    lines = ["", f"Rankings of {result['name']} ({result['root']}), fitted with this workdir's recipe, seeds and halves:",
             "", "| option | seed | test loss | exact match | minus this workdir's fit of the same seed |",
             "|---|---|---|---|---|"]
    for fit in result["fits"]:
        versus = ", ".join(f"{k} {v:+.3f}" for k, v in fit["versus"].items())
        lines.append(f"| {fit['option']} | {fit['seed']} | {fit['test_loss']:.3f} | {fit['exact_match']:.3f} | "
                     f"{versus} |")
    return "\n".join(lines) + "\n"


def markdown(summary: dict[str, Any]) -> str:
    epochs = summary.get("subset_epochs")
    lines = [f"Target task: {summary['task']}.", "", f"Subsets trained for {epochs} epochs (the full pool: the warm-up's)." if epochs else
             "Every fit trained with the warm-up's recipe.", "",
             "| option | pairs | seeds | test loss | exact match | target-task share | wrong answers |",
             "|---|---|---|---|---|---|---|"]
    for name, o in sorted(summary["options"].items(), key=lambda kv: (kv[1]["n_examples"], kv[0])):
        share = f"{o['target_task_share']:.2f}" if "target_task_share" in o else ""
        wrong = f"{o['wrong_answer_share']:.2f}" if "wrong_answer_share" in o else ""
        lines.append(f"| {name} | {o['n_examples']} | {len(o['seeds'])} | {o['test_loss'][0]:.3f} +- "
                     f"{o['test_loss'][1]:.3f} | {o['exact_match'][0]:.3f} +- {o['exact_match'][1]:.3f} | {share} | "
                     f"{wrong} |")
    lines += ["", "| candidate | vs | seeds | test loss diff per seed | beats in every seed | exact match diff (mean) |",
              "|---|---|---|---|---|---|"]
    for name, versus in sorted(summary["comparisons"].items()):
        for other, c in versus.items():
            lines.append(f"| {name} | {other} | {len(c['seeds'])} | "
                         f"{', '.join(f'{d:+.3f}' for d in c['loss_diff'])} | "
                         f"{'yes' if c['beats_on_loss_every_seed'] else 'no'} | {c['exact_diff_mean']:+.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="the --workdir of `hyperinf demo --llm`")
    parser.add_argument("--out", type=Path, help="write evaluation.json and tables.md here")
    parser.add_argument("--build-task", choices=SOURCES[1:],
                        help="build <workdir>/llm with this target task and the demo's evaluation, then stop")
    parser.add_argument("--methods", nargs="+", help="with --build-task: the evaluation's rankings (default the "
                        "demo's); with --fit-from: the rankings fitted (default all the evaluation's)")
    parser.add_argument("--fit-from", metavar="NAME=STORE_ROOT",
                        help="fit the evaluation's curated subsets of another store of the same pool (another warm-up)")
    args = parser.parse_args()
    if args.build_task:
        paths = build_instruction_mix(args.workdir / "llm", target_task=args.build_task)
        evaluation = {**LLM_EVALUATION, **({"methods": args.methods} if args.methods else {})}
        print(write_llm_config(paths, evaluation=evaluation, target_task=args.build_task))
        return
    summary = summarize(args.workdir)
    table = markdown(summary)
    if args.fit_from:
        name, root = args.fit_from.split("=", 1)
        summary["fit_from"] = fit_from(args.workdir, name, root, args.methods)
        table += markdown_fit_from(summary["fit_from"])
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "evaluation.json").write_text(json.dumps(summary, indent=1, default=float))
        (args.out / "tables.md").write_text(table)


if __name__ == "__main__":
    main()
