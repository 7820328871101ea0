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
                        "demo's)")
    args = parser.parse_args()
    if args.build_task:
        paths = build_instruction_mix(args.workdir / "llm", target_task=args.build_task)
        evaluation = {**LLM_EVALUATION, **({"methods": args.methods} if args.methods else {})}
        print(write_llm_config(paths, evaluation=evaluation, target_task=args.build_task))
        return
    summary = summarize(args.workdir)
    table = markdown(summary)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "evaluation.json").write_text(json.dumps(summary, indent=1, default=float))
        (args.out / "tables.md").write_text(table)


if __name__ == "__main__":
    main()
