"""Candidate pool (one partition per data file) and target sets."""

import dagster as dg

from assets_defs.metadata import markdown_table, summary_metadata, timed
from assets_defs.partitions import pool_shards
from hyperinf_ops.data import discover_shards
from hyperinf_ops.errors import DataError
from pipelines.resources import HyperinfConfigResource


@dg.asset(
    partitions_def=pool_shards,
    group_name="pool",
    kinds={"lance"},
    description="One data file of the candidate pool, validated and id'd, as its shard of the `examples` table.",
)
def pool_examples(context: dg.AssetExecutionContext, hyperinf: HyperinfConfigResource) -> dg.MaterializeResult:
    from hyperinf_ops import steps

    cfg, shard = hyperinf.config, context.partition_key
    files = discover_shards(cfg.data)
    if shard not in files:
        raise DataError(f"shard {shard!r} has no data file in {cfg.data.path} (files: {sorted(files)})")
    summary, wall = timed(steps.ingest_shard, cfg, hyperinf.store, shard, files[shard], log=context.log.info)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": summary.rows,
        "source_file": dg.MetadataValue.path(str(files[shard])),
        **summary_metadata(summary, skip=("seconds", "shard")),
        "wall_time_s": wall,
    })


@dg.asset(
    deps=[dg.AssetDep(pool_examples, partition_mapping=dg.AllPartitionMapping())],
    group_name="pool",
    kinds={"lance"},
    description="Every configured target set (a file, or a SQL predicate over the pool) in the `targets` table.",
)
def target_sets(context: dg.AssetExecutionContext, hyperinf: HyperinfConfigResource) -> dg.MaterializeResult:
    from hyperinf_ops import steps

    summary, wall = timed(steps.ingest_targets, hyperinf.config, hyperinf.store, log=context.log.info)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": sum(summary.rows.values()),
        "target_sets": markdown_table([{"target set": k, "examples": v} for k, v in summary.rows.items()]),
        **summary_metadata(summary, skip=("seconds", "rows")),
        "wall_time_s": wall,
    })
