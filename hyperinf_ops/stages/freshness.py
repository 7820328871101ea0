"""The one rule for "this shard's gradient rows are current, skip it".

A shard's gradient rows are current when, for the fingerprint the current adapter and settings give:
  - its curvature rows all carry that fingerprint and the `content_digest` of exactly the examples
    `examples` holds for the shard now (ids and content hashes: an edited text or label changes it), and
  - its gradient rows all carry that fingerprint, one per example the pass kept (the curvature's count).
Everything that decides whether to compute a shard (the `lora_gradients` asset, `hyperinf run`'s plan, the
UI's staleness through the asset's data version) asks `gradient_shard_current` / `gradient_version`.
"""

from __future__ import annotations

import hashlib

import pyarrow.compute as pc

from hyperinf_ops.data.prepare import content_digest
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.stages.common import require_table, shard_filter
from hyperinf_ops.store import LanceStore

__all__ = ["gradient_shard_current", "gradient_version", "shard_content_digest"]


def shard_content_digest(store: LanceStore, shard: str) -> str:
    """content_digest of the examples `examples` holds for the shard."""
    rows = require_table(store, "examples", "ingest the pool first").to_table(
        columns=["sample_id", "content_hash"], filter=shard_filter(shard))
    return content_digest(rows["sample_id"].to_pylist(), rows["content_hash"].to_pylist())


def gradient_version(fingerprint: Fingerprint, examples_digest: str) -> str:
    """The data version of a shard's gradient rows: what they were computed under and from."""
    return hashlib.sha256(f"{fingerprint.digest()}|{examples_digest}".encode()).hexdigest()[:32]


def gradient_shard_current(store: LanceStore, shard: str, fingerprint: Fingerprint) -> bool:
    """The rule of the module docstring."""
    if not all(store.exists(t) for t in ("examples", "gradients", "curvature")):
        return False
    where = shard_filter(shard)
    curvature = store.open("curvature").to_table(columns=["fingerprint", "examples_digest", "count"], filter=where)
    if curvature.num_rows == 0:
        return False
    grads = store.open("gradients").to_table(columns=["fingerprint"], filter=where)["fingerprint"]
    digest = fingerprint.digest()
    return (set(curvature["fingerprint"].to_pylist()) == {digest}
            and set(curvature["examples_digest"].to_pylist()) == {shard_content_digest(store, shard)}
            and set(curvature["count"].to_pylist()) == {len(grads)}
            and bool(pc.all(pc.equal(grads, digest)).as_py() if len(grads) else False))
