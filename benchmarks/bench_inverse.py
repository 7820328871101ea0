"""Schulz inverse vs Cholesky vs LU on GFIM-like SPD matrices: time, iterations and residual side by side.

    python benchmarks/bench_inverse.py                  # CPU: skips Schulz at d=4096 (minutes per run)
    python benchmarks/bench_inverse.py --device cuda    # every case
    python benchmarks/bench_inverse.py --quick          # smallest case only (smoke run)

Matrices are damped GFIMs as the estimators build them: G = (1/n) sum_k g_k^T g_k + lambda I with
lambda = 0.1 * mean(g^2), from n*r rows with a power-law spectrum (real LoRA gradients decay fast).
Inverses report ||I - A X||_F / sqrt(d); solves (r = 8 right-hand sides, what precondition needs)
report ||X A - V||_F / ||V||_F. Time is the minimum over repeats, residual checks excluded.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperinf_ops.core.inverse import schulz_inverse  # noqa: E402
from hyperinf_ops.preconditioners.hyperinf import schulz_with_options  # noqa: E402
from hyperinf_ops.settings import EstimatorOptions  # noqa: E402

RHS_ROWS = 8  # LoRA rank r: precondition solves v (r, d) against each matrix
# (label, batch, d, rows = n * r examples' gradient rows)
CASES = [("24 x d=384", 24, 384, 256), ("1 x d=1024", 1, 1024, 512), ("1 x d=4096", 1, 4096, 1024)]


def gfim_like(
    batch: int, d: int, rows: int, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, d, d) damped GFIMs and their damping (batch,): `rows` gradient rows (rank rows < d) with a
    power-law spectrum in a random basis (nothing axis-aligned for the solvers to exploit)."""
    gen = torch.Generator().manual_seed(seed)
    decay = torch.arange(1, rows + 1, dtype=torch.float64) ** -1.0
    mix = torch.randn(batch, rows, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    g = ((torch.randn(batch, rows, rows, generator=gen, dtype=torch.float64) * decay) @ mix).to(device)
    gfim = g.transpose(-1, -2) @ g / (rows // RHS_ROWS)
    lam = 0.1 * g.square().mean((-1, -2))
    a = gfim + lam[:, None, None] * torch.eye(d, dtype=torch.float64, device=device)
    return ((a + a.transpose(-1, -2)) / 2).to(dtype), lam


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: str, repeats: int, budget_s: float) -> tuple[float, object]:
    """Minimum wall time over up to `repeats` runs (fewer once `budget_s` is spent), and the last output.

    On CUDA one untimed run first pays for kernel loading and workspace allocation.
    """
    if device.startswith("cuda"):
        fn()
    times, out = [], None
    while not times or (len(times) < repeats and sum(times) < budget_s):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times), out


def inverse_residual(a: torch.Tensor, x: torch.Tensor) -> float:
    eye = torch.eye(a.shape[-1], dtype=torch.float64, device=a.device)
    return float((torch.linalg.matrix_norm(eye - a.double() @ x.double()) / math.sqrt(a.shape[-1])).max())


def solve_residual(a: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> float:
    return float(
        (
            torch.linalg.matrix_norm(x.double() @ a.double() - v.double())
            / torch.linalg.matrix_norm(v.double())
        ).max()
    )


def run_case(a: torch.Tensor, device: str, repeats: int, budget_s: float, with_schulz: bool) -> list[tuple]:
    """Rows (method, seconds, iterations, residual, converged) for one stack of matrices."""
    v = torch.randn(a.shape[0], RHS_ROWS, a.shape[-1], dtype=a.dtype, device=device)
    rows = []
    if with_schulz:
        for order in (2, 3):
            t, res = best_time(lambda o=order: schulz_inverse(a, order=o), device, repeats, budget_s)
            rows.append(
                (f"schulz p={order}", t, res.iterations, inverse_residual(a, res.inverse), res.converged)
            )
        if a.dtype == torch.float64:  # what the product runs: float32 until its floor, float64 polish
            t, res = best_time(lambda: schulz_with_options(a, EstimatorOptions()), device, repeats, budget_s)
            rows.append(("schulz fp32+fp64 polish", t, res.iterations, inverse_residual(a, res.inverse),
                         res.converged))
    t, x = best_time(lambda: torch.cholesky_inverse(torch.linalg.cholesky(a)), device, repeats, budget_s)
    rows.append(("cholesky+cholesky_inverse", t, "", inverse_residual(a, x), ""))
    t, x = best_time(lambda: torch.linalg.inv(a), device, repeats, budget_s)
    rows.append(("linalg.inv (LU)", t, "", inverse_residual(a, x), ""))
    # x A = v  <=>  A x^T = v^T for symmetric A
    t, x = best_time(
        lambda: torch.cholesky_solve(v.transpose(-1, -2), torch.linalg.cholesky(a)).transpose(-1, -2),
        device,
        repeats,
        budget_s,
    )
    rows.append((f"cholesky+cholesky_solve ({RHS_ROWS} rhs)", t, "", solve_residual(a, x, v), ""))
    t, x = best_time(
        lambda: torch.linalg.solve(a, v.transpose(-1, -2)).transpose(-1, -2), device, repeats, budget_s
    )
    rows.append((f"linalg.solve (LU, {RHS_ROWS} rhs)", t, "", solve_residual(a, x, v), ""))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (min is reported)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per method before repeats stop")
    parser.add_argument("--quick", action="store_true", help="only the batched d=384 case")
    parser.add_argument("--schulz-large", action="store_true", help="also run Schulz at d=4096 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"bench_inverse: ignoring {unknown}")
    if args.threads:
        torch.set_num_threads(args.threads)

    cases = CASES[:1] if args.quick else CASES
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    header = f"{'case':<12} {'dtype':<8} {'cond<=':>8} {'method':<34} {'time ms':>10} {'iters':>5} {'residual':>9} conv"
    print(header)
    print("-" * len(header))
    for label, batch, d, n_rows in cases:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            a, lam = gfim_like(batch, d, n_rows, dtype, args.device)
            # ||A||_F / lambda bounds cond(A) (lambda <= lambda_min); near-tight here, the spectrum decays fast
            cond = float((torch.linalg.matrix_norm(a.double()) / lam).max())
            with_schulz = args.device != "cpu" or d < 4096 or args.schulz_large
            for method, seconds, iters, residual, conv in run_case(
                a, args.device, args.repeats, args.budget, with_schulz
            ):
                print(
                    f"{label:<12} {dtype_name:<8} {cond:>8.1e} {method:<34} {seconds * 1e3:>10.1f} "
                    f"{iters!s:>5} {residual:>9.1e} {conv}",
                    flush=True,
                )
            if not with_schulz:
                print(
                    f"{label:<12} {dtype_name:<8} {cond:>8.1e} {'schulz (skipped on CPU: --schulz-large)':<34}"
                )


if __name__ == "__main__":
    main()
