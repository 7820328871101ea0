"""Stage: per-example LoRA gradients of one shard -> rows in `gradients` + curvature sums in `curvature`.

One forward/backward per batch gives the raw gradients, sketched right away when rows are compressed
(sketch.py): the blocks. The curvature partial sums come from the exact blocks; the stored rows are the blocks
(whitened first when the rows are: stages/codec.py) in the fingerprint's row format, and each table's shard is
replaced in one commit. Examples
with a non-finite gradient are left out of both and counted. The rows are taken under the current adapter;
rows of any other fingerprint are stale and are removed in the same commits. A shard that is already
current (freshness.py) is not recomputed unless `force`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

from hyperinf_ops.adapters import AdapterStore
from hyperinf_ops.curvature import CurvaturePartial, curvature_partials
from hyperinf_ops.data.prepare import content_digest, record_columns
from hyperinf_ops.errors import DataError, GradientMismatchError
from hyperinf_ops.gradients import lora_matrix_shapes
from hyperinf_ops.memory import release_memory
from hyperinf_ops.settings import GradientSettings, ModelSpec
from hyperinf_ops.sketch import Sketch
from hyperinf_ops.stages.codec import current_whitening, row_fingerprint
from hyperinf_ops.stages.common import Log, Summary, require_table, shard_filter
from hyperinf_ops.stages.freshness import gradient_shard_current, gradient_version
from hyperinf_ops.stages.loading import finite_rows, gradient_batches, load_current_model
from hyperinf_ops.store import GradientBatch, LanceStore

__all__ = ["GradientSummary", "compute_gradient_shard"]


@dataclass
class GradientSummary(Summary):
    shard: str
    computed: bool  # False: the shard's rows were already current
    rows: int
    nonfinite_rows: int
    nonfinite_ids: list[str]
    fingerprint: str
    data_version: str  # freshness.gradient_version
    gradients_version: int
    curvature_version: int
    seconds: float
    examples_per_s: float


def compute_gradient_shard(store: LanceStore, shard: str, spec: ModelSpec, settings: GradientSettings, *,
                           force: bool = False, log: Log = print) -> GradientSummary:
    """Gradient rows and curvature sums of one shard under the current adapter (see the module docstring)."""
    start = time.perf_counter()
    manifest = AdapterStore(store.root).require_current()
    fp = row_fingerprint(store, settings)
    table = require_table(store, "examples", "ingest the pool first").to_table(
        columns=[*record_columns(spec.task), "content_hash"], filter=shard_filter(shard))
    if table.num_rows == 0:
        raise DataError(f"shard {shard!r} has no examples: ingest it first")
    digest = content_digest(table["sample_id"].to_pylist(), table["content_hash"].to_pylist())
    if not force and gradient_shard_current(store, shard, fp):
        rows = store.open("gradients").count_rows(shard_filter(shard))
        log(f"gradients of shard {shard} are current (fingerprint {fp.digest()}): skipped")
        return GradientSummary(shard=shard, computed=False, rows=rows, nonfinite_rows=table.num_rows - rows,
                               nonfinite_ids=[], fingerprint=fp.digest(), data_version=gradient_version(fp, digest),
                               gradients_version=store.open("gradients").version,
                               curvature_version=store.open("curvature").version,
                               seconds=time.perf_counter() - start, examples_per_s=math.nan)
    records = table.drop_columns(["content_hash"]).to_pylist()
    loaded, _ = load_current_model(store.root, spec)
    shapes = lora_matrix_shapes(loaded.model, settings.modules)
    if shapes != manifest.selected_shapes(settings.modules):
        raise GradientMismatchError(f"the loaded model's LoRA matrices {shapes} differ from the adapter manifest's")
    sketch = Sketch(shapes, settings.compression, device=loaded.device)
    whitening = current_whitening(store, settings)
    curvature: dict[str, CurvaturePartial] = {}
    bad_ids: list[str] = []

    def rows() -> Iterator[GradientBatch]:
        # Consumed by the store while it streams the shard into Lance: memory stays one batch deep.
        for ids, grads in gradient_batches(loaded, records, settings, spec.max_length,
                                           phase=f"gradients of shard {shard}", log=log):
            keep = finite_rows(grads)
            bad_ids.extend(i for i, ok in zip(ids, keep.tolist(), strict=True) if not ok)
            if bool(keep.any()):
                blocks = sketch.apply({name: g[keep] for name, g in grads.items()})
                for name, part in curvature_partials(blocks).items():
                    curvature[name] = part if name not in curvature else curvature[name].merge(part)
                kept = [i for i, ok in zip(ids, keep.tolist(), strict=True) if ok]
                stored = whitening.apply(blocks) if whitening is not None else blocks
                yield GradientBatch(kept, sketch.flatten(stored), sketch.sq_norms(blocks))

    pass_start = time.perf_counter()
    grad_version = store.write_gradients(shard, rows(), fp, overwrite=True)  # no rows at all: DataError
    curv_version = store.write_curvature(shard, curvature, fp, examples_digest=digest, overwrite=True)
    release_memory()  # the pass's freed batches stay in glibc's heaps otherwise, under every later stage
    pass_seconds = time.perf_counter() - pass_start
    if bad_ids:
        log(f"shard {shard}: {len(bad_ids)} examples with non-finite gradients left out: {bad_ids[:5]}")
    log(f"gradients of shard {shard}: {len(records) - len(bad_ids)} rows x {sketch.width} floats, "
        f"gradients v{grad_version}, curvature v{curv_version}")
    return GradientSummary(shard=shard, computed=True, rows=len(records) - len(bad_ids), nonfinite_rows=len(bad_ids),
                           nonfinite_ids=bad_ids[:20], fingerprint=fp.digest(), data_version=gradient_version(fp, digest),
                           gradients_version=grad_version, curvature_version=curv_version,
                           seconds=time.perf_counter() - start, examples_per_s=len(records) / pass_seconds)
