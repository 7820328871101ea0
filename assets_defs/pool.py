"""Candidate pool (one partition per data file) and target sets."""

from __future__ import annotations

import dagster as dg

from assets_defs.metadata import summary_metadata, timed
from assets_defs.partitions import pool_shards
from hyperinf_ops import steps
from hyperinf_ops.data import discover_shards
from hyperinf_ops.errors import DataError
from pipelines.resources import HyperinfConfigResource


@dg.asset(
    partitions_def=pool_shards,
    group_name="ingest",
    kinds={"lance"},
    description="One data file of the candidate pool, validated and id'd, in the Lance `examples` table.",
)
def pool_examples(context: dg.AssetExecutionContext, hyperinf: HyperinfConfigResource) -> dg.MaterializeResult:
    cfg, shard = hyperinf.config, context.partition_key
    files = discover_shards(cfg.data)
    if shard not in files:
        raise DataError(f"shard {shard!r} has no data file in {cfg.data.path} any more (files: {sorted(files)})")
    summary, wall = timed(steps.ingest_shard, cfg, hyperinf.store, shard, files[shard])
    return dg.MaterializeResult(metadata={**summary_metadata(summary), "wall_time_s": wall})


@dg.asset(
    deps=[pool_examples],
    group_name="ingest",
    kinds={"lance"},
    description="Every configured target set (a file, or a SQL predicate over the pool) in the `targets` table.",
)
def target_sets(context: dg.AssetExecutionContext, hyperinf: HyperinfConfigResource) -> dg.MaterializeResult:
    summary, wall = timed(steps.ingest_targets, hyperinf.config, hyperinf.store)
    return dg.MaterializeResult(metadata={**summary_metadata(summary), "wall_time_s": wall})
