"""Shards of the candidate pool: one dynamic partition per data file."""

from collections.abc import Iterable

import dagster as dg

POOL_SHARDS = "pool_shards"
# The data version of a partition whose pool file is gone (deleted or renamed): the pool_files observation the
# sensor reports, and pool_examples / lora_gradients once they removed the shard's rows.
REMOVED = "removed"

pool_shards = dg.DynamicPartitionsDefinition(name=POOL_SHARDS)


def missing_partitions(instance: dg.DagsterInstance, shards: Iterable[str]) -> list[str]:
    """The shard keys that have no ``pool_shards`` partition yet, sorted."""
    return sorted(key for key in shards if not instance.has_dynamic_partition(POOL_SHARDS, key))
