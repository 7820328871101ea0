"""What the GFIM approximation costs: influence rankings against the exact full-Fisher inverse, per LoRA rank.

    nice -n 5 python benchmarks/bench_gfim.py   # tiny BERT + MiniLM, ranks 2 4 8 16, 3 / 2 seeds (~10 min)
    python benchmarks/bench_gfim.py --quick     # tiny BERT, ranks 2 and 4, one seed (the test suite, ~10 s)

For LoRA matrix l with per-example gradients g_k (r x d) and target-set mean gradient v (r x d), every method
scores pool example k by score(k) = sum_l <P_l(v_l), g_{k,l}>_F (higher = more helpful), and differs only
in P:

    exact_full   vec(v) (F + lambda I)^-1, F = (1/n) sum_k vec(g_k) vec(g_k)^T the full (rd x rd) Fisher:
                 the reference (the exact damped empirical Fisher, no structural assumption)
    exact        v (G + lambda I)^-1, G = (1/n) sum_k g_k^T g_k (d x d), the GFIM, by Cholesky in float64
    gfim r*lambda  v (G + r lambda I)^-1: the library's exact with damping_ratio 0.1 r (see below)
    hyperinf     the same GFIM inverse by Schulz iteration (the product's default)
    hyperinf paper  the reference code's Schulz: X_0 = 5e-5 I, 20 fixed steps, no residual check
    datainf      DataInf's closed form on flattened gradients, an approximation of (F + lambda I)^-1
    lissa        1000 terms of the Neumann series of the GFIM inverse
    tracin       v itself (no curvature)

with one damping lambda_l = 0.1 * mean(g^2) for all. The GFIM is exact when F = I_r (x) G / r (the paper's
Lemma 1: the r rows of g i.i.d. and zero-mean); "lemma-1 gap" reports ||F - I_r (x) G/r||_F / ||F||_F,
averaged over the matrices. Note that the product inverts G + lambda I, not G / r + lambda I: the GFIM
ranking is that of the Kronecker approximation with damping r * lambda; "gfim r*lambda" is the GFIM with the
damping the Kronecker approximation of F + lambda I itself implies
((G/r + lambda I)^-1 = r (G + r lambda I)^-1).

Per (model, rank, seed): a fresh LoRA adapter (seeded) on the attention query/value projections, alpha =
2 rank, warmed up on the pool with the demo's recipe (lr 2e-3, linear decay, batch 16) for 2 epochs;
per-example
gradients of the pool and the target set (gradients.per_example_lora_gradients); the curvature with the full
Fisher once (curvature_partials(full=True)); then every method through estimators.precondition and
score_gradients. Reported: Spearman rank correlation of each method's scores with exact_full (and hyperinf
with exact), mislabel-detection AUROC (the pool has 20% flipped labels: flipped examples should score low),
the lemma-1 gap and seconds per method.

Data: Rotten Tomatoes snippets from hyperinf_ops.data.demo.build_demo_dataset (pool with 20% flipped labels,
clean target set from other movies). Models: "tiny", a 2-layer random BERT (hidden 32) with a word-level
vocabulary of the snippets' most frequent words, built from a config as tests/tiny_models.py does, all its
LoRA matrices (8 of r x 32); "minilm", the bundled all-MiniLM-L6-v2 restricted to the last layer's query
(gradient_modules: 2 LoRA matrices of r x 384, so r * d <= 6144 at rank 16).

Outputs: benchmarks/results/paper/gfim.json, docs/img/results/gfim_spearman.png (Spearman vs rank, one line
per method, one panel per model), Markdown tables on stdout. --quick writes files only where --json /
--img-dir name them.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata, spearmanr
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hyperinf_ops.core.curvature import curvature_partials  # noqa: E402
from hyperinf_ops.core.estimators import mean_target_gradient, precondition, score_gradients  # noqa: E402
from hyperinf_ops.core.gradients import per_example_lora_gradients  # noqa: E402
from hyperinf_ops.data.demo import build_demo_dataset  # noqa: E402
from hyperinf_ops.models.lora import LoadedModel, batches, load_lora_model  # noqa: E402
from hyperinf_ops.preconditioners import EstimatorOptions  # noqa: E402
from hyperinf_ops.settings import LoraSettings, ModelSpec, TrainSettings  # noqa: E402
from hyperinf_ops.training import warmup_train  # noqa: E402

RESULTS_JSON = ROOT / "benchmarks" / "results" / "paper" / "gfim.json"
IMG_DIR = ROOT / "docs" / "img" / "results"
DAMPING_RATIO = 0.1
# label -> (library method, damping multiplied by the rank r, other EstimatorOptions). "gfim r*lambda" is the
# GFIM with the damping that makes it the Kronecker approximation I_r (x) (G/r + lambda I) of the damped full
# Fisher (up to scale); "hyperinf paper" is the reference code's fixed start X_0 = 5e-5 I and 20 steps, kept
# unconverged
PAPER = {"init": "paper", "allow_unconverged": True}
VARIANTS = {"exact_full": ("exact_full", False, {}), "exact": ("exact", False, {}),
            "hyperinf": ("hyperinf", False, {}), "hyperinf paper": ("hyperinf", False, PAPER),
            "datainf": ("datainf", False, {}), "lissa": ("lissa", False, {}), "tracin": ("tracin", False, {}),
            "gfim r*lambda": ("exact", True, {})}
METHODS = tuple(VARIANTS)
OVERLAID = ("hyperinf", "hyperinf paper")
COMPARED = METHODS[1:]
LABELS = ["fresh", "rotten"]
MAX_LENGTH = 64
GRADIENT_MODULES = {"tiny": None, "minilm": ("layer.5.attention.self.query",)}
# seeds per model: the MiniLM warm-up and its r = 16 full-Fisher inverses (two 6144 x 6144 Choleskys with the
# library's residual and condition checks, ~1 min on one thread) dominate the run
SIZES = {
    "full": {"models": ("tiny", "minilm"), "ranks": (2, 4, 8, 16),
             "seeds": {"tiny": (0, 1, 2), "minilm": (0, 1)}, "n_pool": 240, "n_target": 80, "epochs": 2},
    "quick": {"models": ("tiny",), "ranks": (2, 4), "seeds": {"tiny": (0,)}, "n_pool": 64, "n_target": 16,
              "epochs": 2},
}


def demo_records(folder: Path, n_pool: int, n_target: int) -> tuple[list[dict], list[dict]]:
    """Pool (20% flipped, `flipped` kept) and clean target records from the bundled demo builder."""
    paths = build_demo_dataset(folder, n_pool=n_pool, n_target=n_target, n_shards=1)
    pool = pd.concat(pd.read_parquet(p) for p in paths.shards)
    return pool.to_dict("records"), pd.read_parquet(paths.target).to_dict("records")


def save_tiny_bert(folder: Path, texts: list[str], vocab_size: int = 2000) -> Path:
    """A 2-layer random BERT (hidden 32), word-level vocabulary: the most frequent words of `texts`."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    counts = Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    words = [w for w, _ in counts.most_common(vocab_size)]
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join([*specials, *words]) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def trained_model(model: str, rank: int, seed: int, pool: list[dict], epochs: int) -> LoadedModel:
    """A fresh seeded LoRA adapter (query/value, alpha = 2 rank), warmed up on the pool (demo recipe)."""
    lora = LoraSettings(rank=rank, alpha=2.0 * rank, modules=("query", "value"))
    loaded = load_lora_model(ModelSpec(name=model, max_length=MAX_LENGTH, device="cpu"), LABELS, lora=lora,
                             seed=seed)
    train = TrainSettings(epochs=epochs, lr=2e-3, batch_size=16, seed=seed, log_every=10_000)
    warmup_train(loaded, pool, train, max_length=MAX_LENGTH)
    return loaded


def gradients(loaded: LoadedModel, records: list[dict], modules: tuple[str, ...] | None) -> dict[str, Tensor]:
    """Per-example LoRA gradients name -> (n, r, d) float64 of the records, 32 per forward/backward."""
    parts = [per_example_lora_gradients(loaded.model, batch, modules=modules, dtype=torch.float64)
             for _, batch in batches(loaded, records, 32, MAX_LENGTH)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def lemma1_gap(curvature: dict) -> float:
    """Mean over matrices of ||F - I_r (x) G/r||_F / ||F||_F (0 when the GFIM is exact)."""
    gaps = []
    for part in curvature.values():
        full, gfim = part.full(), part.gfim()
        d = gfim.shape[0]
        r = full.shape[0] // d
        kron = torch.kron(torch.eye(r, dtype=full.dtype), gfim / r)
        gaps.append(float(torch.linalg.matrix_norm(full - kron) / torch.linalg.matrix_norm(full)))
    return float(np.mean(gaps))


def spectrum(curvature: dict) -> dict:
    """Largest lambda_max(G) and cond(G + lambda I) over the matrices: what a fixed Schulz start meets."""
    tops, conds = [], []
    for part in curvature.values():
        eig = torch.linalg.eigvalsh(part.gfim())
        lam = part.damping(DAMPING_RATIO)
        tops.append(float(eig[-1]))
        conds.append(float((eig[-1] + lam) / (eig[0].clamp_min(0) + lam)))
    return {"gfim_lambda_max": max(tops), "damped_gfim_cond": max(conds)}


def auroc_of_flips(scores: np.ndarray, flipped: np.ndarray) -> float:
    """P(a flipped example scores below a clean one): the mislabel-detection AUROC of ranking by harm."""
    ranks = rankdata(-scores)
    n_pos, n_neg = int(flipped.sum()), int((~flipped).sum())
    return float((ranks[flipped].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score_all(train: dict[str, Tensor], target: dict[str, Tensor]) -> tuple[dict, dict, dict]:
    """Scores (n,) per method from one full-Fisher curvature, seconds per method, and facts of the curvature
    (the lemma-1 gap, the GFIM's spectrum)."""
    curvature = curvature_partials(train, full=True)
    v = mean_target_gradient(target)
    scores, seconds = {}, {}
    rank = next(iter(train.values())).shape[1]
    for label, (method, by_rank, overrides) in VARIANTS.items():
        start = time.perf_counter()
        options = EstimatorOptions(method, DAMPING_RATIO * (rank if by_rank else 1), **overrides)
        pv = precondition(v, curvature, options, train_grads=train)
        scores[label] = score_gradients(pv, train).numpy()
        seconds[label] = time.perf_counter() - start
    return scores, seconds, {"lemma1_gap": lemma1_gap(curvature), **spectrum(curvature)}


def run_one(model: str, model_path: str, rank: int, seed: int, data: tuple[list[dict], list[dict]],
            epochs: int) -> dict:
    """One (model, rank, seed): train, gradients, every method's scores, their agreement with exact_full."""
    start = time.perf_counter()
    pool, target = data
    loaded = trained_model(model_path, rank, seed, pool, epochs)
    modules = GRADIENT_MODULES[model]
    train, tgt = gradients(loaded, pool, modules), gradients(loaded, target, modules)
    scores, seconds, facts = score_all(train, tgt)
    flipped = np.array([bool(r["flipped"]) for r in pool])
    row = {
        "model": model, "rank": rank, "seed": seed, "matrices": len(train),
        "shapes": sorted({tuple(g.shape[1:]) for g in train.values()}),
        "spearman": {m: float(spearmanr(scores["exact_full"], scores[m])[0]) for m in COMPARED},
        "hyperinf_vs_exact": float(spearmanr(scores["exact"], scores["hyperinf"])[0]),
        "auroc": {m: auroc_of_flips(s, flipped) for m, s in scores.items()},
        **facts, "method_seconds": seconds, "seconds": time.perf_counter() - start,
    }
    print(f"  {model} r={rank} seed={seed}: " + ", ".join(f"{m} {s:.3f}" for m, s in row["spearman"].items())
          + f" | gap {facts['lemma1_gap']:.2f}, lambda_max {facts['gfim_lambda_max']:.1e}"
          + f" | {row['seconds']:.0f} s",
          flush=True)
    return row


def summary(rows: list[dict], key: str) -> dict:
    """(model, rank) -> method -> (mean, min, max) over seeds of rows[...][key][method]."""
    out: dict = {}
    for r in rows:
        for m, value in r[key].items():
            out.setdefault((r["model"], r["rank"]), {}).setdefault(m, []).append(value)
    return {k: {m: (float(np.mean(v)), min(v), max(v)) for m, v in ms.items()} for k, ms in out.items()}


def table(rows: list[dict], key: str, methods: tuple[str, ...]) -> str:
    """Markdown: mean (min..max over seeds) of `key` per method, one row per (model, rank)."""
    lines = ["| model | rank | r*d | lemma-1 gap | " + " | ".join(methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    gaps = summary([{**r, "gap": {"g": r["lemma1_gap"]}} for r in rows], "gap")
    for (model, rank), stats in summary(rows, key).items():
        shape = next(r["shapes"] for r in rows if r["model"] == model and r["rank"] == rank)
        cells = [f"{stats[m][0]:.3f} ({stats[m][1]:.3f}..{stats[m][2]:.3f})" for m in methods]
        rd = ", ".join(str(a * b) for a, b in shape)
        gap = gaps[(model, rank)]["g"][0]
        lines.append(f"| {model} | {rank} | {rd} | {gap:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Spearman with exact_full vs LoRA rank, one panel per model, one line per method (min..max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    stats = summary(rows, "spearman")
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models, strict=True):
        ranks = sorted({rank for m, rank in stats if m == model})
        for method in COMPARED:
            mean, lo, hi = (np.array([stats[(model, k)][method][i] for k in ranks]) for i in range(3))
            # hyperinf lies on exact and hyperinf paper on tracin: drawn dashed over them
            style = {"ls": "--", "marker": "x"} if method in OVERLAID else {"marker": "o"}
            ax.plot(ranks, mean, label=method, **style)
            ax.fill_between(ranks, lo, hi, alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set(xticks=ranks, xticklabels=[str(k) for k in ranks], xlabel="LoRA rank r",
               title=f"{model}: Spearman with exact_full", ylim=(-0.1, 1.02))
    axes[0][0].set_ylabel("Spearman rank correlation")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny BERT, ranks 2 and 4, one seed (the test suite)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"results file (full default: {RESULTS_JSON})")
    parser.add_argument("--img-dir", type=Path, default=None, help=f"PNG folder (full default: {IMG_DIR})")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = SIZES["quick" if args.quick else "full"]
    json_path = args.json or (None if args.quick else RESULTS_JSON)
    img_dir = args.img_dir or (None if args.quick else IMG_DIR)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pool, target = demo_records(Path(tmp) / "data", sizes["n_pool"], sizes["n_target"])
        paths = {"minilm": "minilm", "tiny": str(save_tiny_bert(Path(tmp) / "tiny",
                                                                [r["text"] for r in pool + target]))}
        rows = [run_one(model, paths[model], rank, seed, (pool, target), sizes["epochs"])
                for model in sizes["models"] for rank in sizes["ranks"] for seed in sizes["seeds"][model]]
    results = {"command": "python benchmarks/bench_gfim.py" + (" --quick" if args.quick else ""),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU only",
               "torch": torch.__version__, "wall_s": round(time.perf_counter() - start, 1), "sizes": sizes,
               "rows": rows}
    print("\nSpearman rank correlation with exact_full (mean (min..max) over seeds)\n")
    print(table(rows, "spearman", COMPARED))
    print("\nMislabel-detection AUROC (20% flipped labels, ranked by harm)\n")
    print(table(rows, "auroc", METHODS))
    print(f"\nwall time {results['wall_s']} s")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1))
    if img_dir:
        plot(rows, img_dir / "gfim_spearman.png")
    return results


if __name__ == "__main__":
    main()
