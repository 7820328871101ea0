"""The pipeline's stages as plain functions, one module per stage; each Dagster asset calls one of them.

    pool.ingest_shard (per shard), pool.ingest_targets
    adapter.train_or_load_adapter
    gradients.compute_gradient_shard (per shard; skipped when freshness.gradient_shard_current)
    preconditioners.prepare_preconditioners   merged curvature -> stored prepared inverses
    queries.build_target_queries               stored mean target gradients x stored inverses
    scores.score                               one streaming scan of the gradient rows
    curation.curate, reports.mislabel_report, reports.agreement_check

Every stage takes the store and the small settings it needs (never the whole config), writes its big results
to Lance, and returns a small `Summary` of facts a person wants to see (counts, versions, timings, solver
health), never tensors. Each validates its input before writing, so bad input never replaces a table, and
none combines rows made under different fingerprints.
"""
