"""Jobs: the units the CLI, the UI and automation launch.

A new pool file needs ``shard_job`` for its partition (ingest + gradients of that shard only) and then a
``refresh_job``: the adapter stays, so the other shards' gradient rows stay valid.
"""

import dagster as dg

SHARD_ASSETS = ("pool_examples", "lora_gradients")
REFRESH_ASSETS = ("target_sets", "cross_fit", "checkpoint_scores", "preconditioners", "target_queries",
                  "influence_scores", "curated_subset", "mislabel_report", "evaluation")

shard_job = dg.define_asset_job(
    "shard_job",
    selection=dg.AssetSelection.assets(*SHARD_ASSETS),
    description="Ingest one pool shard and compute its per-example LoRA gradient rows (skipped when current).",
)
adapter_job = dg.define_asset_job(
    "adapter_job",
    selection=dg.AssetSelection.assets("lora_adapter", "row_codec"),
    description="Warm-up fine-tune the LoRA adapter on the pool (or reuse / copy the configured adapter), then the "
                "whitening its gradient rows are stored under (when compression.whiten > 0).",
)
refresh_job = dg.define_asset_job(
    "refresh_job",
    selection=dg.AssetSelection.assets(*REFRESH_ASSETS),
    description="Target sets, preconditioners (merged curvature, inverted once), queries, scores, curated subset, "
                "mislabel report, and the evaluation when the config has an `evaluation:` block.",
)
