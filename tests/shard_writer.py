"""A process that rewrites one shard of `examples` (tests/test_object_storage.py starts two at once); kept apart
from the test module so a spawned worker imports the store only, not Dagster."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from hyperinf_ops.store import LanceStore


def shard_ids(shard: str, round_: int) -> list[str]:
    """The ids of `shard`'s write number `round_`: every round a different size, so a lost or doubled round
    shows in the row count."""
    return [f"{shard}-r{round_}-{i:03d}" for i in range(20 + round_)]


def write_shard(root: str, shard: str, rounds: int, barrier: Any, queue: Any) -> None:
    """Wait for the other writer, replace `shard` `rounds` times, then report (shard, committed versions, start,
    end) so the caller can check the writes overlapped."""
    store = LanceStore(root)
    barrier.wait()
    start = time.time()
    versions = []
    for r in range(rounds):
        ids = shard_ids(shard, r)
        versions.append(store.write_examples(shard, pa.table({"sample_id": ids, "text": ids, "label": ["x"] * len(ids)})))
    queue.put((shard, versions, start, time.time()))
