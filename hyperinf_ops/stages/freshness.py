"""The one rule for "this shard's gradient rows are current, skip it".

A shard's gradient rows are current when, for the fingerprint the current adapter and settings give:
  - its curvature rows all carry that fingerprint and the `content_digest` of exactly the examples
    `examples` holds for the shard now (ids and content hashes: an edited text or label changes it), and
  - its gradient rows all carry that fingerprint and are exactly the rows the curvature sums were taken over
    (the curvature's `rows_digest`: the `content_digest` of the rows' (sample_id, content_hash) pairs), and
  - its `example_outputs` rows (the loss, margin and probabilities of the same pass) carry that fingerprint and
    cover exactly those rows.
Tables of the layout before rows carried their content (`row_layout_problem`) are never current.
Everything that decides whether to compute a shard (the `lora_gradients` asset, `hyperinf run`'s plan, the
UI's staleness through the asset's data version) asks `gradient_shard_current` / `gradient_version`.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from hyperinf_ops.data.prepare import content_digest
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.stages.common import require_table, shard_filter
from hyperinf_ops.store import LanceStore

__all__ = ["gradient_shard_current", "gradient_version", "row_layout_problem", "rows_digest",
           "shard_content_digest"]

# The columns an incremental pass needs: which content a row was computed from, which rows the sums cover.
_LAYOUT = {"gradients": "content_hash", "curvature": "rows_digest"}


def shard_content_digest(store: LanceStore, shard: str) -> str:
    """content_digest of the examples `examples` holds for the shard."""
    rows = require_table(store, "examples", "ingest the pool first").to_table(
        columns=["sample_id", "content_hash"], filter=shard_filter(shard))
    return content_digest(rows["sample_id"].to_pylist(), rows["content_hash"].to_pylist())


def gradient_version(fingerprint: Fingerprint, examples_digest: str) -> str:
    """The data version of a shard's gradient rows: what they were computed under and from."""
    return hashlib.sha256(f"{fingerprint.digest()}|{examples_digest}".encode()).hexdigest()[:32]


def row_layout_problem(store: LanceStore) -> str | None:
    """Why the stored gradient / curvature tables cannot be updated by content (written by a hyperinf before
    rows carried their content hash), None when they can or do not exist yet."""
    old = [t for t, column in _LAYOUT.items() if store.exists(t) and column not in store.open(t).schema.names]
    if not old:
        return None
    return (f"table(s) {old} were written by an older hyperinf (no {[_LAYOUT[t] for t in old]} column); they hold "
            f"derived rows only: remove {[store.uri(t) for t in old]} and run again to recompute them")


def gradient_shard_current(store: LanceStore, shard: str, fingerprint: Fingerprint) -> bool:
    """The rule of the module docstring."""
    if not all(store.exists(t) for t in ("examples", "gradients", "example_outputs", "curvature")) \
            or row_layout_problem(store):
        return False
    where = shard_filter(shard)
    curvature = store.open("curvature").to_table(columns=["fingerprint", "examples_digest", "rows_digest"],
                                                 filter=where)
    if curvature.num_rows == 0:
        return False
    grads = store.open("gradients").to_table(columns=["sample_id", "content_hash", "fingerprint"], filter=where)
    outputs = store.open("example_outputs").to_table(columns=["sample_id", "content_hash", "fingerprint"],
                                                     filter=where)
    digest = fingerprint.digest()
    return (set(curvature["fingerprint"].to_pylist()) == {digest}
            and set(outputs["fingerprint"].to_pylist()) == {digest} and rows_digest(outputs) == rows_digest(grads)
            and set(curvature["examples_digest"].to_pylist()) == {shard_content_digest(store, shard)}
            and grads.num_rows > 0 and grads["content_hash"].null_count == 0
            and set(curvature["rows_digest"].to_pylist()) == {rows_digest(grads)}
            and bool(pc.all(pc.equal(grads["fingerprint"], digest)).as_py()))


def rows_digest(rows: pa.Table) -> str:
    """content_digest of gradient rows (a table with sample_id and content_hash): what their sums cover."""
    return content_digest(rows["sample_id"].to_pylist(), rows["content_hash"].to_pylist())
