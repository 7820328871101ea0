"""Prepared preconditioners (merged curvature, inverted once), target queries and influence scores, with
their checks."""

import dagster as dg
import numpy as np

from assets_defs.automation import step_asset
from assets_defs.metadata import column_schema, histogram_markdown, summary_metadata, table_metadata, timed
from assets_defs.model import lora_adapter, lora_gradients
from assets_defs.pool import target_sets
from assets_defs.resources import HyperinfResource
from assets_defs.signals import checkpoint_scores, cross_fit

# An agreement check below this Spearman correlation fails: sketch or solver error too large to trust.
MIN_AGREEMENT_SPEARMAN = 0.9
AGREEMENT_SAMPLE = 64


def _short(matrix: str) -> str:
    """``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight`` -> ``layer.0...``"""
    name = matrix.removeprefix("base_model.model.").removesuffix(".default.weight").removesuffix(".weight")
    return name.split("encoder.", 1)[-1].split("model.", 1)[-1]


@step_asset(
    group="influence", kinds={"pytorch", "lance"}, code_version="1",
    deps=[dg.AssetDep(lora_gradients, partition_mapping=dg.AllPartitionMapping())],
    checks={"inverses_converged": "The Schulz inverse of every damped LoRA-matrix GFIM reached its residual "
                                  "tolerance."},
    description="GFIM per LoRA matrix merged exactly from the shards' partial sums, damped, and prepared once per "
                "method (Schulz inverse for hyperinf, Cholesky for exact, ...), stored in `preconditioners` and "
                "reused downstream: solver health per matrix.",
)
def preconditioners(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.preconditioners import prepare_preconditioners

    cfg = hyperinf.config
    summary, wall = timed(prepare_preconditioners, hyperinf.store, cfg.gradient_settings,
                          [cfg.estimator(m) for m in cfg.estimators], log=context.log.info)
    rows = [{"matrix": _short(name), **{k: d.get(k) for k in
             ("iterations", "residual", "converged", "condition_estimate", "damping")}}
            for name, d in sorted(summary.diagnostics.items())]
    check = dg.AssetCheckResult(
        check_name="inverses_converged",
        passed=summary.all_converged,
        metadata={"max_residual": summary.max_residual,
                  "not_converged": dg.MetadataValue.json([r["matrix"] for r in rows if not r["converged"]])},
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(summary.data_version),
        metadata={**summary_metadata(summary, skip=("seconds", "diagnostics", "data_version")),
                  "solver_health": table_metadata(rows), "wall_time_s": wall},
        check_results=[check],
    )


@step_asset(
    group="influence", kinds={"pytorch", "lance"}, code_version="3",
    deps=[preconditioners, target_sets, lora_adapter],
    description="One preconditioned query vector (laid out like the gradient rows) per (target set, estimator) in `queries`, from the "
                "stored mean target gradients and the stored preconditioners (with signals.cover the target "
                "gradients are kept per example, for the cover rankings).",
)
def target_queries(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.queries import build_target_queries

    cfg = hyperinf.config
    summary, wall = timed(build_target_queries, hyperinf.store, list(cfg.targets), cfg.model_spec,
                          cfg.gradient_settings, [cfg.estimator(m) for m in cfg.estimators],
                          per_example=bool(cfg.cover_estimators), log=context.log.info)
    rows = [{"target/method": key, **health} for key, health in sorted(summary.diagnostics.items())]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(summary.digest),
        metadata={**summary_metadata(summary, skip=("seconds", "diagnostics", "digest")),
                  "solver_health": table_metadata(rows), "wall_time_s": wall})


@step_asset(
    group="influence", kinds={"lance"}, code_version="5",
    deps=[target_queries, dg.AssetDep(lora_gradients, partition_mapping=dg.AllPartitionMapping()), cross_fit,
          checkpoint_scores],
    description="Every ranking of the pool, in `scores`, one sign convention (higher = keep; most negative = most "
                "harmful): score = -influence on every target set for every configured estimator; target set "
                "`self`: -self-influence under the hyperinf and tracin preconditioners, and the cover rankings "
                "(signals.cover: one query per target example), from the same scan; and "
                "the rankings beside influence (loss, margin, aum, confident, hyperinf_cp, fused; "
                "stages/rankings.py) with `label_suggestions`.",
)
def influence_scores(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.checkpoints import checkpoint_source
    from hyperinf_ops.stages.cross_fit import cross_fit_sources
    from hyperinf_ops.stages.rankings import write_rankings
    from hyperinf_ops.stages.scores import read_scores, score

    cfg, store = hyperinf.config, hyperinf.store
    pairs = [(t, m) for t in cfg.targets for m in cfg.estimators]
    shown = curation_pair(hyperinf)
    summary, wall = timed(score, store, cfg.gradient_settings, pairs, task=cfg.task, shown=shown,
                          self_influence=cfg.self_influence_estimators, cover=cfg.cover_estimators,
                          spec=cfg.model_spec, device=None if cfg.device == "auto" else cfg.device,
                          log=context.log.info,
                          rankings=lambda fp, version, run_id: write_rankings(
                              store, fp, version, run_id, list(cfg.targets), cfg.estimators, cfg.signals,
                              cfg.fusion_members,
                              sources=cross_fit_sources(store, cfg.model_spec, cfg.lora, cfg.train, cfg.signals),
                              checkpoint_source=checkpoint_source(store, cfg.gradient_settings,
                                                                  cfg.estimator("hyperinf"), list(cfg.targets))
                              if cfg.signals.checkpoints else None, log=context.log.info))
    stats = [{"target/method": key, **values} for key, values in sorted(summary.score_stats.items())]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(summary.digest),
        metadata={
            "dagster/row_count": summary.rows,
            # the one picture: the pair the curation query reads (every pair's quantiles are in score_stats)
            "histogram": histogram_markdown(read_scores(store, *shown)["score"].to_numpy(), title=" / ".join(shown)),
            "score_stats": table_metadata(stats),
            "most_harmful (curation target/method)": table_metadata(summary.most_harmful),
            "most_helpful (curation target/method)": table_metadata(summary.most_helpful),
            "pairs": dg.MetadataValue.text(", ".join(summary.pairs)),
            **summary_metadata(summary, skip=("seconds", "score_stats", "most_helpful", "most_harmful", "pairs",
                                              "digest")),
            "wall_time_s": wall,
            "dagster/column_schema": column_schema(store.open("scores").schema),
        })


def curation_pair(hyperinf: HyperinfResource) -> tuple[str, str]:
    """The (target set, method) the curation query reads: what the summaries show examples of."""
    cfg = hyperinf.config
    params = cfg.curation.params
    return (str(params.get("target_set", params.get("set_a", next(iter(cfg.targets))))),
            str(params.get("method", cfg.estimators[0])))


@dg.asset_check(
    asset=influence_scores,
    blocking=True,
    description="Every pool example has one finite score per (target set, estimator), and one per "
                "self-influence ranking (target set `self`).",
)
def scores_cover_pool(hyperinf: HyperinfResource) -> dg.AssetCheckResult:
    from hyperinf_ops.stages.scores import self_influence_pairs

    cfg, store = hyperinf.config, hyperinf.store
    n_pool = store.open("examples").count_rows()
    table = store.open("scores").to_table(columns=["target_set", "method", "score"]).to_pandas()
    counts = table.groupby(["target_set", "method"]).size()
    expected = {(t, m) for t in cfg.targets for m in cfg.estimators} | self_influence_pairs()
    wrong = {f"{t}/{m}": int(counts.get((t, m), 0)) for t, m in sorted(expected) if counts.get((t, m), 0) != n_pool}
    nonfinite = int((~np.isfinite(table["score"].to_numpy())).sum())
    return dg.AssetCheckResult(
        passed=not wrong and nonfinite == 0,
        metadata={"pool_rows": n_pool, "score_rows": len(table), "pairs": len(expected),
                  "pairs_with_wrong_count": dg.MetadataValue.json(wrong), "nonfinite_scores": nonfinite},
    )


@dg.asset_check(
    asset=influence_scores,
    description=f"Stored scores agree with exact scores (the stored fp64 Cholesky inverse, the same stored rows) on a "
                f"random sample of {AGREEMENT_SAMPLE} examples: Spearman >= {MIN_AGREEMENT_SPEARMAN} for every "
                "target set.",
)
def agreement_with_exact(context: dg.AssetCheckExecutionContext, hyperinf: HyperinfResource) -> dg.AssetCheckResult:
    from hyperinf_ops.stages.reports import agreement_check

    cfg = hyperinf.config
    method = "hyperinf" if "hyperinf" in cfg.estimators else cfg.estimators[0]
    summary = agreement_check(hyperinf.store, cfg.model_spec, cfg.gradient_settings, cfg.estimator(method),
                              list(cfg.targets), sample_size=AGREEMENT_SAMPLE, seed=0, log=context.log.info)
    return dg.AssetCheckResult(
        passed=bool(summary.min_spearman >= MIN_AGREEMENT_SPEARMAN),
        description=f"min Spearman {summary.min_spearman:.4f} (threshold {MIN_AGREEMENT_SPEARMAN})",
        metadata={**summary_metadata(summary, skip=("seconds",)), "threshold": MIN_AGREEMENT_SPEARMAN,
                  "seconds": round(summary.seconds, 2)},
    )
