"""Shards of the candidate pool: one dynamic partition per data file, added by the pool-folder sensor."""

import dagster as dg

POOL_SHARDS = "pool_shards"

pool_shards = dg.DynamicPartitionsDefinition(name=POOL_SHARDS)
