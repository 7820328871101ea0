"""How many examples the default classification export should drop, and which: alternative drop rules scored by
the independent downstream model of bench_curation.py (logistic regression on frozen MiniLM embeddings, the
test half of the test file) on finished bench_curation stores, clean ones (`--flip-fraction 0`) included.

Rules, over the stored HyperINF ranking of the evaluation's target set and cleanlab's `label_suggestions`:

    full              every example
    drop_issues       the product's default (sql/drop_issues.sql): the k most harmful by HyperINF, k = cleanlab's
                      issue count, at most max_fraction of the pool
    cleanlab          the k examples cleanlab flags (what cleanlab alone would drop)
    issues_harmful    the flagged examples whose HyperINF score is negative (both signals agree)
    drop_harmful_0.2  the 20% most harmful by HyperINF (sql/drop_harmful.sql)
    random_k          k random examples (mean of 5 draws)
    oracle            the planted flips (pools with flips)

    PY=.venv/bin/python
    $PY benchmarks/drop_rules.py --json OUT.json /tmp/cur/demo_s0/hyperinf.yaml /tmp/clean/demo_clean_s0/hyperinf.yaml
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_curation import frozen_embeddings, probe_accuracy

from hyperinf_ops.config import load_config
from hyperinf_ops.config.sections import DROP_ISSUES_MAX_FRACTION
from hyperinf_ops.data.prepare import prepare_test
from hyperinf_ops.query import connect, run_query
from hyperinf_ops.stages.adapter import pool_labels
from hyperinf_ops.stages.evaluation import pool_records
from hyperinf_ops.stages.evaluation_plan import split_test
from hyperinf_ops.stages.scores import read_scores
from hyperinf_ops.store import LanceStore

RANDOM_DRAWS = 5


def drop_rules(config_path: Path) -> dict[str, Any]:
    """Probe test accuracy of every rule of the module docstring on one finished store, and what each drops."""
    cfg = load_config(config_path)
    store = LanceStore(str(cfg.storage_root))
    pool = pool_records(store, cfg.task)
    ids = [r["sample_id"] for r in pool]
    score = read_scores(store, cfg.evaluation_target, "hyperinf").set_index("sample_id")["score"].reindex(ids).to_numpy()
    table = store.open("label_suggestions").to_table(columns=["sample_id", "issue"]).to_pandas()
    issue = table.set_index("sample_id")["issue"].reindex(ids).fillna(False).to_numpy(bool)
    examples = store.open("examples").to_table(columns=["sample_id", "flipped"]).to_pandas()
    flipped = examples.set_index("sample_id")["flipped"].reindex(ids).to_numpy(bool)
    test = split_test(prepare_test(cfg.evaluation.test.path, cfg.data, cfg.task, pool_labels(store, cfg.task))
                      .to_pylist(), cfg.evaluation.validation)[1]
    x, x_test = frozen_embeddings([r["text"] for r in pool]), frozen_embeddings([r["text"] for r in test])
    y, y_test = np.array([r["label"] for r in pool]), [r["label"] for r in test]
    n, k = len(ids), int(issue.sum())
    ranking = {"target_set": cfg.evaluation_target, "method": "hyperinf"}
    con = connect(store)
    try:  # the product's own selections, not a copy of their SQL
        kept = {query: set(run_query(con, query, {**ranking, **params})["sample_id"].to_pylist())
                for query, params in (("drop_issues", {"max_fraction": DROP_ISSUES_MAX_FRACTION}),
                                      ("drop_harmful", {"fraction": 0.2}))}
    finally:
        con.close()

    def selected(query: str) -> np.ndarray:
        return np.array([i in kept[query] for i in ids])

    def without(drop: np.ndarray) -> np.ndarray:
        keep = np.ones(n, bool)
        keep[drop] = False
        return keep

    rng = np.random.default_rng(0)
    rules: dict[str, Callable[[], list[np.ndarray]]] = {
        "full": lambda: [np.ones(n, bool)],
        "drop_issues": lambda: [selected("drop_issues")],
        "cleanlab": lambda: [~issue],
        "issues_harmful": lambda: [~(issue & (score < 0))],
        "drop_harmful_0.2": lambda: [selected("drop_harmful")],
        "random_k": lambda: [without(rng.choice(n, k, replace=False)) for _ in range(RANDOM_DRAWS)],
        **({"oracle": lambda: [~flipped]} if flipped.any() else {}),
    }
    out: dict[str, Any] = {"store": str(config_path), "n": n, "issues": k, "flips": int(flipped.sum()), "rules": {}}
    for name, keeps in rules.items():
        masks = keeps()
        out["rules"][name] = {"probe_accuracy": float(np.mean([probe_accuracy(x[m], y[m], x_test, y_test)
                                                               for m in masks])),
                              "dropped": int(n - masks[0].sum()), "flips_dropped": int(flipped[~masks[0]].sum())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", type=Path, help="hyperinf.yaml of finished bench_curation runs")
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for path in args.configs:
        result = drop_rules(path)
        results.append(result)
        print(f"{path.parent.name}: n {result['n']}, issues {result['issues']}, flips {result['flips']}: "
              + "  ".join(f"{name} {r['probe_accuracy']:.3f}" for name, r in result["rules"].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
