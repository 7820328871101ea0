"""The paper's inverse-convergence experiment: how fast each method approaches v (G + lambda I)^-1.

    nice -n 5 python benchmarks/bench_convergence.py   # d 64 256 1024, cond 1e2 1e4 1e6: ~3.5 min
    python benchmarks/bench_convergence.py --quick     # d 64, cond 1e2 1e4 (the test suite, a few s)

The matrix. n = d/2 per-example gradient rows g_i (1 x d) with a power-law spectrum in a random basis (the
recipe of bench_inverse.gfim_like, kept per example because DataInf sums over examples; r = 1, so the GFIM
is the full Fisher and every method approximates the same matrix), scaled so lambda_max(G) = 1 for
G = (1/n) sum_i g_i^T g_i. G has rank n < d, so lambda_min(G) = 0 and the damping sets the conditioning
exactly: A = G + lambda I with lambda = 1 / (cond - 1) gives cond(A) = (1 + lambda) / lambda. The damping
goes through the library's one rule, lambda = damping_ratio * mean(g^2), with the ratio chosen to hit cond.

The reference is x* = v A^-1 for K = 8 random row vectors v (K x d), by a float64 Cholesky solve of the
float64 A. The error of an answer x is ||x - x*||_F / ||x*||_F. fp32 runs cast A (as damped_gfim does) and v
to float32, so their error includes the rounding of A itself (about cond * 6e-8).

Traces (error after every iteration t, on the library's own iteration):
    schulz p=2 scaled   X_0 = I / u, u >= lambda_max(A) (init="scaled", the product's start),
                        X <- X (2I - A X)                       (inverse._hyperpower_step, order 2)
    schulz p=2 paper    X_0 = 5e-5 I (init="paper", the reference code's fixed start), same step; the
                        residual is R_t = (I - 5e-5 A)^(2^t): about log2(1 / (5e-5 lambda_min)) steps pass
                        before the smallest directions move, and it diverges when lambda_max > 4e4
    hyperpower p=3      scaled start, X <- X (I + R + R^2), R = I - A X   (order 3)
    lissa               the library's LiSSA (preconditioners.lissa) at t = 1, 2, 4, ... series terms:
                        r <- v + r (I - A / s), s = ||A||_F, answer r / s
The X_0 of each trace comes from schulz_inverse(max_iter=0); the trace stops when the residual is not
finite, passes 1e3 (diverged), or stalls for 3 steps below 0.5 (the rounding floor).
"iterations to 1e-3 / 1e-6" is the first t whose error is below the threshold ("no" if none).

Product calls (one prepare + apply through preconditioners.prepare, wall time, final error):
    hyperinf            order 2, scaled start, residual stop (fp64: float32 warm-up, float64 polish)
    hyperinf p=3        order 3
    hyperinf paper      init="paper": X_0 = 5e-5 I, 20 fixed steps (reference-code parity)
    lissa               1000 series terms (the library default)
    datainf             the closed form (1/(n lambda)) sum_i (v - (v.g_i) / (lambda + |g_i|^2) g_i): no
                        iteration; its error is the error of swapping the mean and the inverse
    exact               Cholesky inverse of A in float64 (the product's ground truth)
Non-converged hyperinf inverses are kept (allow_unconverged) and flagged.

Outputs: benchmarks/results/paper/convergence.json, docs/img/results/convergence_d<d>.png (rows fp32 /
fp64, one panel per conditioning, one line per traced method, DataInf as a dashed level) and Markdown
tables on stdout. --quick writes files only where --json / --img-dir name them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hyperinf_ops.core.curvature import CurvaturePartial, curvature_partials, damped_gfim  # noqa: E402
from hyperinf_ops.core.inverse import _hyperpower_step, _residual, schulz_inverse  # noqa: E402
from hyperinf_ops.preconditioners import EstimatorOptions, prepare  # noqa: E402

RESULTS_JSON = ROOT / "benchmarks" / "results" / "paper" / "convergence.json"
IMG_DIR = ROOT / "docs" / "img" / "results"
THRESHOLDS = (1e-3, 1e-6)
RHS = 8  # target vectors v per case
NAME = "g"  # the one "LoRA matrix" of every case
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# trace label -> (hyperpower order, init)
SCHULZ_TRACES = {"schulz p=2 scaled": (2, "scaled"), "schulz p=2 paper": (2, "paper"),
                 "hyperpower p=3": (3, "scaled")}
TRACES = (*SCHULZ_TRACES, "lissa")
# product label -> EstimatorOptions overrides
PRODUCT = {
    "hyperinf": {"method": "hyperinf", "allow_unconverged": True},
    "hyperinf p=3": {"method": "hyperinf", "schulz_order": 3, "allow_unconverged": True},
    "hyperinf paper": {"method": "hyperinf", "init": "paper", "allow_unconverged": True},
    "lissa": {"method": "lissa"},
    "datainf": {"method": "datainf"},
    "exact": {"method": "exact"},
}
SIZES = {
    "full": {"dims": (64, 256, 1024), "conds": (1e2, 1e4, 1e6), "scaled_steps": 40, "paper_steps": 80,
             "lissa_max": 4096, "sweep_d": 256, "sweep_cond": 1e4,
             "scales": (1e-4, 1e-2, 1.0, 1e2, 1e4, 1e5)},
    "quick": {"dims": (64,), "conds": (1e2, 1e4), "scaled_steps": 30, "paper_steps": 60, "lissa_max": 256,
              "sweep_d": 64, "sweep_cond": 1e2, "scales": (1e-2, 1.0, 1e5)},
}


def example_gradients(n: int, d: int, seed: int = 0) -> Tensor:
    """(n, 1, d) float64 gradient rows, power-law spectrum in a random basis, scaled to lambda_max(G) = 1."""
    gen = torch.Generator().manual_seed(seed)
    decay = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0
    mix = torch.randn(n, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    g = (torch.randn(n, n, generator=gen, dtype=torch.float64) * decay) @ mix
    top = torch.linalg.eigvalsh(g.T @ g / n)[-1]
    return (g / top.sqrt())[:, None, :]


def ratio_for_condition(part: CurvaturePartial, cond: float, top: float = 1.0) -> float:
    """The damping_ratio whose lambda = ratio * mean(g^2) is top / (cond - 1): cond(G + lambda I) = cond for G
    of rank < d and lambda_max(G) = top."""
    return (top / (cond - 1.0)) * part.count * part.numel / part.sq_sum


def setup(grads: Tensor, cond: float, top: float = 1.0, seed: int = 0) -> dict:
    """Curvature, damping ratio, float64 A, the K vectors v and the reference v A^-1 (Cholesky, float64)."""
    curv = curvature_partials({NAME: grads})
    ratio = ratio_for_condition(curv[NAME], cond, top)
    a64 = damped_gfim(curv[NAME], ratio)
    gen = torch.Generator().manual_seed(seed + 1)
    v64 = torch.randn(RHS, a64.shape[-1], generator=gen, dtype=torch.float64)
    ref = torch.cholesky_solve(v64.T, torch.linalg.cholesky(a64)).T
    return {"grads": grads, "curv": curv, "ratio": ratio, "a64": a64, "v64": v64, "ref": ref}


def relative_error(x: Tensor, ref: Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double() - ref) / torch.linalg.matrix_norm(ref))


def finite_or_none(obj):
    """obj with every non-finite float replaced by None (JSON null = a diverged iterate)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def first_below(errors: list[float], threshold: float, steps: list[int]) -> int | str:
    """The first step whose error is <= threshold, or "no"."""
    return next((t for t, e in zip(steps, errors, strict=True) if e <= threshold), "no")


def schulz_trace(a: Tensor, v: Tensor, ref: Tensor, order: int, init: str, steps: int) -> list[float]:
    """Error of v X_t for t = 0..: X_0 from the library, then the library's hyperpower step."""
    x = schulz_inverse(a, order=order, init=init, max_iter=0).inverse[None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    resid_mat, res = _residual(a[None], x, eye)
    errors, best, stalled = [relative_error(v @ x[0], ref)], float(res), 0
    for _ in range(steps):
        x = _hyperpower_step(x, resid_mat, order)
        resid_mat, res = _residual(a[None], x, eye)
        errors.append(relative_error(v @ x[0], ref))
        stalled = stalled + 1 if float(res) >= best else 0
        best = min(best, float(res))
        if not math.isfinite(float(res)) or float(res) > 1e3 or (stalled >= 3 and best < 0.5):
            break
    return errors


def lissa_trace(curv: dict, ratio: float, dtype: str, v: Tensor, ref: Tensor, max_terms: int
                ) -> tuple[list[int], list[float]]:
    """Error of the library's LiSSA at 1, 2, 4, ... max_terms series terms (its own prepare + apply)."""
    steps = [2 ** k for k in range(int(math.log2(max_terms)) + 1)]
    errors = []
    for t in steps:
        prepared = prepare(curv, EstimatorOptions("lissa", ratio, dtype=dtype, lissa_iterations=t))
        errors.append(relative_error(prepared.apply({NAME: v[:, None]})[NAME][:, 0], ref))
    return steps, errors


def product_call(curv: dict, grads: Tensor, ratio: float, dtype: str, v: Tensor, ref: Tensor,
                 overrides: dict) -> dict:
    """One prepare + apply of a library method: its error, iterations, convergence and wall time."""
    options = EstimatorOptions(damping_ratio=ratio, dtype=dtype, **overrides)
    start = time.perf_counter()
    prepared = prepare(curv, options)
    stack = {NAME: v[:, None]}  # the K vectors as K examples of the r = 1 matrix
    out = prepared.apply(stack, train_batches=[{NAME: grads}])
    seconds = time.perf_counter() - start
    x, info = out[NAME][:, 0], prepared.measure(stack, out)[NAME]
    return {"error": relative_error(x, ref), "iterations": info.iterations, "converged": info.converged,
            "seconds": seconds}


def run_case(d: int, cond: float, sizes: dict, seed: int = 0) -> list[dict]:
    """Both dtypes of one (d, cond): traces, iterations to each threshold, product calls."""
    case = setup(example_gradients(d // 2, d, seed), cond, seed=seed)
    curv, ratio, ref = case["curv"], case["ratio"], case["ref"]
    eig = torch.linalg.eigvalsh(case["a64"])
    out = []
    for dtype_name, dtype in DTYPES.items():
        a, v = damped_gfim(curv[NAME], ratio, dtype=dtype), case["v64"].to(dtype)
        traces = {}
        for label, (order, init) in SCHULZ_TRACES.items():
            errors = schulz_trace(a, v, ref, order, init, sizes[f"{init}_steps"])
            traces[label] = {"steps": list(range(len(errors))), "errors": errors}
        steps, errors = lissa_trace(curv, ratio, dtype_name, v, ref, sizes["lissa_max"])
        traces["lissa"] = {"steps": steps, "errors": errors}
        reach = {label: {f"{th:g}": first_below(t["errors"], th, t["steps"]) for th in THRESHOLDS}
                 for label, t in traces.items()}
        grads = case["grads"].to(dtype)
        product = {label: product_call(curv, grads, ratio, dtype_name, v, ref, overrides)
                   for label, overrides in PRODUCT.items()}
        out.append({"d": d, "n": d // 2, "cond": cond, "measured_cond": float(eig[-1] / eig[0]),
                    "damping": float(curv[NAME].damping(ratio)), "dtype": dtype_name, "traces": traces,
                    "reach": reach, "product": product})
        print(f"  d={d} cond={cond:.0e} {dtype_name}: " + ", ".join(
            f"{k} {p['error']:.1e}" for k, p in product.items()), flush=True)
    return out


def scale_sweep(sizes: dict, seed: int = 0) -> list[dict]:
    """The paper's fixed start X_0 = 5e-5 I against the scale of A (lambda_max(G) = scale), float64: its
    trace and 20-step product call next to the scaled start, whose steps do not depend on the scale."""
    d, cond = sizes["sweep_d"], sizes["sweep_cond"]
    base = example_gradients(d // 2, d, seed)
    rows = []
    for scale in sizes["scales"]:
        case = setup(base * math.sqrt(scale), cond, top=scale, seed=seed)
        a, v, ref = case["a64"], case["v64"], case["ref"]
        errors = schulz_trace(a, v, ref, 2, "paper", sizes["paper_steps"])
        reach = {f"{th:g}": first_below(errors, th, list(range(len(errors)))) for th in THRESHOLDS}
        product = {label: product_call(case["curv"], case["grads"], case["ratio"], "float64", v, ref,
                                       PRODUCT[label]) for label in ("hyperinf", "hyperinf paper")}
        rows.append({"scale": scale, "lambda_max": float(torch.linalg.eigvalsh(a)[-1]), "d": d, "cond": cond,
                     "paper_trace": errors, "paper_reach": reach, "product": product})
    return rows


def sweep_table(rows: list[dict]) -> str:
    """Markdown: the paper start's iterations and 20-step error per scale, beside the product's hyperinf."""
    lines = ["| lambda_max(A) | paper start: steps to 1e-3 / 1e-6 | paper start, 20 steps: error | "
             "hyperinf (scaled start): error, steps |", "|---|---|---|---|"]
    for r in rows:
        reach = " / ".join(str(r["paper_reach"][f"{th:g}"]) for th in THRESHOLDS)
        paper, ours = r["product"]["hyperinf paper"], r["product"]["hyperinf"]
        lines.append(f"| {r['lambda_max']:.1e} | {reach} | {paper['error']:.1e} | "
                     f"{ours['error']:.1e}, {ours['iterations']} |")
    return "\n".join(lines)


def reach_table(cases: list[dict]) -> str:
    """Markdown: iterations to 1e-3 / 1e-6 per traced method."""
    lines = ["| d | cond | dtype | " + " | ".join(TRACES) + " |", "|---|---|---|" + "---|" * len(TRACES)]
    for c in cases:
        cells = [" / ".join(str(c["reach"][m][f"{th:g}"]) for th in THRESHOLDS) for m in TRACES]
        lines.append(f"| {c['d']} | {c['cond']:.0e} | {c['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def product_table(cases: list[dict]) -> str:
    """Markdown: final error, iterations and wall time of each product call."""
    lines = ["| d | cond | dtype | " + " | ".join(PRODUCT) + " |", "|---|---|---|" + "---|" * len(PRODUCT)]
    for c in cases:
        cells = []
        for p in c["product"].values():
            flag = "" if p["converged"] else " (not conv.)"
            iters = f", {p['iterations']} it" if p["iterations"] else ""
            cells.append(f"{p['error']:.1e}{iters}, {p['seconds'] * 1e3:.0f} ms{flag}")
        lines.append(f"| {c['d']} | {c['cond']:.0e} | {c['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(cases: list[dict], d: int, path: Path) -> None:
    """Rows fp32 / fp64, one panel per conditioning: error vs iteration (log-log), DataInf dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = sorted({c["cond"] for c in cases if c["d"] == d})
    fig, axes = plt.subplots(2, len(conds), figsize=(4.2 * len(conds), 7), squeeze=False, sharey=True)
    for row, dtype in enumerate(DTYPES):
        for col, cond in enumerate(conds):
            case = next(c for c in cases if c["d"] == d and c["cond"] == cond and c["dtype"] == dtype)
            ax = axes[row][col]
            for label, t in case["traces"].items():
                ax.plot([s + 1 for s in t["steps"]], [max(e, 1e-17) for e in t["errors"]], label=label,
                        marker="." if label == "lissa" else None)
            ax.axhline(case["product"]["datainf"]["error"], ls="--", c="gray", label="datainf (closed form)")
            for th in THRESHOLDS:
                ax.axhline(th, ls=":", c="lightgray", lw=0.8)
            ax.set(xscale="log", yscale="log", ylim=(1e-17, 1e3), title=f"d={d}, cond {cond:.0e}, {dtype}",
                   xlabel="iteration + 1")
            if col == 0:
                ax.set_ylabel("relative error of v A^-1")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="d=64, cond 1e2 and 1e4 (the test suite)")
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
    cases = [case for d in sizes["dims"] for cond in sizes["conds"] for case in run_case(d, cond, sizes)]
    sweep = scale_sweep(sizes)
    results = {"command": "python benchmarks/bench_convergence.py" + (" --quick" if args.quick else ""),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU only",
               "torch": torch.__version__, "wall_s": round(time.perf_counter() - start, 1), "sizes": sizes,
               "cases": cases, "scale_sweep": sweep}
    print("\nIterations to relative error 1e-3 / 1e-6 (lissa: first power-of-two checkpoint)\n")
    print(reach_table(cases))
    print("\nProduct calls: relative error of v A^-1, iterations, wall time (prepare + apply)\n")
    print(product_table(cases))
    print(f"\nThe paper's fixed start against the scale of A (d={sizes['sweep_d']}, "
          f"cond {sizes['sweep_cond']:.0e}, float64)\n")
    print(sweep_table(sweep))
    print(f"\nwall time {results['wall_s']} s")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(finite_or_none(results), indent=1))
    if img_dir:
        for d in sizes["dims"]:
            plot(cases, d, img_dir / f"convergence_d{d}.png")
    return results


if __name__ == "__main__":
    main()
