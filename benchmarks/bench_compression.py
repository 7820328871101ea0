"""Compressed gradient rows vs raw: mislabel AUROC, detection and rank agreement of every ranking.

    python benchmarks/bench_compression.py --quick                              # synthetic, a few seconds
    python benchmarks/bench_compression.py --build demo --seed 0 --out DIR      # dataset + full pipeline run
    python benchmarks/bench_compression.py --build bbc --out DIR                # BBC News, same model and LoRA
    python benchmarks/bench_compression.py --store DIR/store --json OUT.json    # the benchmark on a finished run
    python benchmarks/bench_compression.py --aggregate a.json b.json c.json     # mean / spread over runs (--markdown)
    python benchmarks/bench_compression.py --store DIR/store --spectrum         # why: GFIM spectrum, damping check
    python benchmarks/bench_compression.py --widths                             # issue 20: the width rule's bytes and
                                                                                # the 8B codec + curvature memory
    python benchmarks/bench_compression.py --build smollm2 --out DIR            # SmolLM2 on chatterbot pairs (raw rows)
    python benchmarks/bench_compression.py --build llm --out DIR                # the LLM demo's pool (raw rows)

Results and their reading: docs/compression.md (the JSON of every run: benchmarks/results/compression/).

What a setting is (the pipeline's data flow, with the row compressed before anything else sees it):
  - the gradient pass compresses every example's LoRA gradient per matrix, g_l (r, d_l) -> c_l (r, k):
      raw      c_l = g_l
      sketch   c_l = g_l P_l, the product's sketch (hyperinf_ops/core/sketch.py: P_l (d_l, k) i.i.d. N(0, 1/k), seeded
               per matrix); k >= d_l: raw
      orth     c_l = g_l Q_l, Q_l the orthonormal columns of the QR of the same P_l (a random subspace)
      white^p  c_l = g_l (raw), but the stored row is h_l = g_l W_l quantized, W_l = U_l (S_l + lambda_l)^-p from
               the GFIM of a seeded 10% pilot sample (the product's `Whitening`; p = 1/2 full, 1/4 half);
               readers use h_l W_l^-1
      eigen    c_l = g_l U_l, U_l the top-k eigenvectors of the GFIM of a seeded 10% pilot sample of the pool
               (a data-dependent basis: needs the pilot's curvature before the rows are written)
      swhite   c_l = g_l P_l (the sketch), stored whitened in the sketch space: h_l = c_l W_l, W_l from the pilot's
               sketched GFIM (what the pipeline does with sketch_dim or the width rule, and whiten > 0)
      hybrid   c_l = g_l B_l, B_l = [U_m | orth((I - U_m U_m^T) P)] (the pilot's top m = k/2 eigenvectors and a
               random basis of the rest; issue 20's candidate, measured here only)
      wjl      c_l = g_l B_l, B_l = U_l (S_l + lambda_l)^-q U_l^T Q_l (the pilot GFIM's whitening, q = 1/2 or 1/4, then
               a random orthonormal Q_l (d_l, k): a JL sketch of the whitened gradient; measured here only)
      krylov   c_l = g_l K_l, K_l an orthonormal basis of the block Krylov space of the pilot's damped GFIM started
               from the mean target gradient (`krylov_bases`: a target-dependent basis, measured here only), stored
               whitened in its space like swhite
    and sums the curvature of c (exact, float64, as `curvature.curvature_partials` does in the pass);
  - the row stored is the concatenated c in the storage dtype, encoded and decoded by the product's `RowFormat`
    (float32; float16 divided by its max |value|; int8 / int4 with one absmax scale per example and LoRA matrix),
    or int3 / int2 the same way (measured here only);
  - everything else runs in that space as if c were the gradient: damping lambda_l = 0.1 mean(c_l^2), the
    Schulz inverse, LiSSA, DataInf (streaming the stored rows), the query from the mean target gradient
    v_l P_l (exact float64 from `target_gradients`), scores <query, stored row>, self-influence of stored rows.

Rankings (harm: higher = more likely mislabeled): hyperinf, datainf, lissa, tracin (harm = -score, score =
-I(k), higher = more helpful), self_influence_hyperinf and self_influence_tracin (harm = the value). Per setting:
vector bytes per example and the ratio to raw float32, each ranking's AUROC of the flipped labels
(Mann-Whitney, ties half), the share of flips among the 10% / 20% most harmful, and the Spearman of its harm
against the same ranking on raw float32 rows. Goal (issue 8): ratio <= 1/8 (1% slack for the scales) and every
AUROC within 0.02 of raw, in every run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_scale (--build smollm2)

from hyperinf_ops.core.curvature import CurvaturePartial, curvature_partials, merge_curvature  # noqa: E402
from hyperinf_ops.core.estimators import score_gradients  # noqa: E402
from hyperinf_ops.core.row_format import RowFormat  # noqa: E402
from hyperinf_ops.core.sketch import Sketch  # noqa: E402
from hyperinf_ops.core.whitening import Whitening  # noqa: E402
from hyperinf_ops.preconditioners import EstimatorOptions, Prepared, prepare  # noqa: E402
from hyperinf_ops.settings import CompressionSpec  # noqa: E402
from hyperinf_ops.stages.reports import detection_metrics  # noqa: E402

METHODS = ("hyperinf", "datainf", "lissa", "tracin")
RANKINGS = (*METHODS, "self_influence_hyperinf", "self_influence_tracin")
SHORT = {"hyperinf": "hyper", "datainf": "dinf", "lissa": "lissa", "tracin": "tracin",
         "self_influence_hyperinf": "si_hyp", "self_influence_tracin": "si_tr"}
KS = (192, 96, 48, 24)
SKETCH_SEEDS = (0, 1)
DAMPING_RATIO = 0.1
# 8x smaller, with 1% slack for the scales of quantized rows (sketch k=96 float16: 36864 + 4 bytes = 7.999x).
GOAL_RATIO, GOAL_AUROC = 1.01 / 8, 0.02
BATCH = 512  # examples per batch wherever float64 copies are made
PILOT_FRACTION = 0.1  # --pilot-fraction (the pipeline takes min(pilot_examples = 512, pool))
DTYPE_BITS = {"float32": 32, "float16": 16, "int8": 8, "int4": 4, "int3": 3, "int2": 2, "lloyd2": 2, "sign1": 1}
RAW_ROWS = {"sketch_dim": 0, "whiten": 0, "dtype": "float32"}  # the stored rows every setting starts from
EXTRA_INT_LEVELS = {"int3": 3, "int2": 1}  # not row formats of the product; measured here to show the limit


# ------------------------------------------------------------------------------------- the compressions


def sketch_bases(shapes: Mapping[str, tuple[int, int]], k: int, seed: int) -> dict[str, Tensor | None]:
    """name -> the product's sketch matrix P_l (d_l, k) (`hyperinf_ops.core.sketch.Sketch`), or None where
    k >= d_l (that matrix is kept raw). Keys sorted."""
    sketch = Sketch(shapes, CompressionSpec(sketch_dim=k, seed=seed))
    return {name: sketch.matrix(name) for name in sketch.shapes}


def orthonormal_bases(shapes: Mapping[str, tuple[int, int]], k: int, seed: int) -> dict[str, Tensor | None]:
    """`sketch_bases` with orthonormal columns (Q of the QR of the same Gaussian P): a projection onto a random
    k-dim subspace, so the sketch-space damped GFIM is the Galerkin restriction of G + lambda I (P^T P = I),
    where a Gaussian P adds the anisotropy of P^T P (eigenvalues spread over [0.42, 1.83] x d/k at k = d/8)."""
    return {name: None if p is None else torch.linalg.qr(p.double())[0].float()
            for name, p in sketch_bases(shapes, k, seed).items()}


def apply_bases(grads: Mapping[str, Tensor], bases: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """c_l = g_l P_l for stacks (..., r, d_l) (float32 gradients stay float32, float64 stay float64)."""
    return {name: g if bases[name] is None else g @ bases[name].to(g.dtype) for name, g in grads.items()}


def _pilot(grads: Mapping[str, Tensor], seed: int, fraction: float | None = None) -> dict[str, Tensor]:
    """A seeded sample of `fraction` of the examples (default PILOT_FRACTION), in pool order."""
    n = next(iter(grads.values())).shape[0]
    share = PILOT_FRACTION if fraction is None else fraction
    return _rows(grads, np.random.default_rng(seed).choice(n, size=max(1, round(share * n)), replace=False))


def _rows(grads: Mapping[str, Tensor], index: np.ndarray) -> dict[str, Tensor]:
    """The examples at `index`, in pool order."""
    pick = torch.from_numpy(np.sort(index))
    return {name: g[pick] for name, g in grads.items()}


def eigen_bases(grads: Mapping[str, Tensor], k: int, seed: int) -> dict[str, Tensor | None]:
    """name -> the top-k eigenvectors (d_l, k) of the GFIM of the pilot sample (`_pilot`)."""
    curvature = _curvature(_pilot(grads, seed))
    out: dict[str, Tensor | None] = {}
    for name in sorted(grads):
        if k >= grads[name].shape[-1]:
            out[name] = None
            continue
        _, vecs = torch.linalg.eigh(curvature[name].gfim())
        out[name] = vecs[:, -k:].flip(1).to(torch.float32).contiguous()
    return out


def pilot_bases(grads: Mapping[str, Tensor], kind: str, k: int, seed: int, power: float = 0.5
                ) -> dict[str, Tensor | None]:
    """name -> B_l (d_l, k) from the pilot GFIM U S U^T (`_pilot`) and a seeded random orthonormal Q (the QR of the
    product's sketch matrix): `hybrid` = [U_m | orth((I - U_m U_m^T) Q')], m = k // 2 (Q' the next sketch seed's);
    `wjl` = U (S + lambda)^-power U^T Q. None where k >= d_l."""
    curvature = _curvature(_pilot(grads, seed))
    random_q = orthonormal_bases({n: tuple(g.shape[1:]) for n, g in grads.items()}, k, seed)
    other_q = orthonormal_bases({n: tuple(g.shape[1:]) for n, g in grads.items()}, k - k // 2, seed + 1)
    out: dict[str, Tensor | None] = {}
    for name in sorted(grads):
        if random_q[name] is None:
            out[name] = None
            continue
        values, vecs = torch.linalg.eigh(curvature[name].gfim())
        values, vecs = values.flip(0).clamp_min(0), vecs.flip(1)
        q = random_q[name].double()
        if kind == "hybrid":
            top = vecs[:, : k // 2]
            rest = other_q[name].double()
            rest = torch.linalg.qr(rest - top @ (top.T @ rest))[0]
            basis = torch.cat([top, rest], 1)
        else:
            lam = curvature[name].damping(DAMPING_RATIO)
            basis = (vecs * (values + lam).pow(-power)) @ (vecs.T @ q)
        out[name] = basis.to(torch.float32).contiguous()
    return out


def krylov_bases(grads: Mapping[str, Tensor], target: Mapping[str, Tensor], k: int, seed: int
                 ) -> dict[str, Tensor | None]:
    """name -> K_l (d_l, k): an orthonormal basis of the block Krylov space span{v^T, A v^T, A^2 v^T, ...} of the
    pilot's damped GFIM A = G_pilot + lambda I (`_pilot`) started from the mean target gradient's rows v_l (r, d_l),
    r columns per step, the last step cut to k. CG's space for (G + lambda I) x = v^T: the query's preconditioned
    direction lies in it up to the pilot's error, so the target's scores survive the restriction to k columns.
    A target-dependent basis (measured here only): a target set added after the rows are written gets none of it.
    None where k >= d_l."""
    curvature = _curvature(_pilot(grads, seed))
    out: dict[str, Tensor | None] = {}
    for name in sorted(grads):
        d = grads[name].shape[-1]
        if k >= d:
            out[name] = None
            continue
        part = curvature[name]
        damped = part.gfim() + part.damping(DAMPING_RATIO) * torch.eye(d, dtype=torch.float64)
        basis = block = torch.linalg.qr(target[name].to(torch.float64).T)[0][:, :k]
        while basis.shape[1] < k:
            step = damped @ block
            for _ in range(2):  # twice: one Gram-Schmidt pass leaves float64 round-off in the earlier directions
                step = step - basis @ (basis.T @ step)
            block = torch.linalg.qr(step)[0][:, : k - basis.shape[1]]
            basis = torch.cat([basis, block], 1)
        out[name] = basis.to(torch.float32).contiguous()
    return out


def whitening(grads: Mapping[str, Tensor], seed: int, power: float = 0.5) -> Whitening:
    """The product's whitening (`hyperinf_ops.core.whitening.Whitening`, W = U (S + lambda)^-power) from the GFIM
    of the pilot sample (`_pilot`: here a fraction of the pool; the pipeline takes `pilot_examples`)."""
    return Whitening.from_curvature(_curvature(_pilot(grads, seed)), power)


# ------------------------------------------------------------------------------------------- row storage


def store_rows(c: Mapping[str, Tensor], dtype: str, rank: int = 0) -> dict[str, Tensor]:
    """What a reader gets back from rows stored in `dtype` (float32 out); a row = the concatenated c, sorted names.

    float32 / float16 / int8 / int4: encoded and decoded by the product's `RowFormat` (one block per matrix;
    `rank` > 0: factor rows of that rank).
    int3 / int2 (measured here only, not shipped): the same per-block absmax round-to-nearest with
    L = 2^(B-1) - 1 levels (3, 1); lloyd2 / sign1 (measured here only): `_low_bit`.
    """
    names = sorted(c)
    n = c[names[0]].shape[0]
    if dtype in ("lloyd2", "sign1"):
        return {name: _low_bit(c[name].to(torch.float32), dtype) for name in names}
    if dtype in EXTRA_INT_LEVELS:
        levels, out = EXTRA_INT_LEVELS[dtype], {}
        for name in names:
            x = c[name].to(torch.float32)
            absmax = x.abs().reshape(n, -1).amax(1)
            scale = torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))[:, None, None]
            out[name] = torch.round(x / scale).clamp(-levels, levels) * scale
        return out
    fmt = RowFormat(dtype, tuple(c[name][0].numel() for name in names), rank, c[names[0]].shape[1] if rank else 0)
    out = {name: torch.empty(c[name].shape, dtype=torch.float32) for name in names}
    for start in range(0, n, BATCH):
        rows = torch.cat([c[name][start: start + BATCH].reshape(-1, c[name][0].numel()).to(torch.float32)
                          for name in names], 1)
        enc = fmt.encode(rows)
        back = fmt.decode(torch.from_numpy(enc.values), torch.from_numpy(enc.grad_scale),
                          None if enc.block_scales is None else torch.from_numpy(enc.block_scales))
        col = 0
        for name in names:
            size = c[name][0].numel()
            out[name][start: start + BATCH] = back[:, col: col + size].reshape(-1, *c[name].shape[1:])
            col += size
    return out


def _low_bit(x: Tensor, dtype: str) -> Tensor:
    """(n, r, k) per-block 2-bit / 1-bit codes read back: `lloyd2` the Lloyd-Max levels of a Gaussian (+-0.4528,
    +-1.510 times the block's RMS, MSE 0.118 of its variance), `sign1` sign x the block's mean |x| (MSE 0.36)."""
    flat = x.reshape(x.shape[0], -1)
    if dtype == "sign1":
        return torch.sign(x) * flat.abs().mean(1)[:, None, None]
    rms = flat.pow(2).mean(1).sqrt().clamp_min(1e-30)[:, None, None]
    z = x / rms
    return torch.sign(z) * torch.where(z.abs() < 0.9816, 0.4528, 1.510) * rms


def vector_bytes(shapes: Mapping[str, tuple[int, int]], widths: Mapping[str, int], dtype: str, rank: int = 0) -> int:
    """Bytes of one stored vector: sum r * width_l entries (rank > 0: the factor rows' q (r + width_l)), plus the
    scales (float16: one float32 per row, as the store writes `grad_scale`; intB: B bits an entry, packed, and one
    float32 scale per matrix, or per quantization group of factor rows)."""
    names = sorted(shapes)
    fmt = RowFormat("float32", tuple(shapes[n][0] * widths[n] for n in names), rank, shapes[names[0]][0] * (rank > 0))
    entries = fmt.values
    scales = 0 if dtype == "float32" else 4 if dtype == "float16" else 4 * len(fmt.groups)
    return math.ceil(entries * DTYPE_BITS[dtype] / 8) + scales


# ----------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    kind: str  # raw, sketch, orth, eigen, white, swhite, hybrid, wjl, krylov
    dtype: str = "float32"
    k: int | None = None
    seed: int = 0
    power: float = 0.5  # white: W = U (S + lambda)^-power (0.5 = full whitening)
    rank: int = 0  # swhite: factor rows of this rank (row_format.py; 0 = dense)

    @property
    def label(self) -> str:
        return self._label() + self._factors()

    @property
    def group(self) -> str:
        """The label without the sketch seed (settings that differ only by P)."""
        return self._group() + self._factors()

    def _factors(self) -> str:
        return f" rank-{self.rank} factors" if self.rank else ""

    def _label(self) -> str:
        if self.kind == "raw":
            return f"raw {self.dtype}"
        if self.kind == "white":
            return f"white^{self.power:g} pilot{self.seed} {self.dtype}"
        if self.kind == "swhite":
            sketch = f"sketch k={self.k} P{self.seed}" if self.k else "unsketched"
            return f"{sketch} white^{self.power:g} {self.dtype}"
        if self.kind == "krylov":
            return f"krylov k={self.k} pilot{self.seed} white^{self.power:g} {self.dtype}"
        if self.kind == "wjl":
            return f"wjl^{self.power:g} k={self.k} P{self.seed} {self.dtype}"
        seed = f" P{self.seed}" if self.kind in ("sketch", "orth", "hybrid") else ""
        return f"{self.kind} k={self.k}{seed} {self.dtype}"

    def _group(self) -> str:
        if self.kind == "white":
            return f"white^{self.power:g} {self.dtype}"
        if self.kind == "swhite":
            return f"{f'sketch k={self.k}' if self.k else 'unsketched'} white^{self.power:g} {self.dtype}"
        if self.kind == "krylov":
            return f"krylov k={self.k} white^{self.power:g} {self.dtype}"
        if self.kind == "wjl":
            return f"wjl^{self.power:g} k={self.k} {self.dtype}"
        return f"{self.kind} k={self.k} {self.dtype}" if self.kind in ("sketch", "orth", "hybrid") else self.label


def default_settings(ks: Sequence[int] = KS, seeds: Sequence[int] = SKETCH_SEEDS, extras: bool = True) -> list[Setting]:
    """raw fp32 (the reference, first), raw fp16, every sketch k x seed in fp32 and fp16; extras: raw int8 and
    int4, sketch int8 for the two largest k, the pilot eigenbasis (every k, fp32 and fp16; the largest in int8),
    the orthonormal sketch (every k x seed, fp32), pilot-whitened rows (full and half whitening) in int4 / int3
    (two pilot seeds)."""
    out = [Setting("raw"), Setting("raw", "float16")]
    out += [Setting("sketch", dtype, k, s) for k in ks for dtype in ("float32", "float16") for s in seeds]
    if extras:
        out += [Setting("raw", "int8"), Setting("raw", "int4")]
        out += [Setting("sketch", "int8", k, s) for k in ks[:2] for s in seeds]
        out += [Setting("eigen", dtype, k, 0) for k in ks for dtype in ("float32", "float16")]
        out += [Setting("eigen", "int8", ks[0], 0)]
        out += [Setting("orth", "float32", k, s) for k in ks for s in seeds]
        out += [Setting("white", dtype, None, s, power) for power in (0.5, 0.25) for dtype in ("int4", "int3")
                for s in seeds]
    return out


def layout_settings(ks: Sequence[int], seeds: Sequence[int] = SKETCH_SEEDS,
                    swhite_dtypes: Sequence[str] = ("int4", "float32"), ranks: Sequence[int] = ()) -> list[Setting]:
    """Issue 20's candidates at each k: raw fp32 (the reference) and today's whitened int4, then per k the plain
    sketch (fp32), the sketch whitened in sketch space (int4: the width rule's layout; fp32: the same without
    quantization), the pilot's top-k/2 eigenvectors + a random basis of the rest (hybrid, fp32) and the
    whitened JL sketch (wjl, q = 1/2 and 1/4, fp32) and the target's Krylov basis whitened in its space (int4);
    `ranks`: the sketch whitened in sketch space stored as factor rows of each rank (k = 0: unsketched, the width
    rule's layout for SmolLM2)."""
    out = [Setting("raw"), Setting("white", "int4", None, 0, 0.25)]
    for k in ks:
        out += [Setting("sketch", "float32", k, s) for s in seeds]
        out += [Setting("swhite", dtype, k, s, 0.25) for dtype in swhite_dtypes for s in seeds]
        out += [Setting("swhite", dtype, k, s, 0.25, rank) for rank in ranks for dtype in swhite_dtypes
                for s in seeds]
        out += [Setting("hybrid", "float32", k, 0), Setting("wjl", "float32", k, 0, 0.5),
                Setting("wjl", "float32", k, 0, 0.25), Setting("krylov", "int4", k, 0, 0.25)]
    return out


# --------------------------------------------------------------------------------------------------- data


@dataclass
class Pool:
    """Per-example raw gradients name -> (n, r, d) float32, the mean target gradient name -> (r, d) float64,
    and the planted-flip truth (n,) bool, in the same example order."""

    source: str
    grads: dict[str, Tensor]
    target: dict[str, Tensor]
    flipped: np.ndarray
    sample_ids: list[str] = field(default_factory=list)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: tuple(g.shape[1:]) for name, g in sorted(self.grads.items())}


def load_store(root: str, target_set: str = "clean_val") -> Pool:
    """A finished pipeline run's raw float32 rows (`compression: RAW_ROWS`, as `build` runs it), its mean target
    gradient and `flipped` column."""
    from hyperinf_ops.adapters import AdapterStore
    from hyperinf_ops.scorer import raw_gradient_batches
    from hyperinf_ops.store import LanceStore

    store = LanceStore(root)
    fp = store.fingerprint("gradients")
    if fp is None or (fp.sketch_dim, fp.row_dtype, fp.whitening) != (0, "float32", ""):
        raise SystemExit(f"{root} does not hold raw float32 rows (compression: {RAW_ROWS}); build it with --build")
    shapes = AdapterStore(root).require_current().selected_shapes(None)
    ids: list[str] = []
    chunks: dict[str, list[Tensor]] = {name: [] for name in shapes}
    for batch_ids, grads in raw_gradient_batches(store, shapes):
        ids += batch_ids
        for name, g in grads.items():
            chunks[name].append(g.to(torch.float32))
    grads = {name: torch.cat(chunks[name]) for name in sorted(shapes)}
    row = store.read_target_gradient(target_set)
    if row is None:
        raise SystemExit(f"no target gradient for {target_set!r} in {root}: run the pipeline first")
    width = sum(r * d for r, d in shapes.values())
    flat = torch.from_numpy(row["vector"])
    if flat.numel() == row["count"] * width:  # kept per example (signals.cover): v is their mean
        flat = flat.reshape(row["count"], width).mean(0)
    if flat.numel() != width:
        raise SystemExit(f"target vector has {flat.numel()} entries, the matrices {width}")
    target, start = {}, 0
    for name in sorted(shapes):
        r, d = shapes[name]
        target[name] = flat[start: start + r * d].reshape(r, d).to(torch.float64)
        start += r * d
    examples = store.open("examples")
    if "flipped" not in examples.schema.names:  # a causal-LM pool (SmolLM2): no planted flips, Spearman only
        return Pool(source=str(root), grads=grads, target=target, flipped=np.zeros(len(ids), bool), sample_ids=ids)
    truth = examples.to_table(columns=["sample_id", "flipped"]).to_pandas().set_index("sample_id")
    flipped = truth["flipped"].astype(bool).reindex(ids).to_numpy()
    return Pool(source=str(root), grads=grads, target=target, flipped=flipped, sample_ids=ids)


def synthetic_pool(n: int = 400, m: int = 100, shapes: Sequence[tuple[int, int]] = ((4, 128),) * 4,
                   flip_fraction: float = 0.2, seed: int = 0, noise: float = 0.3) -> Pool:
    """Low-rank LoRA-like gradients with planted flips, in the sign convention of the real ones.

    Per matrix: inputs x = y * mu + noise (a 24-dim subspace with a decaying spectrum, plus a little isotropic
    noise), per-row factors c_i (r,), gradient g = -y_obs * m * c_i x^T with a small residual m for clean
    examples and a large one for flipped ones (y_obs = -y): flipped gradients point against the clean target's.
    """
    gen = torch.Generator().manual_seed(seed)
    y = torch.where(torch.rand(n + m, generator=gen) < 0.5, -1.0, 1.0).double()
    flip = torch.zeros(n + m, dtype=torch.bool)
    flip[torch.randperm(n, generator=gen)[: round(flip_fraction * n)]] = True
    y_obs = torch.where(flip, -y, y)
    resid = torch.where(flip, 0.7, 0.15) * torch.exp(0.5 * torch.randn(n + m, generator=gen, dtype=torch.float64))
    grads, target = {}, {}
    for i, (r, d) in enumerate(shapes):
        name = f"m{i:02d}"
        basis = torch.linalg.qr(torch.randn(d, 24, generator=gen, dtype=torch.float64))[0].T  # (24, d)
        spectrum = torch.arange(1, 25, dtype=torch.float64) ** -0.8
        mu = basis[0] * 0.8
        x = (y[:, None] * mu + (torch.randn(n + m, 24, generator=gen, dtype=torch.float64) * spectrum) @ basis
             + noise * torch.randn(n + m, d, generator=gen, dtype=torch.float64))
        rows = torch.randn(r, generator=gen, dtype=torch.float64) + 0.7 * torch.randn(n + m, r, generator=gen,
                                                                                         dtype=torch.float64)
        g = -(y_obs * resid)[:, None, None] * rows[:, :, None] * x[:, None, :] * 10.0 ** (-i)
        grads[name] = g[:n].to(torch.float32)
        target[name] = g[n:].mean(0)
    return Pool(source=f"synthetic(n={n}, seed={seed})", grads=grads, target=target, flipped=flip[:n].numpy(),
                sample_ids=[str(i) for i in range(n)])


# ------------------------------------------------------------------------------------------------ scoring


def _batches(stacks: Mapping[str, Tensor], size: int = BATCH) -> Iterator[dict[str, Tensor]]:
    n = next(iter(stacks.values())).shape[0]
    for start in range(0, n, size):
        yield {name: x[start: start + size] for name, x in stacks.items()}


def _curvature(c: Mapping[str, Tensor]) -> dict[str, CurvaturePartial]:
    return merge_curvature(curvature_partials(b) for b in _batches(c))


def rankings(c: Mapping[str, Tensor], rows: Mapping[str, Tensor], v: Mapping[str, Tensor],
             lissa_iterations: int = 1000, methods: Sequence[str] = METHODS
             ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Harm (higher = more likely mislabeled) of every ranking, and seconds per ranking.

    c: the compressed gradients the gradient pass sums the curvature of; rows: what the stored rows read back
    as; v: the compressed mean target gradient (r, k) float64.
    """
    curvature = _curvature(c)
    harm: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    prepared: dict[str, Prepared] = {}
    for method in methods:
        start = time.perf_counter()
        options = EstimatorOptions(method=method, damping_ratio=DAMPING_RATIO, lissa_iterations=lissa_iterations)
        prepared[method] = prepare(curvature, options)
        pv = prepared[method].apply_one(v, train_batches=_batches(rows) if method == "datainf" else None)
        score = torch.cat([score_gradients(pv, b) for b in _batches(rows)])
        harm[method] = (-score).numpy()
        seconds[method] = time.perf_counter() - start
    for method in ("hyperinf", "tracin"):
        start = time.perf_counter()
        values = torch.cat([prepared[method].self_influence(b) for b in _batches(rows)])
        harm[f"self_influence_{method}"] = values.numpy()
        seconds[f"self_influence_{method}"] = time.perf_counter() - start
    return harm, seconds


def evaluate(pool: Pool, settings: Sequence[Setting], *, lissa_iterations: int = 1000,
             methods: Sequence[str] = METHODS, log=print) -> dict:
    """Every setting's bytes, AUROC / detection per ranking and Spearman against raw float32 (settings[0] must
    be raw float32). Returns the JSON-ready result."""
    if settings[0] != Setting("raw"):
        raise ValueError("the first setting must be raw float32 (the reference)")
    shapes = pool.shapes
    raw_bytes = vector_bytes(shapes, {n: s[1] for n, s in shapes.items()}, "float32")
    results, reference = [], None
    ranked = [r for r in RANKINGS if r in methods or r.removeprefix("self_influence_") in methods]
    cache: dict[tuple, tuple] = {}
    for setting in settings:
        start = time.perf_counter()
        key = (setting.kind if setting.kind != "swhite" else "sketch", setting.k, setting.seed,
               setting.power if setting.kind in ("white", "wjl") else 0.0)
        if key not in cache:
            cache.clear()  # one compressed copy at a time (the raw one is pool.grads)
            if setting.kind == "white":
                cache[key] = (pool.grads, whitening(pool.grads, setting.seed, setting.power))
            else:
                if setting.kind == "raw":
                    bases = dict.fromkeys(shapes)
                elif setting.kind == "sketch":
                    bases = sketch_bases(shapes, setting.k, setting.seed)
                elif setting.kind == "orth":
                    bases = orthonormal_bases(shapes, setting.k, setting.seed)
                elif setting.kind in ("hybrid", "wjl"):
                    bases = pilot_bases(pool.grads, setting.kind, setting.k, setting.seed, setting.power)
                elif setting.kind == "krylov":
                    bases = krylov_bases(pool.grads, pool.target, setting.k, setting.seed)
                elif setting.kind == "swhite":
                    bases = sketch_bases(shapes, setting.k, setting.seed)
                else:
                    bases = eigen_bases(pool.grads, setting.k, setting.seed)
                cache[key] = (apply_bases(pool.grads, bases), bases)
        if setting.kind == "white":
            # Curvature and query exact (raw); the stored row is the whitened gradient h = g W, quantized, and
            # a reader maps it back with W^-1 (or, equivalently, maps the query to pv W^-T once).
            c, white = cache[key]
            rows = white.undo(store_rows(white.apply(c), setting.dtype))
            v, widths = pool.target, {name: shapes[name][1] for name in shapes}
        else:
            c, bases = cache[key]
            if setting.kind in ("swhite", "krylov"):
                # whitened in the sketch space from the pilot's sketched GFIM (the pipeline's width-rule layout)
                white = whitening(c, setting.seed, setting.power)
                rows = white.undo(store_rows(white.apply(c), setting.dtype, setting.rank))
            else:
                rows = store_rows(c, setting.dtype)
            v = apply_bases(pool.target, bases)
            widths = {name: shapes[name][1] if bases[name] is None else bases[name].shape[1] for name in shapes}
        harm, seconds = rankings(c, rows, v, lissa_iterations, methods)
        if reference is None:
            reference = harm
        nbytes = vector_bytes(shapes, widths, setting.dtype, setting.rank)
        per_ranking = {}
        for name in ranked:
            rho = float(spearmanr(harm[name], reference[name]).statistic)
            # no planted flips (a causal-LM pool): only the agreement with raw is measured
            metrics = detection_metrics(harm[name], pool.flipped) if pool.flipped.any() else {
                "auroc": float("nan"), "detection_at_10": float("nan"), "detection_at_20": float("nan")}
            per_ranking[name] = {**metrics, "spearman_vs_raw": rho}
        raw_auroc = results[0]["rankings"] if results else per_ranking
        drops = [raw_auroc[r]["auroc"] - per_ranking[r]["auroc"] for r in ranked]
        drops = [x for x in drops if x == x] or [0.0]
        result = {
            **asdict(setting), "label": setting.label, "group": setting.group, "bytes": nbytes,
            "ratio": nbytes / raw_bytes, "rankings": per_ranking, "max_auroc_drop": max(drops),
            "max_abs_auroc_diff": max(abs(x) for x in drops), "seconds": time.perf_counter() - start,
            "seconds_per_ranking": seconds,
        }
        result["meets_goal"] = bool(result["ratio"] <= GOAL_RATIO and result["max_abs_auroc_diff"] <= GOAL_AUROC)
        results.append(result)
        log(f"  {setting.label:<26} {result['seconds']:6.1f} s   hyperinf AUROC "
            f"{per_ranking['hyperinf']['auroc']:.3f}  rho {per_ranking['hyperinf']['spearman_vs_raw']:.3f}")
        del rows
    return {"source": pool.source, "n": len(pool.flipped), "flipped": int(pool.flipped.sum()),
            "matrices": len(shapes), "shapes": sorted({tuple(s) for s in shapes.values()}),
            "raw_bytes": raw_bytes, "lissa_iterations": lissa_iterations, "damping_ratio": DAMPING_RATIO,
            "settings": results}


def pilot_curvature_agreement(pool: Pool, fractions: Sequence[float], seed: int = 0) -> dict:
    """HyperINF scores of the raw rows with the curvature of a seeded pilot sample only (full space, no sketch):
    what scoring the configured target sets during the gradient pass could give, with the query preconditioned
    before the pass from the pilot's GFIM, against the stored raw rows' scores (the whole pool's GFIM). Per pilot
    share: Spearman, Pearson and the top-5% overlap of the hyperinf ranking with raw's; and, as the ranking's own
    resolution, the Spearman between the rankings under the curvature of two disjoint halves of the pool."""
    def hyperinf(curvature: Mapping[str, CurvaturePartial]) -> np.ndarray:
        prepared = prepare(curvature, EstimatorOptions(method="hyperinf", damping_ratio=DAMPING_RATIO))
        pv = prepared.apply_one(pool.target)
        return torch.cat([score_gradients(pv, b) for b in _batches(pool.grads)]).numpy()

    reference = hyperinf(_curvature(pool.grads))
    n = len(reference)
    top = max(1, round(0.05 * n))
    best = set(np.argsort(-reference)[:top])
    out = []
    for fraction in fractions:
        pilot = _pilot(pool.grads, seed, fraction)
        scores = hyperinf(_curvature(pilot))
        out.append({"pilot_fraction": fraction, "pilot_examples": len(next(iter(pilot.values()))),
                    "spearman": float(spearmanr(scores, reference).statistic),
                    "pearson": float(pearsonr(scores, reference).statistic),
                    "top5_overlap": len(best & set(np.argsort(-scores)[:top])) / top})
        print(f"  pilot {fraction:.3f} ({out[-1]['pilot_examples']} examples): Spearman {out[-1]['spearman']:.3f}, Pearson "
              f"{out[-1]['pearson']:.3f}, top-5% overlap {out[-1]['top5_overlap']:.2f}")
    # the ranking's own resolution: HyperINF with the curvature of one half of the pool against the other half's
    halves = []
    for split in (0, 1):
        order = np.random.default_rng(split).permutation(n)
        a, b = (hyperinf(_curvature(_rows(pool.grads, part))) for part in (order[: n // 2], order[n // 2:]))
        halves.append({"seed": split, "spearman_a_b": float(spearmanr(a, b).statistic),
                       "spearman_a_full": float(spearmanr(a, reference).statistic),
                       "spearman_b_full": float(spearmanr(b, reference).statistic)})
        print(f"  halves (split {split}): A vs B {halves[-1]['spearman_a_b']:.3f}, A vs all "
              f"{halves[-1]['spearman_a_full']:.3f}, B vs all {halves[-1]['spearman_b_full']:.3f}")
    return {"source": pool.source, "n": n, "damping_ratio": DAMPING_RATIO, "pilot": out, "halves": halves}


def damping_check(pool: Pool, ratios: Sequence[float] = (0.1, 0.4, 1.6), k: int = 48) -> dict:
    """hyperinf AUROC on raw rows at larger damping ratios, and of the k-sketch (seed 0) with the sketch-space
    damping rule vs the raw damping (lambda_l = 0.1 mean(g_l^2), the exact raw value: sq_sum rescaled by k / d)."""
    def auroc(c: Mapping[str, Tensor], v: Mapping[str, Tensor], curvature: Mapping[str, CurvaturePartial],
              ratio: float) -> float:
        pv = prepare(curvature, EstimatorOptions(method="hyperinf", damping_ratio=ratio)).apply_one(v)
        harm = -torch.cat([score_gradients(pv, b) for b in _batches(c)]).numpy()
        return detection_metrics(harm, pool.flipped)["auroc"]

    raw_curvature = _curvature(pool.grads)
    out = {f"raw ratio {r:g}": auroc(pool.grads, pool.target, raw_curvature, r) for r in ratios}
    bases = sketch_bases(pool.shapes, k, 0)
    c, v = apply_bases(pool.grads, bases), apply_bases(pool.target, bases)
    sketched = _curvature(c)
    out[f"sketch k={k} P0, sketch-space damping"] = auroc(c, v, sketched, DAMPING_RATIO)
    for name, part in sketched.items():
        part.sq_sum = raw_curvature[name].sq_sum * c[name].shape[-1] / pool.grads[name].shape[-1]
    out[f"sketch k={k} P0, raw damping"] = auroc(c, v, sketched, DAMPING_RATIO)
    return out


def spectrum(pool: Pool, ks: Sequence[int] = KS) -> dict:
    """Why sketches lose HyperINF and not TracIn: per matrix, the GFIM's eigenvalues S (full pool) against its
    damping lambda, and the exact scores split over eigen-directions, score_k = sum_j (v.u_j)(g_k.u_j) / w_j
    (w_j = S_j + lambda for hyperinf, 1 for tracin): how much of each score's variance over examples the
    directions beyond the top k carry, and the Spearman of the top-k truncation with the full score. Also
    `damping_check`."""
    curvature = _curvature(pool.grads)
    above, participation, top48, dims = [], [], [], []
    full: dict[str, Tensor | float] = {"hyperinf": 0.0, "tracin": 0.0}
    partial: dict[str, dict[int, Tensor | float]] = {m: dict.fromkeys(ks, 0.0) for m in full}
    for name, part in curvature.items():
        values, vecs = torch.linalg.eigh(part.gfim())
        values, vecs = values.flip(0), vecs.flip(1)
        lam = part.damping(DAMPING_RATIO)
        dims.append(values.numel())
        above.append(int((values > lam).sum()))
        participation.append(float(values.sum() ** 2 / values.square().sum()))
        top48.append(float(values[:48].sum() / values.sum()))
        v = pool.target[name] @ vecs
        for method, weight in (("hyperinf", values + lam), ("tracin", torch.ones_like(values))):
            # (n, d): each example's score split over the eigen-directions (summed over the r rows)
            per_direction = torch.cat([(chunk.to(torch.float64) @ vecs * (v / weight)).sum(1)
                                       for chunk in pool.grads[name].split(BATCH)])
            cumulative = per_direction.cumsum(1)
            full[method] = full[method] + cumulative[:, -1]
            for k in ks:
                partial[method][k] = partial[method][k] + cumulative[:, min(k, cumulative.shape[1]) - 1]
    out = {"damping": damping_check(pool), "directions_median": float(np.median(dims)),
           "directions_above_damping_median": float(np.median(above)),
           "participation_ratio_median": float(np.median(participation)),
           "top48_energy_share_median": float(np.median(top48)), "truncation": {}}
    for method in full:
        for k in ks:
            tail = full[method] - partial[method][k]
            out["truncation"][f"{method} k={k}"] = {
                "tail_variance_share": float(tail.var() / full[method].var()),
                "spearman": float(spearmanr(partial[method][k].numpy(), full[method].numpy()).statistic)}
    return out


# ------------------------------------------------------------------------- issue 20: the width rule, 8B memory


def lora_shapes_of(layers: int, widths: Mapping[str, tuple[int, int]], rank: int = 8) -> dict[str, tuple[int, int]]:
    """name -> (r, d) of LoRA on each module of `widths` (module -> (d_in, d_out)) in every layer, as the pipeline
    lays a gradient out (lora_A: (r, d_in); lora_B: (r, d_out))."""
    return {f"layers.{layer:02d}.{module}.lora_{side}": (rank, d_in if side == "A" else d_out)
            for layer in range(layers) for module, (d_in, d_out) in widths.items() for side in "AB"}


# The models of the issue, q/v LoRA r = 8 (SmolLM2-135M: hidden 576, 3 KV heads of 64; Llama-3-8B: hidden 4096,
# 8 KV heads of 128).
MODEL_SHAPES = {
    "MiniLM (all-MiniLM-L6-v2)": lora_shapes_of(6, {"query": (384, 384), "value": (384, 384)}),
    "SmolLM2-135M": lora_shapes_of(30, {"q_proj": (576, 576), "v_proj": (576, 192)}),
    "Llama-3-8B": lora_shapes_of(32, {"q_proj": (4096, 4096), "v_proj": (4096, 1024)}),
}


def widths_report(spec: CompressionSpec | None = None) -> dict:
    """Per model of MODEL_SHAPES, from its shapes alone: the sketch width the width rule gives under `spec` (the
    pipeline's DEFAULT_COMPRESSION), the stored row's bytes (`RowFormat.row_bytes`, what `hyperinf plan` prints)
    against raw float32 and today's unsketched whitened int4, and the codec + curvature state it implies."""
    from hyperinf_ops.core.sketch import row_format, row_layout, row_shapes
    from hyperinf_ops.settings import DEFAULT_COMPRESSION

    spec = spec or DEFAULT_COMPRESSION
    out = {}
    for model, shapes in MODEL_SHAPES.items():
        k, rank = row_layout(shapes, spec)
        stored = row_shapes(shapes, spec)
        unsketched = RowFormat(spec.dtype, tuple(r * d for r, d in shapes.values())).row_bytes
        dense = spec.model_copy(update={"row_rank": 0, "state_budget": 0})
        out[model] = {
            "matrices": len(shapes), "floats": sum(r * d for r, d in shapes.values()), "sketch_width": k,
            "factor_rank": rank, "row_bytes": row_format(shapes, spec).row_bytes,
            "dense_sketch_width": row_layout(shapes, dense)[0], "dense_row_bytes": row_format(shapes, dense).row_bytes,
            "raw_float32_row_bytes": RowFormat("float32", tuple(r * d for r, d in shapes.values())).row_bytes,
            "unsketched_row_bytes": unsketched,
            # P_l (d, k) float32 + the whitening (U (k, k), roots (k,)) float32 + the curvature sums (k, k) float64
            "codec_bytes": sum(4 * d * w * (w < d) + 4 * (w * w + w) for (_, d), (_, w) in
                               zip(shapes.values(), stored.values(), strict=True)),
            "curvature_bytes": sum(8 * w * w for _, w in stored.values()),
            "unsketched_codec_and_curvature_bytes": sum(4 * (d * d + d) + 8 * d * d for _, d in shapes.values())}
    return out


def synthetic_layer_memory(d: int = 4096, r: int = 8, pilot: int = 512, matrices: int = 128, batch: int = 64,
                           seed: int = 0) -> dict:
    """Peak memory of the codec + curvature state of ONE (r, d) LoRA matrix under the width rule's layout, measured
    with synthetic gradients, then scaled by `matrices` (the 8B model has 128; the scaling is stated, not measured).

    What the pipeline holds per matrix: the sketch P (d, k) (`Sketch`), the pilot's sketched curvature sums (k, k)
    float64 (`curvature_partials` of the sketched blocks), the whitening made from them (`Whitening`) and the
    gradient pass's curvature sums (k, k) float64. Measured: the bytes of those tensors, and the CPU peak RSS
    increase while running the pilot and a gradient-pass batch loop (one matrix; the rest of the process excluded)."""
    import resource

    from hyperinf_ops.core.sketch import Sketch, sketch_width
    from hyperinf_ops.settings import DEFAULT_COMPRESSION

    shapes = MODEL_SHAPES["Llama-3-8B"]
    k = sketch_width(shapes, DEFAULT_COMPRESSION)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gen = torch.Generator().manual_seed(seed)
    sketch = Sketch({"m": (r, d)}, CompressionSpec(sketch_dim=k, seed=seed))
    pilot_parts = []
    for start in range(0, pilot, batch):  # the row codec's pilot: sketched blocks, their curvature sums
        g = torch.randn(min(batch, pilot - start), r, d, generator=gen) * torch.linspace(2, 0.01, d)
        pilot_parts.append(curvature_partials(sketch.apply({"m": g})))
    white = Whitening.from_curvature(merge_curvature(pilot_parts), DEFAULT_COMPRESSION.whiten)
    pass_parts = [curvature_partials(sketch.apply({"m": torch.randn(batch, r, d, generator=gen)}))
                  for _ in range(4)]  # the gradient pass: its curvature sums, whitened rows
    curvature = merge_curvature(pass_parts)
    rows = white.apply(sketch.apply({"m": torch.randn(batch, r, d, generator=gen)}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    state = {"sketch_P": sketch.matrix("m").numel() * 4,
             "whitening": white.bases["m"].numel() * 4 + white.roots["m"].numel() * 4,
             "curvature_sums": curvature["m"].gfim_sum.numel() * 8}
    total = sum(state.values())
    del rows
    return {"d": d, "r": r, "k": k, "matrices_scaled_by": matrices, "state_bytes_one_matrix": state,
            "state_bytes_one_matrix_total": total, "state_bytes_scaled": total * matrices,
            # not scaled: dominated by the synthetic (64, r, d) gradient batch and its float64 copy, which the pass
            # holds once per batch for the whole model, not per matrix
            "peak_rss_increase_one_matrix_with_its_batch": peak,
            "unsketched_whitening_and_curvature_scaled": (4 * (d * d + d) + 8 * d * d) * matrices}


# ------------------------------------------------------------------------------------------------- tables


def format_table(result: Mapping) -> str:
    """One row per setting: bytes, ratio, then AUROC (Spearman vs raw) per ranking, and the goal check."""
    names = list(result["settings"][0]["rankings"])  # the rankings measured (--methods)
    head = f"{'setting':<26} {'bytes':>7} {'ratio':>6}  " + "  ".join(f"{SHORT[r]:>13}" for r in names)
    lines = [f"{result['source']}: n={result['n']}, flipped={result['flipped']}, {result['matrices']} matrices "
             f"{result['shapes']}, raw {result['raw_bytes']} bytes; cells: AUROC (Spearman vs raw)", head,
             "-" * len(head)]
    for s in result["settings"]:
        cells = "  ".join(f"{s['rankings'][r]['auroc']:.3f} ({s['rankings'][r]['spearman_vs_raw']:+.2f})"
                          for r in names)
        goal = "  meets goal" if s["meets_goal"] else ""
        lines.append(f"{s['label']:<26} {s['bytes']:>7} {1 / s['ratio']:>5.1f}x  {cells}  "
                     f"max drop {s['max_auroc_drop']:+.3f}{goal}")
    lines += ["", "detection of flips among the 10% / 20% most harmful:",
              f"{'setting':<26} " + "  ".join(f"{SHORT[r]:>11}" for r in names)]
    for s in result["settings"]:
        lines.append(f"{s['label']:<26} " + "  ".join(
            f"{s['rankings'][r]['detection_at_10']:.2f} / {s['rankings'][r]['detection_at_20']:.2f}"
            for r in names))
    return "\n".join(lines)


def aggregate(results: Sequence[Mapping]) -> dict:
    """Per setting group (sketch seeds pooled) over several runs: mean, min and max of every ranking's AUROC,
    of its difference to the same run's raw float32 AUROC, and of its Spearman vs raw; the worst drop."""
    names = list(results[0]["settings"][0]["rankings"])
    groups: dict[str, list[tuple[Mapping, Mapping]]] = {}
    for result in results:
        raw = result["settings"][0]
        for s in result["settings"]:
            groups.setdefault(s["group"], []).append((s, raw))
    out = {}
    for group, pairs in groups.items():
        entry = {"ratio": pairs[0][0]["ratio"], "bytes": pairs[0][0]["bytes"], "runs": len(pairs), "rankings": {}}
        for r in names:
            au = [s["rankings"][r]["auroc"] for s, _ in pairs]
            diff = [s["rankings"][r]["auroc"] - raw["rankings"][r]["auroc"] for s, raw in pairs]
            rho = [s["rankings"][r]["spearman_vs_raw"] for s, _ in pairs]
            entry["rankings"][r] = {
                "auroc_mean": statistics.fmean(au), "auroc_min": min(au), "auroc_max": max(au),
                "auroc_std": statistics.pstdev(au), "diff_mean": statistics.fmean(diff), "diff_min": min(diff),
                "diff_max": max(diff), "spearman_mean": statistics.fmean(rho), "spearman_min": min(rho)}
        entry["worst_drop"] = max(-v["diff_min"] for v in entry["rankings"].values())
        entry["worst_abs_diff"] = max(max(-v["diff_min"], v["diff_max"]) for v in entry["rankings"].values())
        entry["meets_goal"] = bool(entry["ratio"] <= GOAL_RATIO and entry["worst_abs_diff"] <= GOAL_AUROC)
        out[group] = entry
    return out


def format_aggregate(agg: Mapping, sources: Sequence[str]) -> str:
    names = list(next(iter(agg.values()))["rankings"])
    head = f"{'setting':<22} {'ratio':>6} {'runs':>4}  " + "  ".join(f"{SHORT[r]:>19}" for r in names)
    lines = [f"over {len(sources)} runs ({', '.join(sources)}); cells: mean AUROC [min diff to raw, max diff]",
             head, "-" * len(head)]
    for group, e in agg.items():
        cells = "  ".join(f"{v['auroc_mean']:.3f} [{v['diff_min']:+.3f},{v['diff_max']:+.3f}]"
                          for v in e["rankings"].values())
        goal = "  meets goal" if e["meets_goal"] else ""
        lines.append(f"{group:<22} {1 / e['ratio']:>5.1f}x {e['runs']:>4}  {cells}  worst drop "
                     f"{e['worst_drop']:+.3f}{goal}")
    lines += ["", "mean Spearman vs raw (min over runs):", f"{'setting':<22} " + "  ".join(
        f"{SHORT[r]:>13}" for r in names)]
    for group, e in agg.items():
        lines.append(f"{group:<22} " + "  ".join(f"{v['spearman_mean']:+.3f} ({v['spearman_min']:+.2f})"
                                                 for v in e["rankings"].values()))
    return "\n".join(lines)


def markdown_summary(agg: Mapping) -> str:
    """One line per setting group: bytes, how much smaller, the worst |AUROC difference| to raw over every
    ranking and run (and which ranking), hyperinf's difference range and mean Spearman vs raw, the goal."""
    lines = ["| setting | bytes / example | smaller | worst abs. AUROC diff (ranking) | hyperinf AUROC diff "
             "[min, max] | hyperinf Spearman vs raw (min) | goal |", "|---|---|---|---|---|---|---|"]
    for group, e in agg.items():
        worst = max(e["rankings"], key=lambda r: max(-e["rankings"][r]["diff_min"], e["rankings"][r]["diff_max"]))
        w = e["rankings"][worst]
        h = e["rankings"]["hyperinf"]
        lines.append(f"| {group} | {e['bytes']} | {1 / e['ratio']:.1f}x | {max(0.0, e['worst_abs_diff']):.3f} ({worst}"
                     f"{', better' if w['diff_max'] > -w['diff_min'] else ''}) | [{h['diff_min']:+.3f}, "
                     f"{h['diff_max']:+.3f}] | {h['spearman_mean']:.3f} ({h['spearman_min']:.3f}) | "
                     f"{'yes' if e['meets_goal'] else 'no'} |")
    return "\n".join(lines)


def markdown_aggregate(agg: Mapping) -> str:
    """`aggregate` as two Markdown tables (docs/compression.md): AUROC mean [min, max difference to raw] per
    ranking with the worst drop and the goal, then the mean Spearman vs raw (min over runs)."""
    names = list(next(iter(agg.values()))["rankings"])
    head = "| setting | smaller | runs | " + " | ".join(names) + " | worst drop | goal |"
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for group, e in agg.items():
        cells = " | ".join(f"{v['auroc_mean']:.3f} [{v['diff_min']:+.3f}, {v['diff_max']:+.3f}]"
                           for v in e["rankings"].values())
        lines.append(f"| {group} | {1 / e['ratio']:.1f}x | {e['runs']} | {cells} | {e['worst_drop']:+.3f} | "
                     f"{'yes' if e['meets_goal'] else 'no'} |")
    lines += ["", "| setting | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for group, e in agg.items():
        lines.append(f"| {group} | " + " | ".join(f"{v['spearman_mean']:.3f} ({v['spearman_min']:.3f})"
                                                  for v in e["rankings"].values()) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- datasets


def build(kind: str, out: Path, seed: int, n_pool: int, n_target: int, overrides: Mapping | None = None) -> Path:
    """Build the demo (seed) or BBC dataset under `out`, run the whole pipeline on it with raw float32 rows (the
    benchmark's reference; every setting is derived from them); returns the store root."""
    import dagster as dg

    from hyperinf_ops.config import load_config
    from hyperinf_ops.data.bbc import build_bbc_dataset, write_bbc_config
    from hyperinf_ops.data.demo import build_demo_dataset, write_demo_config
    from pipelines.runner import materialize_all

    overrides = {"train": {"seed": seed}, "compression": RAW_ROWS, **(overrides or {})}
    if kind == "smollm2":  # bench_scale's causal run (q/v r=8, 1 epoch), target = held-out "ai" pairs (set `ai`)
        import yaml
        from bench_scale import CAUSAL_CONFIG

        from hyperinf_ops.data.chatterbot import build_chatterbot_dataset

        paths = build_chatterbot_dataset(out, n_pool=n_pool, n_target=n_target, n_shards=2)
        config_path = out / "hyperinf.yaml"
        config_path.write_text(yaml.safe_dump({
            **CAUSAL_CONFIG, **overrides, "storage_root": "store", "signals": {"checkpoints": False},
            "data": {"path": "pool", "label_column": "label"}, "targets": {"ai": {"path": f"targets/{paths.target.name}"}}}))
    elif kind == "llm":  # the LLM demo's pool (2,038 pairs, 4 sources; target: bbc_news), only what the rows need
        from hyperinf_ops.data.instructions import build_instruction_mix, write_llm_config

        paths = build_instruction_mix(out, seed=seed, n_target=n_target)
        config_path = write_llm_config(paths, overrides={
            **overrides, "estimators": ["hyperinf", "tracin"],
            "signals": {"similarity": False, "unit": False, "cover": False, "checkpoints": False}})
    elif kind == "demo":
        paths = build_demo_dataset(out, n_pool=n_pool, n_target=n_target, seed=seed)
        config_path = write_demo_config(paths, overrides=overrides)
    else:
        paths = build_bbc_dataset(out, n_target=n_target, seed=seed)
        config_path = write_bbc_config(paths, overrides=overrides)
    cfg = load_config(config_path)
    start = time.perf_counter()
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_all(instance, config_path, cfg)
    print(f"pipeline on {paths.n_pool} pool / {paths.n_target} target examples: {time.perf_counter() - start:.0f} s")
    return Path(cfg.storage_root)


# ------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    global PILOT_FRACTION  # --pilot-fraction sets the pilot sample's share for every setting
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="synthetic low-rank gradients (seconds)")
    parser.add_argument("--store", help="storage root of a finished pipeline run with raw rows")
    parser.add_argument("--target-set", default="clean_val")
    parser.add_argument("--build", choices=("demo", "bbc", "smollm2", "llm"),
                        help="build this dataset under --out and run the pipeline (smollm2: --n-pool chatterbot pairs)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="--build: dataset and warm-up seed")
    parser.add_argument("--n-pool", type=int, default=4000, help="--build demo")
    parser.add_argument("--n-target", type=int, default=None, help="--build (default demo 500, bbc 300)")
    parser.add_argument("--train", type=json.loads, default=None, help='--build: train overrides, e.g. \'{"lr": 3e-3}\'')
    parser.add_argument("--build-only", action="store_true", help="--build: run the pipeline, not the benchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --quick)")
    parser.add_argument("--aggregate", nargs="+", type=Path, help="JSON results of several runs")
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--no-extras", action="store_true", help="only raw, fp16 and the random sketches")
    parser.add_argument("--layouts", action="store_true",
                        help="issue 20's candidate layouts at --ks (layout_settings) instead of issue 8's settings")
    parser.add_argument("--widths", action="store_true",
                        help="issue 20: the width rule's bytes per example and the 8B codec + curvature memory")
    parser.add_argument("--pilot-fraction", type=float, default=PILOT_FRACTION,
                        help="share of the pool in the pilot (the pipeline: 512 examples or the whole pool)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="influence rankings to measure (hyperinf and tracin always: self-influence needs them)")
    parser.add_argument("--kinds", nargs="+", choices=("raw", "sketch", "orth", "eigen", "white", "swhite", "hybrid",
                                                       "wjl", "krylov"),
                        help="only these kinds of settings (raw float32, the reference, is always run)")
    parser.add_argument("--lissa-iterations", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--spectrum", action="store_true",
                        help="only the GFIM spectrum / score-truncation analysis of --store (or --quick)")
    parser.add_argument("--markdown", action="store_true", help="--aggregate: also print Markdown tables")
    parser.add_argument("--row-dtypes", nargs="+", default=["int4", "float32"],
                        choices=("float32", "float16", "int8", "int4", "int3", "int2", "lloyd2", "sign1"),
                        help="--layouts: the row dtypes of the sketch whitened in sketch space (lloyd2 / sign1: "
                             "2 / 1 bits an entry, measured here only)")
    parser.add_argument("--row-ranks", nargs="+", type=int, default=[],
                        help="--layouts: also store the sketch whitened in sketch space as factor rows of these "
                             "ranks (a --ks of 0: unsketched)")
    parser.add_argument("--pilot-curvature", type=float, nargs="+", metavar="FRACTION",
                        help="only: hyperinf over raw rows with a pilot sample's curvature (these shares of the pool)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.threads or args.quick:
        # One thread: on a loaded machine torch's intra-op threads fight over the cores (measured: LiSSA's
        # small matmuls 10x slower with 2 threads under load 8).
        torch.set_num_threads(args.threads or 1)

    PILOT_FRACTION = args.pilot_fraction
    if args.widths:
        out = {"widths": widths_report(), "memory_8b": synthetic_layer_memory(matrices=128)}
        print(json.dumps(out, indent=1))
    elif args.aggregate:
        results = [json.loads(p.read_text()) for p in args.aggregate]
        out = {"sources": [r["source"] for r in results], "groups": aggregate(results)}
        print(format_aggregate(out["groups"], [p.stem for p in args.aggregate]))
        if args.markdown:
            print("\n" + markdown_summary(out["groups"]) + "\n\n" + markdown_aggregate(out["groups"]))
    else:
        if args.build:
            if args.out is None:
                parser.error("--build needs --out")
            n_target = args.n_target or {"demo": 500, "bbc": 300, "smollm2": 20, "llm": 50}[args.build]
            overrides = {"train": {"seed": args.seed, **args.train}} if args.train else None
            args.store = str(build(args.build, args.out, args.seed, args.n_pool, n_target, overrides))
            if args.build_only:
                return {"store": args.store}
        if args.quick:
            pool = synthetic_pool()
        elif args.store:
            start = time.perf_counter()
            pool = load_store(args.store, args.target_set)
            print(f"loaded {len(pool.flipped)} rows from {args.store} in {time.perf_counter() - start:.1f} s")
        else:
            parser.error("give --quick, --store, --build or --aggregate")
        if args.pilot_curvature or args.spectrum:
            out = pilot_curvature_agreement(pool, args.pilot_curvature) if args.pilot_curvature else \
                spectrum(pool, args.ks)
            print(json.dumps(out, indent=1))
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(out, indent=1))
            return out
        start = time.perf_counter()
        settings = layout_settings(args.ks, swhite_dtypes=args.row_dtypes, ranks=args.row_ranks) if args.layouts else \
            default_settings(args.ks, extras=not args.no_extras)
        if args.kinds:
            settings = [settings[0]] + [x for x in settings[1:] if x.kind in args.kinds]
        methods = [m for m in METHODS if m in {*args.methods, "hyperinf", "tracin"}]
        out = evaluate(pool, settings, lissa_iterations=args.lissa_iterations, methods=methods)
        out["pilot_fraction"] = PILOT_FRACTION
        out["seconds"] = time.perf_counter() - start
        print(format_table(out))
        print(f"benchmark: {out['seconds']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
