"""Thin Dagster assets and asset checks over the hyperinf core (`hyperinf_ops.stages`).

    pool_files[shard] -> pool_examples[shard] -> target_sets
    pool_examples[shard] -> lora_adapter -> row_codec -> lora_gradients[shard] -> preconditioners -> target_queries
        -> influence_scores -> curated_subset, mislabel_report; curated_subset -> evaluation (configured only)
    pool_examples -> cross_fit (signals.folds), lora_adapter + target_sets -> checkpoint_scores
        (signals.checkpoints) -> influence_scores

Assets return ``MaterializeResult`` with metadata and a data version only: tensors and tables stay in Lance,
never in an IO manager. Partitioned assets use the dynamic ``pool_shards`` partitions (one per data file of
the pool). Each asset imports its stage (torch, transformers, peft) in its body: loading the code location
(``dagster dev``, every code reload) takes about half the time without it. This package never imports
``pipelines``: the resource type is ``assets_defs.resources.HyperinfResource``.
"""

from assets_defs.curation import curated_subset, curated_subset_size, mislabel_report
from assets_defs.evaluation import evaluation
from assets_defs.influence import (
    agreement_with_exact,
    influence_scores,
    preconditioners,
    scores_cover_pool,
    target_queries,
)
from assets_defs.model import gradient_rows_match_pool, lora_adapter, lora_gradients, row_codec
from assets_defs.pool import pool_examples, pool_files, target_sets
from assets_defs.signals import checkpoint_scores, cross_fit

ASSETS = [
    pool_files,
    pool_examples,
    target_sets,
    lora_adapter,
    row_codec,
    lora_gradients,
    cross_fit,
    checkpoint_scores,
    preconditioners,
    target_queries,
    influence_scores,
    curated_subset,
    mislabel_report,
    evaluation,
]
ASSET_CHECKS = [gradient_rows_match_pool, scores_cover_pool, agreement_with_exact, curated_subset_size]
