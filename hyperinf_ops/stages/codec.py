"""Stage: the row codec, i.e. the whitening the gradient rows are stored under (whitening.py), and the rows'
fingerprint.

Only with `compression.whiten > 0`. The whitening is taken once per key (adapter, LoRA matrix selection, sketch,
whitening power, pilot size, seed): a seeded sample of `pilot_examples` pool examples (drawn from the sorted
sample ids, so the shard order does not matter) goes through the gradient pass, nothing stored but the GFIM of
its blocks, which gives the whitening. It is saved as `<storage_root>/row_codecs/<key>.safetensors` with a JSON
manifest next to it (digest, power, pilot size, adapter). Every gradient row is stored under it and its digest is
part of the rows' fingerprint, so later shards reuse it (a new pilot would make every stored row stale); a new
adapter or other compression settings give a new key and a new whitening.

`row_fingerprint` is the one way the stages get the fingerprint their rows must carry.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hyperinf_ops.adapters import AdapterManifest, AdapterStore, recipe_key
from hyperinf_ops.core.curvature import CurvaturePartial, curvature_partials
from hyperinf_ops.core.sketch import Sketch, sketch_width
from hyperinf_ops.core.whitening import Whitening
from hyperinf_ops.data.prepare import record_columns
from hyperinf_ops.errors import DataError
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.location import Location
from hyperinf_ops.settings import GradientSettings, ModelSpec
from hyperinf_ops.stages.common import Log, Summary, require_table, sample_filter
from hyperinf_ops.store import LanceStore

__all__ = ["CodecSummary", "codec_pending", "current_whitening", "prepare_row_codec", "row_fingerprint"]

CODECS = "row_codecs"
# Below this many pilot gradient rows per block direction the pilot's small eigenvalues are poorly estimated and
# whitening can cost more than it gains (docs/compression.md: measured fine at 3.75 and 8.3, worse at 1.25).
MIN_ROWS_PER_DIRECTION = 3
# Loaded whitenings of this process, by file and modification time: every stage of a run reads the same one.
_LOADED: dict[tuple[str, int], Whitening] = {}


@dataclass
class CodecSummary(Summary):
    whitened: bool  # False: compression.whiten is 0, rows are stored without a whitening
    created: bool  # False: the key's whitening was already stored
    key: str
    digest: str  # what the rows' fingerprint carries ("" when not whitened)
    power: float
    pilot_examples: int
    rows_per_direction: float  # pilot gradient rows (examples x r) per direction of the widest block
    largest_root_ratio: float  # max over matrices of max/min (S + lambda)^p: how unequal the directions were
    seconds: float


def _key(manifest: AdapterManifest, settings: GradientSettings) -> str:
    c = settings.compression
    # the sketch width the rows get (the width rule's when compression.sketch_dim is 0 and the model is wide)
    sketch_dim = sketch_width(manifest.selected_shapes(settings.modules), c)
    return recipe_key({"adapter": manifest.adapter_hash, "modules": settings.modules, "sketch_dim": sketch_dim,
                       "seed": c.seed, "whiten": c.whiten, "pilot_examples": c.pilot_examples,
                       # a bf16 pass's pilot is another whitening; float32 keeps the keys stored before the field
                       **({"model_dtype": settings.model_dtype} if settings.model_dtype != "float32" else {})})[:16]


def _paths(store: LanceStore, key: str) -> tuple[Location, Location]:
    folder = Location(store.root) / CODECS
    return folder / f"{key}.safetensors", folder / f"{key}.json"


def _manifest(store: LanceStore, settings: GradientSettings) -> tuple[str, dict | None]:
    """(key, the stored JSON manifest of the current adapter's whitening or None)."""
    key = _key(AdapterStore(store.root).require_current(), settings)
    path = _paths(store, key)[1]
    return key, json.loads(path.read_text()) if path.is_file() else None


def _require_manifest(store: LanceStore, settings: GradientSettings) -> tuple[str, dict]:
    """`_manifest`, or DataError when the whitening the rows need is not made yet."""
    key, manifest = _manifest(store, settings)
    if manifest is None:
        raise DataError("the rows are whitened but no whitening is stored for the current adapter: "
                        "materialize row_codec first")
    return key, manifest


def codec_pending(store: LanceStore, settings: GradientSettings) -> bool:
    """Whether the rows need a whitening that is not stored yet (always False without whitening)."""
    if not settings.compression.whitened:
        return False
    if AdapterStore(store.root).current() is None:
        return True
    return _manifest(store, settings)[1] is None


def current_whitening(store: LanceStore, settings: GradientSettings) -> Whitening | None:
    """The whitening the rows are stored under (None without whitening); DataError when it is not made yet."""
    if not settings.compression.whitened:
        return None
    key, manifest = _require_manifest(store, settings)
    path = _paths(store, key)[0]
    cache_key = (str(path), path.mtime_ns())
    if cache_key not in _LOADED:
        _LOADED.clear()
        whitening = Whitening.load(path.local_copy())
        if whitening.digest() != manifest["digest"]:
            raise DataError(f"{path} does not hold the whitening its manifest names: it was changed after it was "
                            "saved; delete both files and materialize row_codec")
        _LOADED[cache_key] = whitening
    return _LOADED[cache_key]


def row_fingerprint(store: LanceStore, settings: GradientSettings) -> Fingerprint:
    """The fingerprint gradient rows taken under the current adapter with these settings carry."""
    manifest = AdapterStore(store.root).require_current()
    digest = _require_manifest(store, settings)[1]["digest"] if settings.compression.whitened else ""
    return manifest.fingerprint(settings.modules, settings.compression, whitening=digest,
                                model_dtype=settings.model_dtype)


def _pilot_records(store: LanceStore, task: str, size: int, seed: int) -> list[dict]:
    examples = require_table(store, "examples", "ingest the pool first")
    return examples.to_table(columns=record_columns(task), filter=sample_filter(examples, size, seed)).to_pylist()


def prepare_row_codec(store: LanceStore, spec: ModelSpec, settings: GradientSettings, *,
                      log: Log = print) -> CodecSummary:
    """Store the whitening of the module docstring unless it is stored already (or not asked for)."""
    from hyperinf_ops.stages.loading import (  # the model: here
        finite_rows,
        gradient_batches,
        load_current_model,
    )

    start = time.perf_counter()
    c = settings.compression
    if not c.whitened:
        log("rows are stored without whitening (compression.whiten = 0)")
        return CodecSummary(whitened=False, created=False, key="", digest="", power=0.0, pilot_examples=0,
                            rows_per_direction=0.0, largest_root_ratio=1.0, seconds=time.perf_counter() - start)
    key, stored = _manifest(store, settings)
    if stored is not None:
        log(f"whitening {stored['digest']} of this adapter and compression is stored: reused")
        return CodecSummary(whitened=True, created=False, key=key, digest=stored["digest"], power=c.whiten,
                            pilot_examples=stored["pilot_examples"], rows_per_direction=stored["rows_per_direction"],
                            largest_root_ratio=stored["largest_root_ratio"], seconds=time.perf_counter() - start)
    records = _pilot_records(store, spec.task, c.pilot_examples, c.seed)
    loaded, manifest = load_current_model(store.root, spec)
    sketch = Sketch(manifest.selected_shapes(settings.modules), c, device=loaded.device)
    log(f"pilot for the row whitening: gradients of {len(records)} pool examples")
    curvature: dict[str, CurvaturePartial] = {}
    for _ids, grads, _outputs in gradient_batches(loaded, records, settings, spec.max_length, phase="whitening pilot",
                                        log=log):
        keep = finite_rows(grads)
        if bool(keep.any()):
            for name, part in curvature_partials(sketch.apply({k: g[keep] for k, g in grads.items()})).items():
                curvature[name] = part if name not in curvature else curvature[name].merge(part)
    if not curvature:
        raise DataError("no pilot example has a finite gradient: cannot whiten the rows")
    whitening = Whitening.from_curvature(curvature, c.whiten)
    ratio = max(float(r.max() / r.min()) for r in whitening.roots.values())
    count = next(iter(curvature.values())).count
    per_direction = min(part.count * part.numel / part.gfim_sum.shape[0] ** 2 for part in curvature.values())
    if per_direction < MIN_ROWS_PER_DIRECTION:
        log(f"warning: the whitening pilot has {per_direction:.1f} gradient rows per direction (below "
            f"{MIN_ROWS_PER_DIRECTION}): its small eigenvalues are poorly estimated; raise "
            f"compression.pilot_examples (now {c.pilot_examples}) if the pool allows, or store int8 rows")
    tensors, meta = _paths(store, key)
    with tempfile.TemporaryDirectory() as tmp:  # safetensors writes a local file; Location uploads it
        whitening.save(Path(tmp) / tensors.name)
        tensors.write_bytes((Path(tmp) / tensors.name).read_bytes())
    document = {"key": key, "digest": whitening.digest(), "power": c.whiten, "adapter_hash": manifest.adapter_hash,
                "pilot_examples": count, "rows_per_direction": per_direction, "largest_root_ratio": ratio,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    meta.write_text(json.dumps(document, indent=2))  # the manifest last: a whitening without one is never used
    log(f"whitening {document['digest']} (p = {c.whiten}) from {document['pilot_examples']} pilot examples; "
        f"per-direction scales spread up to {ratio:.3g}x")
    return CodecSummary(whitened=True, created=True, key=key, digest=document["digest"], power=c.whiten,
                        pilot_examples=count, rows_per_direction=per_direction, largest_root_ratio=ratio,
                        seconds=time.perf_counter() - start)
