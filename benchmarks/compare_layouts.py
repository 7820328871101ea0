"""The same pipeline run stored at several row layouts: does the export change?

bench_compression.py emulates every layout from one run's raw rows; this reads finished runs of the product itself
(same data, config and warm-up adapter, only `compression:` differs) and compares what a user gets from each:

    rank agreement  per stored ranking (scores table, one target set): Spearman of each layout's scores against
                    the first (reference) store's, over the pool rows both hold, and Pearson; with --group-by
                    COLUMN also Spearman inside each value of that `examples` column (e.g. the pool's sources)
    export overlap  |top f of the layout  &  top f of the reference| / |top f|, f = --fraction (the export's size)
    selection       the `evaluation` table's test loss / accuracy of each curated ranking at f, per seed (fresh
                    adapters fit on each layout's own export), and the full pool's when stored
    bytes           bytes on disk of the `gradients` table per stored row (values, codec steps, norms, ids)

    python benchmarks/compare_layouts.py --stores "raw float32=/tmp/lay_raw/store" "k=128 (default)=/tmp/llmcov/llm/store" \\
        "k=18 (8B ratio)=/tmp/lay_k18/store" --target-set bbc_news --fraction 0.05 --group-by label \\
        --json benchmarks/results/compression/layouts_llm_demo.json --markdown

Results and their reading: docs/compression.md, section "Rows that fit LLM widths".
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperinf_ops.store import LanceStore  # noqa: E402


def _scores(store: LanceStore, target_set: str) -> pd.DataFrame:
    table = store.open("scores").to_table(columns=["sample_id", "method", "score"],
                                          filter=f"target_set = '{target_set}'")
    return table.to_pandas()


def _bytes_per_row(root: Path, store: LanceStore) -> float:
    files = [p for p in (root / "lance" / "gradients.lance").rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / max(store.open("gradients").count_rows(), 1)


def _top(scores: pd.Series, fraction: float) -> set[str]:
    """The export's rows as sql/top_fraction.sql takes them (no class balance): the ceil(fraction * n) highest."""
    n = math.ceil(fraction * len(scores))
    return set(scores.sort_values(ascending=False).index[:n])


def _selection(store: LanceStore, fraction: float) -> dict[str, dict]:
    """method (or "full" / "random") -> test loss / accuracy per seed from the stored evaluation table: the
    curated fits at `fraction`, the random fits of their sizes (a random subset records its own share, e.g.
    0.2002 for 408 of 2,038) and the full pool's."""
    if not store.exists("evaluation"):
        return {}
    ev = store.open("evaluation").to_table().to_pandas()
    curated = ev[(ev.subset == "curated") & ((ev.fraction - fraction).abs() < 1e-9)]
    keep = ev[(ev.subset == "full") | ev.index.isin(curated.index)
              | ((ev.subset == "random") & ev.n_examples.isin(curated.n_examples))]
    out: dict[str, dict] = {}
    for (subset, method), rows in keep.groupby([keep.subset, keep.method.fillna("")]):
        rows = rows.sort_values("seed")
        out[method if subset == "curated" else subset] = {
            "seeds": rows.seed.tolist(), "test_loss": rows.test_loss.tolist(),
            "test_accuracy": rows.test_accuracy.tolist()}
    return out


def compare(stores: Mapping[str, Path], target_set: str, fraction: float,
            methods: Sequence[str] | None = None, group_by: str | None = None) -> dict:
    """Every layout's rankings, export and selection against the first store's (see the module docstring); only
    `methods` when given, else every ranking all stores hold."""
    names = list(stores)
    opened = {name: LanceStore(str(root)) for name, root in stores.items()}
    frames = {name: _scores(store, target_set) for name, store in opened.items()}
    reference = frames[names[0]]
    groups = None
    if group_by:
        examples = opened[names[0]].open("examples").to_table(columns=["sample_id", group_by])
        groups = examples.to_pandas().set_index("sample_id")[group_by]
    methods = sorted(set(methods or reference.method).intersection(*(set(f.method) for f in frames.values())))
    agreement: dict[str, dict[str, dict]] = {}
    for name in names[1:]:
        agreement[name] = {}
        for method in methods:
            ref = reference[reference.method == method].set_index("sample_id").score
            got = frames[name][frames[name].method == method].set_index("sample_id").score
            common = ref.index.intersection(got.index)
            ref, got = ref.loc[common], got.loc[common]
            top_ref, top_got = _top(ref, fraction), _top(got, fraction)
            agreement[name][method] = {"spearman": float(spearmanr(ref, got).statistic), "rows": len(common),
                                       "pearson": float(ref.corr(got)),
                                       "export_overlap": len(top_ref & top_got) / len(top_ref)}
            if groups is not None:
                agreement[name][method]["spearman_by_group"] = {
                    str(g): float(spearmanr(ref.loc[ids], got.loc[ids]).statistic)
                    for g, ids in ref.groupby(groups.loc[common]).groups.items()}
    selection = {name: {m: v for m, v in _selection(store, fraction).items() if m in methods or m in ("full", "random")}
                 for name, store in opened.items()}
    return {"target_set": target_set, "fraction": fraction, "group_by": group_by,
            "stores": {k: str(v) for k, v in stores.items()},
            "bytes_per_row": {name: _bytes_per_row(Path(stores[name]), store) for name, store in opened.items()},
            "agreement": agreement, "selection": selection}


def _mean_half(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else ""
    return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def markdown(result: Mapping) -> str:
    """Two tables: rank agreement / export overlap per ranking, and the selection per layout (mean ± half range)."""
    names = list(result["stores"])
    methods = sorted({m for per in result["agreement"].values() for m in per})
    lines = ["| ranking | " + " | ".join(f"{n}: Spearman / Pearson / top {result['fraction']:.0%} overlap"
                                         + (" / Spearman by group" if result["group_by"] else "") for n in names[1:])
             + " |", "|---" * len(names) + "|"]

    def cell(a: Mapping) -> str:
        text = f"{a['spearman']:.3f} / {a['pearson']:.3f} / {a['export_overlap']:.2f}"
        by_group = ", ".join(f"{g} {rho:.3f}" for g, rho in a.get("spearman_by_group", {}).items())
        return text + (f" / {by_group}" if by_group else "")

    for method in methods:
        cells = [cell(a) if (a := result["agreement"][n].get(method)) else "" for n in names[1:]]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    columns = sorted({m for s in result["selection"].values() for m in s})
    lines += ["", "| layout | bytes per row on disk | " + " | ".join(f"{m} test loss" for m in columns) + " |"]
    lines.append("|---|---" + "|---" * len(columns) + "|")
    for name in names:
        sel = result["selection"][name]
        lines.append(f"| {name} | {result['bytes_per_row'][name]:,.0f} | " + " | ".join(
            _mean_half(sel[m]["test_loss"]) if m in sel else "" for m in columns) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", nargs="+", required=True, metavar="NAME=ROOT",
                        help="storage roots of the same run at different layouts; the first is the reference")
    parser.add_argument("--target-set", required=True)
    parser.add_argument("--fraction", type=float, default=0.05, help="the export's share of the pool")
    parser.add_argument("--methods", nargs="+", help="only these rankings (default: every ranking all stores hold)")
    parser.add_argument("--group-by", help="an `examples` column: Spearman inside each of its values too")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    stores = {}
    for item in args.stores:
        name, sep, root = item.rpartition("=")  # names may hold "=" (k=128), roots rarely
        if not sep:
            parser.error(f"--stores takes NAME=ROOT, got {item!r}")
        stores[name] = Path(root)
    result = compare(stores, args.target_set, args.fraction, args.methods, args.group_by)
    print(markdown(result) if args.markdown else json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
