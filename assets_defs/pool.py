"""The candidate pool (its files, one partition each, and their validated rows) and the target sets."""

from collections.abc import Sequence

import dagster as dg

from assets_defs.automation import step_asset
from assets_defs.metadata import column_schema, summary_metadata, table_metadata, timed
from assets_defs.partitions import REMOVED, pool_shards
from assets_defs.resources import HyperinfResource
from hyperinf_ops.data.io import discover_shards, file_digest


@dg.observable_source_asset(
    partitions_def=pool_shards,
    group_name="pool",
    description="The pool's data files, one partition per file; data version = sha256 of the file's bytes "
                "(observed by the pool-folder sensor, or from the UI).",
)
def pool_files(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.DataVersionsByPartition:
    files = discover_shards(hyperinf.config.data.path)
    known = context.instance.get_dynamic_partitions(pool_shards.name)
    return dg.DataVersionsByPartition({key: dg.DataVersion(file_digest(files[key]) if key in files else REMOVED)
                                       for key in known})


def removed_shard(context: dg.AssetExecutionContext, hyperinf: HyperinfResource,
                  check_results: Sequence[dg.AssetCheckResult] = ()) -> dg.MaterializeResult:
    """A partition whose pool file is gone: remove its shard (examples, gradient rows, curvature sums; a removal
    cut short is finished by the next one) and record the data version REMOVED."""
    from hyperinf_ops.stages.pool import drop_shard

    drop_shard(hyperinf.store, context.partition_key)
    context.log.info(f"shard {context.partition_key}: no data file in {hyperinf.config.data.path}: its examples, "
                     "gradient rows and curvature sums are removed")
    return dg.MaterializeResult(data_version=dg.DataVersion(REMOVED), metadata={"dagster/row_count": 0, "removed": True},
                                check_results=list(check_results))


@step_asset(
    group="pool", kinds={"lance"}, code_version="3",
    partitions_def=pool_shards,
    deps=[pool_files],
    description="One data file of the candidate pool, validated and id'd, as its shard of the `examples` table "
                "(written only when its content changed); shards whose file is gone and that hold its ids are "
                "removed first. A partition whose file is gone removes its shard (examples, gradient rows, "
                "curvature sums). Data version: digest of the shard's rows ('removed' for a gone file).",
)
def pool_examples(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.pool import ingest_shard

    cfg, shard = hyperinf.config, context.partition_key
    files = discover_shards(cfg.data.path)
    if shard not in files:
        return removed_shard(context, hyperinf)
    summary, wall = timed(ingest_shard, hyperinf.store, shard, files[shard], cfg.data, cfg.task,
                          log=context.log.info, files=list(files))
    return dg.MaterializeResult(
        data_version=dg.DataVersion(summary.digest),
        metadata={"dagster/row_count": summary.rows, "source_file": dg.MetadataValue.path(str(files[shard])),
                  "dagster/column_schema": column_schema(hyperinf.store.open("examples").schema),
                  **summary_metadata(summary, skip=("seconds", "shard", "digest")), "wall_time_s": wall})


@step_asset(
    group="pool", kinds={"lance"}, code_version="2",
    deps=[dg.AssetDep(pool_examples, partition_mapping=dg.AllPartitionMapping())],
    description="Every configured target set (a file, or a SQL predicate over the pool) in the `targets` table.",
)
def target_sets(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.pool import ingest_targets

    cfg = hyperinf.config
    summary, wall = timed(ingest_targets, hyperinf.store, cfg.targets, cfg.data, cfg.task, log=context.log.info)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(summary.digest),
        metadata={"dagster/row_count": sum(summary.rows.values()),
                  "dagster/column_schema": column_schema(hyperinf.store.open("targets").schema),
                  "target_sets": table_metadata([{"target set": k, "examples": v} for k, v in summary.rows.items()]),
                  **summary_metadata(summary, skip=("seconds", "rows", "digest")), "wall_time_s": wall})
