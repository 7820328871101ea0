"""Stage: per-example LoRA gradients of one shard -> rows in `gradients` + curvature sums in `curvature`.

One forward/backward per batch gives the raw gradients, sketched right away when rows are compressed
(sketch.py): the blocks. The curvature partial sums come from the exact blocks; the stored rows are the blocks
(whitened first when the rows are: stages/codec.py) in the fingerprint's row format, and each table's shard is
replaced in one commit. The same forward
gives each example's loss, margin and class probabilities, stored beside its row in `example_outputs` (one
commit after the rows'; a shard is current only when both match, freshness.py). Examples
with a non-finite gradient are left out of all three and counted. The rows are taken under the current adapter;
rows of any other fingerprint are stale and are removed in the same commits. A shard that is already
current (freshness.py) is not recomputed unless `force`.

Incremental by content: a stored row is kept while its (sample_id, content_hash) pair is still the shard's and it
carries the current fingerprint; only new and edited examples get a gradient pass. The shard's curvature sums
stay exact without summing the kept rows again: the new rows' sums are added and the sums of the rows that leave
(deleted examples, the old content of edited ones) subtracted, float64 both. Their gradients are taken again
from their old content, which `examples` still holds in its earlier Lance versions (ingest replaced it). The
shard is recomputed whole instead when that is no more work (as many rows leave as stay), when the stored sums
are not provably those of the stored rows (`rows_digest`), or when the old content is gone from every version.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from hyperinf_ops.adapters import AdapterStore
from hyperinf_ops.core.curvature import CurvaturePartial, curvature_partials, merge_curvature
from hyperinf_ops.core.gradients import lora_matrix_shapes
from hyperinf_ops.core.sketch import Sketch
from hyperinf_ops.data.prepare import content_digest, record_columns
from hyperinf_ops.errors import DataError, FingerprintMismatchError, GradientMismatchError
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.memory import release_memory
from hyperinf_ops.settings import GradientSettings, ModelSpec
from hyperinf_ops.signals.outputs import ExampleOutputs
from hyperinf_ops.stages.codec import current_whitening, row_fingerprint
from hyperinf_ops.stages.common import Log, Summary, require_table, shard_filter
from hyperinf_ops.stages.freshness import (
    gradient_shard_current,
    gradient_version,
    row_layout_problem,
    rows_digest,
)
from hyperinf_ops.stages.loading import finite_rows, gradient_batches, load_current_model
from hyperinf_ops.store import GradientBatch, LanceStore, example_outputs_schema, sql_literal

__all__ = ["GradientSummary", "compute_gradient_shard"]

Pair = tuple[str, str]  # (sample_id, content_hash): what a gradient row was computed from
_IN_LIST = 256  # content hashes per Lance filter when looking up old content


@dataclass
class GradientSummary(Summary):
    shard: str
    computed: bool  # False: the shard's rows were already current
    rows: int
    kept: int  # rows carried over unchanged (same example content, same fingerprint)
    recomputed: int  # examples given a gradient pass for their row (new, edited, or all on a whole pass)
    subtracted: int  # examples whose old content was passed to take its sums out of the curvature
    nonfinite_rows: int
    nonfinite_ids: list[str]
    mean_loss: float | None  # over the shard's rows (None when the shard was current)
    fingerprint: str
    data_version: str  # freshness.gradient_version
    gradients_version: int
    curvature_version: int
    seconds: float
    examples_per_s: float


@dataclass
class _Base:
    """A shard's stored state an incremental pass starts from: the pairs of its rows at `version` of `gradients`,
    and the curvature sums over exactly those rows (name -> partial)."""

    pairs: set[Pair]
    curvature: dict[str, CurvaturePartial]
    version: int


def compute_gradient_shard(store: LanceStore, shard: str, spec: ModelSpec, settings: GradientSettings, *,
                           force: bool = False, log: Log = print) -> GradientSummary:
    """Gradient rows and curvature sums of one shard under the current adapter (see the module docstring);
    `force`: recompute the whole shard."""
    start = time.perf_counter()
    manifest = AdapterStore(store.root).require_current()
    fp = row_fingerprint(store, settings)
    problem = row_layout_problem(store)
    if problem:
        raise DataError(problem)
    table = require_table(store, "examples", "ingest the pool first").to_table(
        columns=[*record_columns(spec.task), "content_hash"], filter=shard_filter(shard))
    if table.num_rows == 0:
        raise DataError(f"shard {shard!r} has no examples: ingest it first")
    hashes = table["content_hash"].to_pylist()
    digest = content_digest(table["sample_id"].to_pylist(), hashes)
    if not force and gradient_shard_current(store, shard, fp):
        rows = store.open("gradients").count_rows(shard_filter(shard))
        log(f"gradients of shard {shard} are current (fingerprint {fp.digest()}): skipped")
        return GradientSummary(shard=shard, computed=False, rows=rows, kept=rows, recomputed=0, subtracted=0,
                               nonfinite_rows=table.num_rows - rows, nonfinite_ids=[], mean_loss=None,
                               fingerprint=fp.digest(),
                               data_version=gradient_version(fp, digest),
                               gradients_version=store.open("gradients").version,
                               curvature_version=store.open("curvature").version,
                               seconds=time.perf_counter() - start, examples_per_s=math.nan)
    records = [{**r, "content_hash": h} for r, h in zip(table.drop_columns(["content_hash"]).to_pylist(), hashes,
                                                         strict=True)]
    base = None if force else _stored_base(store, shard, fp)
    keep = base.pairs & {_pair(r) for r in records} if base else set()
    leaving = sorted(base.pairs - keep) if base else []
    # Updating passes the examples that leave and the new ones; recomputing, the kept ones and the new ones.
    old = _old_records(store, leaving, spec.task) if base and len(leaving) < len(keep) else None
    pass_start = time.perf_counter()
    loaded = sketch = whitening = None
    if old is None or old or len(keep) < len(records):  # a pass of some kind (else only the sums' digest changed)
        loaded, _ = load_current_model(store.root, spec)
        shapes = lora_matrix_shapes(loaded.model, settings.modules)
        if shapes != manifest.selected_shapes(settings.modules):
            raise GradientMismatchError(f"the loaded model's LoRA matrices {shapes} differ from the adapter manifest's")
        sketch = Sketch(shapes, settings.compression, device=loaded.device)
        whitening = current_whitening(store, settings)
    curvature = dict(base.curvature) if base else {}
    if old:
        removed = _removed_curvature(loaded, sketch, old, settings, spec.max_length, shard, log)
        curvature = {name: part.subtract(removed[name]) for name, part in curvature.items()} if removed else {}
        old = old if removed else None
    if base and old is None:
        log(f"shard {shard}: {len(keep)} rows unchanged, {len(leaving)} leave: recomputing the whole shard")
    if old is None:  # no usable stored state, or updating is no less work than recomputing
        base, keep, old, curvature = None, set(), [], {}
    todo = [r for r in records if _pair(r) not in keep]
    bad_ids: list[str] = []
    written: list[Pair] = sorted(keep)
    outputs: list[pa.RecordBatch] = []

    def rows() -> Iterator[GradientBatch]:
        # Consumed by the store while it streams the shard into Lance: memory stays one batch deep.
        if not todo:
            return
        for ids, content, blocks, said in _finite_blocks(loaded, sketch, todo, settings, spec.max_length, bad_ids,
                                                         phase=f"gradients of shard {shard}", log=log):
            for name, part in curvature_partials(blocks).items():
                curvature[name] = part if name not in curvature else curvature[name].merge(part)
            written.extend(zip(ids, content, strict=True))
            outputs.append(_output_rows(ids, content, said, shard, fp))
            stored = whitening.apply(blocks) if whitening is not None else blocks
            yield GradientBatch(ids, sketch.flatten(stored), sketch.sq_norms(blocks), content_hashes=content)

    kept = _kept_rows(store, shard, keep, base.version) if base else ()
    grad_version = store.write_gradients(shard, rows(), fp, overwrite=True, kept=kept)  # no rows at all: DataError
    kept_outputs = _kept_outputs(store, shard, keep, fp) if keep else []
    store.write_example_outputs(shard, [*kept_outputs, *outputs], fp)
    curv_version = store.write_curvature(shard, curvature, fp, examples_digest=digest,
                                         rows_digest=content_digest([i for i, _ in written], [h for _, h in written]),
                                         overwrite=True)
    release_memory()  # the pass's freed batches stay in glibc's heaps otherwise, under every later stage
    pass_seconds = time.perf_counter() - pass_start
    if bad_ids:
        log(f"shard {shard}: {len(bad_ids)} examples with non-finite gradients left out: {bad_ids[:5]}")
    log(f"gradients of shard {shard}: {len(written)} rows ({len(todo)} computed, {len(keep)} kept, {len(old)} old "
        f"examples taken out of the curvature), gradients v{grad_version}, curvature v{curv_version}")
    passed = len(todo) + len(old)
    losses = [b.column("loss") for b in [*kept_outputs, *outputs]]
    mean_loss = float(pa.concat_arrays(losses).to_numpy().mean()) if losses else None
    return GradientSummary(shard=shard, computed=True, rows=len(written), kept=len(keep), recomputed=len(todo),
                           subtracted=len(old), nonfinite_rows=len(bad_ids), nonfinite_ids=bad_ids[:20],
                           mean_loss=mean_loss,
                           fingerprint=fp.digest(), data_version=gradient_version(fp, digest),
                           gradients_version=grad_version, curvature_version=curv_version,
                           seconds=time.perf_counter() - start,
                           examples_per_s=passed / pass_seconds if passed else math.nan)


def _pair(record: dict[str, Any]) -> Pair:
    return str(record["sample_id"]), str(record["content_hash"])


def _stored_base(store: LanceStore, shard: str, fp: Fingerprint) -> _Base | None:
    """The shard's stored rows and sums when every row carries `fp` and a content hash and the sums were taken
    over exactly those rows (a crash between the two commits leaves them apart); None otherwise."""
    if not (store.exists("gradients") and store.exists("curvature")):
        return None
    ds = store.open("gradients")
    rows = ds.to_table(columns=["sample_id", "content_hash", "fingerprint"], filter=shard_filter(shard))
    sums = store.open("curvature").to_table(columns=["rows_digest", "fingerprint"], filter=shard_filter(shard))
    if rows.num_rows == 0 or sums.num_rows == 0 or rows["content_hash"].null_count:
        return None
    if not (set(rows["fingerprint"].to_pylist()) == set(sums["fingerprint"].to_pylist()) == {fp.digest()}
            and set(sums["rows_digest"].to_pylist()) == {rows_digest(rows)}):
        return None
    pairs = set(zip(rows["sample_id"].to_pylist(), rows["content_hash"].to_pylist(), strict=True))
    if _stored_output_pairs(store, shard, fp) != pairs:  # rows kept must bring their outputs along
        return None
    try:
        curvature = store.read_curvature(fp, shard=shard)
    except FingerprintMismatchError:  # other shards still hold rows of an earlier adapter: none is reused yet
        return None
    return _Base(pairs, curvature, ds.version)


def _old_records(store: LanceStore, pairs: Sequence[Pair], task: str) -> list[dict[str, Any]] | None:
    """The records (sample_id, text columns, label) of rows that leave the shard, their content looked up by
    content hash in the newest version of `examples` that holds it (Lance keeps earlier versions until they are
    cleaned up); None when some content is in no version left. The content hash covers every column a gradient
    depends on, so whichever row holds it gives the same gradient."""
    columns = [c for c in record_columns(task) if c != "sample_id"]
    found: dict[str, dict[str, Any]] = {}
    needed = {h for _, h in pairs}
    versions = sorted((v["version"] for v in store.open("examples").versions()), reverse=True)
    for version in versions:
        missing = sorted(needed - set(found))
        if not missing:
            break
        ds = store.open("examples", version)
        for i in range(0, len(missing), _IN_LIST):
            chunk = ", ".join(sql_literal(h) for h in missing[i:i + _IN_LIST])
            for row in ds.to_table(columns=[*columns, "content_hash"], filter=f"content_hash IN ({chunk})").to_pylist():
                found.setdefault(row.pop("content_hash"), row)
    if needed - set(found):
        return None
    return [{"sample_id": sid, **found[h], "content_hash": h} for sid, h in pairs]


def _finite_blocks(loaded: Any, sketch: Sketch, records: Sequence[dict[str, Any]], settings: GradientSettings,
                   max_length: int, bad_ids: list[str], *, phase: str, log: Log
                   ) -> Iterator[tuple[list[str], list[str], dict[str, Any], ExampleOutputs]]:
    """(sample_ids, content hashes, blocks name -> (b, r, k), their forward's outputs) of the records with a
    finite gradient, batch by batch; the ids of the others are appended to `bad_ids`."""
    content = {str(r["sample_id"]): str(r["content_hash"]) for r in records}
    for ids, grads, said in gradient_batches(loaded, records, settings, max_length, phase=phase, log=log):
        finite = finite_rows(grads)
        keep = finite.tolist()
        bad_ids.extend(i for i, ok in zip(ids, keep, strict=True) if not ok)
        if any(keep):
            kept = [i for i, ok in zip(ids, keep, strict=True) if ok]
            yield (kept, [content[i] for i in kept], sketch.apply({name: g[keep] for name, g in grads.items()}),
                   said.select(finite))


def _output_rows(ids: Sequence[str], content: Sequence[str], said: ExampleOutputs, shard: str,
                 fp: Fingerprint) -> pa.RecordBatch:
    """One `example_outputs` batch: the examples' loss, margin and class probabilities (null without classes)."""
    n = len(ids)
    margins, probs = said.margins, said.probabilities
    return pa.record_batch([
        pa.array(list(ids), pa.string()), pa.repeat(pa.scalar(shard, pa.string()), n),
        pa.array(list(content), pa.string()), pa.array(said.losses.numpy(), pa.float64()),
        pa.array(margins.numpy(), pa.float64()) if margins is not None else pa.nulls(n, pa.float64()),
        pa.array(list(probs.float().numpy()), pa.list_(pa.float32())) if probs is not None
        else pa.nulls(n, pa.list_(pa.float32())),
        pa.repeat(pa.scalar(fp.digest(), pa.string()), n),
    ], schema=example_outputs_schema())


def _stored_output_pairs(store: LanceStore, shard: str, fp: Fingerprint) -> set[Pair] | None:
    """The (sample_id, content_hash) pairs of the shard's stored example outputs when all carry `fp`."""
    if not store.exists("example_outputs"):
        return None
    rows = store.open("example_outputs").to_table(columns=["sample_id", "content_hash", "fingerprint"],
                                                  filter=shard_filter(shard))
    if set(rows["fingerprint"].to_pylist()) - {fp.digest()}:
        return None
    return set(zip(rows["sample_id"].to_pylist(), rows["content_hash"].to_pylist(), strict=True))


def _kept_outputs(store: LanceStore, shard: str, keep: Collection[Pair], fp: Fingerprint) -> list[pa.RecordBatch]:
    """The shard's stored example outputs of the kept pairs (they carry `fp`: `_stored_base` checked)."""
    out = []
    for batch in store.open("example_outputs").to_batches(filter=shard_filter(shard)):
        mask = [(i, h) in keep for i, h in zip(batch["sample_id"].to_pylist(), batch["content_hash"].to_pylist(),
                                               strict=True)]
        if any(mask):
            out.append(batch.filter(pa.array(mask)))
    return out


def _removed_curvature(loaded: Any, sketch: Sketch, old: Sequence[dict[str, Any]], settings: GradientSettings,
                       max_length: int, shard: str, log: Log) -> dict[str, CurvaturePartial] | None:
    """The curvature sums of the rows that leave the shard, from their old content (name -> partial); None when
    some no longer gives a finite gradient (it was summed as finite: taking the rest out would be wrong)."""
    bad: list[str] = []
    parts = [curvature_partials(blocks) for _, _, blocks, _ in _finite_blocks(
        loaded, sketch, old, settings, max_length, bad, phase=f"old content leaving shard {shard}", log=log)]
    return None if bad or not parts else merge_curvature(parts)


def _kept_rows(store: LanceStore, shard: str, keep: Collection[Pair], version: int) -> Iterator[pa.RecordBatch]:
    """The shard's stored rows whose pair is in `keep`, as stored, from `version` of `gradients`."""
    for batch in store.open("gradients", version).to_batches(filter=shard_filter(shard)):
        mask = [(i, h) in keep for i, h in zip(batch["sample_id"].to_pylist(), batch["content_hash"].to_pylist(),
                                               strict=True)]
        if any(mask):
            yield batch.filter(pa.array(mask))
