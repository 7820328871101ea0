"""The label-quality signals computed beside the gradient pass: the cross-fit behind `confident` and HyperINF
under the warm-up's checkpoints behind `hyperinf_cp` (stages/rankings.py turns them into rankings)."""

import dagster as dg

from assets_defs.automation import step_asset
from assets_defs.metadata import summary_metadata, timed
from assets_defs.model import lora_adapter
from assets_defs.pool import pool_examples, target_sets
from assets_defs.resources import HyperinfResource


@step_asset(
    group="signals", kinds={"pytorch", "lance"}, code_version="2",
    deps=[dg.AssetDep(pool_examples, partition_mapping=dg.AllPartitionMapping()), target_sets],
    description="Classification: out-of-fold class probabilities scored by cleanlab (label quality, label issues), "
                "in `label_signals`: `probe` (a 5-fold logistic regression on the base model's frozen embeddings; "
                "`signals.probe`) and `confident` (`signals.folds` warm-ups on folds of the pool; off by default). "
                "Any task, with `signals.similarity`: `similarity`, the cosine of each example's frozen embedding "
                "to each target set's mean one (the baseline a user tries before gradients). "
                "Reused while the pool, the target sets and the recipe are unchanged. Data version: their digest.",
)
def cross_fit(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.cross_fit import cross_fit_labels

    cfg = hyperinf.config
    summary, wall = timed(cross_fit_labels, hyperinf.store, cfg.model_spec, cfg.lora, cfg.train, cfg.signals,
                          log=context.log.info)
    version = "|".join(f"{k}={v}" for k, v in sorted(summary.sources.items())) or "off"
    return dg.MaterializeResult(data_version=dg.DataVersion(version),
                                metadata={**summary_metadata(summary, skip=("seconds",)), "wall_time_s": wall})


@step_asset(
    group="signals", kinds={"pytorch", "lance"}, code_version="1",
    deps=[lora_adapter, target_sets, dg.AssetDep(pool_examples, partition_mapping=dg.AllPartitionMapping())],
    description="Only with `signals.checkpoints: true`: HyperINF scores of the pool against every target set "
                "under each earlier epoch checkpoint of the warm-up (curvature from a pilot sample, one gradient "
                "pass of the pool per checkpoint), in `label_signals`; summed with the end point into "
                "`hyperinf_cp`. Data version: their digest.",
)
def checkpoint_scores(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.checkpoints import checkpoint_influence

    cfg = hyperinf.config
    if not cfg.signals.checkpoints or "hyperinf" not in cfg.estimators:
        context.log.info("signals.checkpoints is off (or hyperinf is not an estimator): nothing to score")
        return dg.MaterializeResult(data_version=dg.DataVersion("off"))
    summary, wall = timed(checkpoint_influence, hyperinf.store, cfg.model_spec, cfg.gradient_settings,
                          cfg.estimator("hyperinf"), list(cfg.targets), log=context.log.info)
    return dg.MaterializeResult(data_version=dg.DataVersion(summary.source),
                                metadata={**summary_metadata(summary, skip=("seconds",)), "wall_time_s": wall})
