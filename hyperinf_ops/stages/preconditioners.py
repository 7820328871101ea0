"""Stage: the merged curvature and its prepared preconditioners, stored as artifacts.

The GFIM of every LoRA matrix is the exact merge of the shards' partial sums; each method's preconditioner is
prepared from it once (`preconditioners.prepare`: one batched Schulz solve for hyperinf, one batched Cholesky
for exact) and stored in the `preconditioners` table under a key of (fingerprint, curvature identity, solver
options). Target queries, self-influence, DataInf's damping and the agreement check read the stored artifact;
nothing downstream solves again, and a refresh whose curvature and options did not change solves nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from hyperinf_ops.core.curvature import CurvaturePartial
from hyperinf_ops.errors import DataError
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.memory import release_memory
from hyperinf_ops.preconditioners import (
    Prepared,
    options_key,
    prepare,
    prepared_from_table,
    prepared_to_table,
)
from hyperinf_ops.progress import ProgressMeter
from hyperinf_ops.settings import EstimatorOptions, GradientSettings
from hyperinf_ops.stages.codec import row_fingerprint
from hyperinf_ops.stages.common import Log, Summary, require_table
from hyperinf_ops.store import LanceStore

__all__ = ["ALWAYS_PREPARED", "PreconditionerSummary", "checked_fingerprint", "curvature_identity",
           "load_preconditioner", "prepare_preconditioners"]

# Prepared whatever the configured estimators: self-influence reads hyperinf's inverse (and tracin's identity),
# the agreement check exact's.
ALWAYS_PREPARED = ("hyperinf", "exact", "tracin")


@dataclass
class PreconditionerSummary(Summary):
    shards: list[str]
    examples: int
    matrices: int
    prepared: list[str]  # methods solved in this step
    reused: list[str]  # methods whose stored artifact already fitted
    all_converged: bool
    max_residual: float
    max_condition_estimate: float
    diagnostics: dict[str, dict[str, Any]]  # hyperinf, per matrix: damping, iterations, residual, converged, ...
    curvature: str  # curvature_identity
    data_version: str  # over every method's artifact key
    preconditioners_version: int
    seconds: float


def checked_fingerprint(store: LanceStore, settings: GradientSettings) -> Fingerprint:
    """The current adapter's fingerprint, after checking that every gradient / curvature row has it and that
    they cover every shard of the pool consistently (DataError naming the shards otherwise)."""
    fp = row_fingerprint(store, settings)
    for table in ("gradients", "curvature"):
        require_table(store, table, "compute the gradient shards first")
        store.check_fingerprint(table, fp)
    pool = set(pc.unique(store.open("examples").to_table(columns=["shard"])["shard"]).to_pylist())
    grads = store.open("gradients").to_table(columns=["shard"])["shard"].to_pandas().value_counts()
    curv = store.open("curvature").to_table(columns=["shard", "count"]).to_pandas().groupby("shard")["count"]
    missing, stale = sorted(pool - set(grads.index)), sorted(set(grads.index) - pool)
    if missing or stale:
        raise DataError(f"gradient rows do not match the pool's shards: missing {missing}, not in the pool {stale}; "
                        "compute (or remove) those shards")
    uneven = sorted(s for s in grads.index if s not in curv.groups or set(curv.get_group(s)) != {grads[s]})
    if uneven:
        raise DataError(f"curvature sums and gradient rows disagree for shards {uneven}: recompute them")
    return fp


def curvature_identity(store: LanceStore, fingerprint: Fingerprint) -> str:
    """What the merged curvature is a function of: the fingerprint and every shard's examples digest and count."""
    rows = store.open("curvature").to_table(columns=["shard", "examples_digest", "count"]).to_pylist()
    parts = sorted({(r["shard"], r["examples_digest"], r["count"]) for r in rows})
    return hashlib.sha256(f"{fingerprint.digest()}|{parts}".encode()).hexdigest()[:32]


def _artifact_key(curvature: str, options: EstimatorOptions) -> str:
    return f"{curvature}-{options_key(options)}"


def load_preconditioner(store: LanceStore, fingerprint: Fingerprint, options: EstimatorOptions) -> Prepared:
    """The stored preconditioner of `options` for the current curvature (DataError if it was not prepared)."""
    rows = store.read_preconditioner(_artifact_key(curvature_identity(store, fingerprint), options))
    if rows is None:
        raise DataError(f"no prepared {options.method} preconditioner for the current curvature: materialize "
                        "preconditioners first")
    return prepared_from_table(rows)


def prepare_preconditioners(store: LanceStore, settings: GradientSettings, methods: Sequence[EstimatorOptions],
                            *, log: Log = print) -> PreconditionerSummary:
    """Prepare (or find stored) the preconditioner of every method in `methods` and of ALWAYS_PREPARED."""
    start = time.perf_counter()
    fp = checked_fingerprint(store, settings)
    identity = curvature_identity(store, fp)
    wanted = {o.method: o for o in methods}
    base = next(iter(methods))
    for method in ALWAYS_PREPARED:
        wanted.setdefault(method, base.model_copy(update={"method": method}))
    curvature: dict[str, CurvaturePartial] | None = None
    hyperinf: Prepared | None = None  # its diagnostics, for the summary (operators dropped once stored)
    keys = {method: _artifact_key(identity, options) for method, options in sorted(wanted.items())}
    reused = [method for method, key in keys.items() if store.read_preconditioner(key) is not None]
    prepared = []
    meter = ProgressMeter("inverses", len(keys) - len(reused), lambda e: log(str(e)), unit="methods", every=1)
    for method, options in sorted(wanted.items()):
        key = keys[method]
        if method in reused:
            continue
        curvature = curvature or store.read_curvature(fp)
        made = prepare(curvature, options)
        store.write_preconditioner(prepared_to_table(made, key), fp)
        if method == "hyperinf":
            hyperinf = dataclasses.replace(made, operators=dict.fromkeys(made.operators))
        prepared.append(method)
        meter.update(1)
        del made
        release_memory()  # a method's stacks and its stored copy are freed: return their pages (memory.py)
    del curvature
    release_memory()
    hyperinf = hyperinf or load_preconditioner(store, fp, wanted["hyperinf"])
    diagnostics = {name: d.to_dict() for name, d in hyperinf.diagnostics.items()}
    residuals = [d["residual"] for d in diagnostics.values() if not math.isnan(d["residual"])]
    conditions = [d["condition_estimate"] for d in diagnostics.values() if not math.isnan(d["condition_estimate"])]
    counts = store.open("curvature").to_table(columns=["shard", "count", "matrix"]).to_pandas()
    summary = PreconditionerSummary(
        shards=sorted(counts["shard"].unique()), examples=int(counts.groupby("shard")["count"].first().sum()),
        matrices=len(hyperinf.shapes), prepared=prepared, reused=reused, all_converged=hyperinf.converged,
        max_residual=max(residuals, default=math.nan), max_condition_estimate=max(conditions, default=math.nan),
        diagnostics=diagnostics, curvature=identity,
        data_version=hashlib.sha256("|".join(sorted(keys.values())).encode()).hexdigest()[:32],
        preconditioners_version=store.open("preconditioners").version, seconds=time.perf_counter() - start)
    log(f"curvature of {summary.examples} examples over {len(summary.shards)} shards, {summary.matrices} matrices; "
        f"prepared {prepared or 'nothing'}, reused {reused or 'nothing'}; Schulz max residual "
        f"{summary.max_residual:.2e}, max condition estimate {summary.max_condition_estimate:.3g}, "
        f"converged {summary.all_converged}")
    return summary
