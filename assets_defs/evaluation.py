"""Does curation help? The `evaluation` asset: fresh adapters fit on curated, random and full subsets, tested."""

import dagster as dg

from assets_defs.automation import step_asset
from assets_defs.curation import curated_subset
from assets_defs.influence import influence_scores
from assets_defs.metadata import lines_markdown, summary_metadata, table_metadata, timed
from assets_defs.resources import HyperinfResource


@step_asset(
    group="curation", kinds={"pytorch", "lance"}, code_version="1", optional=True,
    deps=[influence_scores, curated_subset],
    description="Only with an `evaluation:` block in the config: fresh LoRA adapters fine-tuned with the warm-up "
                "recipe on each method's curated subset (top fraction of the target set's ranking), on random "
                "subsets of the same size (one per seed) and on the whole pool, tested on the test file. One row "
                "per fit in the `evaluation` table (finished fits are reused); the summary also goes into the "
                "curated subset's manifest.json.",
)
def evaluation(context: dg.AssetExecutionContext, hyperinf: HyperinfResource):
    cfg = hyperinf.config
    if cfg.evaluation is None:
        context.log.info("no `evaluation:` block in the config: nothing to evaluate")
        return
    from hyperinf_ops.export import update_manifest
    from hyperinf_ops.stages.curation import export_dir
    from hyperinf_ops.stages.evaluation import EvaluationPlan, run_evaluation

    ev = cfg.evaluation
    plan = EvaluationPlan(test_path=str(ev.test.path), target_set=cfg.evaluation_target,
                          methods=cfg.evaluation_methods, fractions=ev.fractions, seeds=ev.seeds, balance=ev.balance_variants,
                          full=ev.full)
    summary, wall = timed(run_evaluation, hyperinf.store, cfg.model_spec, cfg.lora, cfg.train, cfg.data, plan,
                          log=context.log.info)
    update_manifest(export_dir(cfg.storage_root, cfg.curation.query), evaluation=summary.rows)
    yield dg.MaterializeResult(metadata={
        "dagster/row_count": summary.fits,
        **summary_metadata(summary, skip=("seconds", "rows")),
        "results": table_metadata(summary.rows),
        "plot": _accuracy_plot(summary.rows),
        **{f"test_accuracy/{_label(r)}": dg.MetadataValue.float(r["test_accuracy"])
           for r in summary.rows if r["test_accuracy"] is not None},
        "wall_time_s": wall,
    })


def _label(row: dict) -> str:
    if row["subset"] == "full":
        return "full"
    return (f"{row['subset']}{'_' + row['method'] if row['method'] else ''}{'_balanced' if row['balance'] else ''}"
            f"_{row['fraction']:g}")


def _accuracy_plot(rows: list[dict]) -> dg.MetadataValue:
    """Mean test accuracy (test loss for tasks without classes) against the fraction kept: a line per ranking
    and random, the full pool dashed."""
    from hyperinf_ops.stages.evaluation import subset_label

    key = "test_accuracy" if any(r["test_accuracy"] is not None for r in rows) else "test_loss"
    fractions = sorted({r["fraction"] for r in rows if r["subset"] != "full"})
    series: dict[str, list[float | None]] = {}
    for r in rows:
        if r["subset"] != "full":
            series.setdefault(subset_label(r), [None] * len(fractions))[fractions.index(r["fraction"])] = r[key]
    full = {f"full pool: {r[key]:.3f}": r[key] for r in rows if r["subset"] == "full"}
    return lines_markdown(fractions, series, title=f"mean {key.replace('_', ' ')} over seeds", xlabel="fraction kept",
                          hlines=full)
