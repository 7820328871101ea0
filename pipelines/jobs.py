"""Asset jobs. Partitioned work (per pool shard) and the unpartitioned refresh are separate runs.

- ``shard_job``: ingest one shard of the pool and compute its gradient rows (+ curvature partials).
- ``adapter_job``: the LoRA adapter (warm-up fine-tune on the ingested pool, or the configured folder).
- ``refresh_job``: target sets, curvature merge, target queries, scores, curated subset, mislabel report.

A first build runs ``shard_job[pool_examples]`` per shard, ``adapter_job``, ``shard_job[lora_gradients]``
per shard, then ``refresh_job`` (``pipelines.runner.materialize_all``). New shards only need ``shard_job``
and a ``refresh_job``: the adapter stays, so old gradient rows stay valid.
"""

import dagster as dg

SHARD_ASSETS = ("pool_examples", "lora_gradients")
REFRESH_ASSETS = ("target_sets", "curvature", "target_queries", "influence_scores", "curated_subset",
                  "mislabel_report")

shard_job = dg.define_asset_job(
    "shard_job",
    selection=dg.AssetSelection.assets(*SHARD_ASSETS),
    description="Ingest one pool shard and compute its per-example LoRA gradient rows.",
)
adapter_job = dg.define_asset_job(
    "adapter_job",
    selection=dg.AssetSelection.assets("lora_adapter"),
    description="Warm-up fine-tune the LoRA adapter on the pool (or load the configured adapter).",
)
refresh_job = dg.define_asset_job(
    "refresh_job",
    selection=dg.AssetSelection.assets(*REFRESH_ASSETS),
    description="Re-merge curvature, re-build target queries, re-score and re-curate from stored gradients.",
)
