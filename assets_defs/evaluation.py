"""Does curation help, and which? The `evaluation` asset: fresh adapters fit on every candidate curation, random
subsets, the full pool and the oracle; the candidate with the best validation score is what `curated_subset`
exports under `curation.method: auto`."""

import dagster as dg

from assets_defs.automation import step_asset
from assets_defs.influence import influence_scores
from assets_defs.metadata import lines_markdown, summary_metadata, table_metadata, timed
from assets_defs.resources import HyperinfResource


def evaluation_plan(cfg):
    """The config's `evaluation:` block as a stages.evaluation_plan.EvaluationPlan (None without one)."""
    from hyperinf_ops.stages.evaluation_plan import EvaluationPlan

    ev = cfg.evaluation
    if ev is None:
        return None
    return EvaluationPlan(test_path=str(ev.test.path), candidates=cfg.evaluation_candidates, seeds=ev.seeds,
                          full=ev.full, validation=ev.validation, subset_epochs=ev.subset_epochs)


@step_asset(
    group="curation", kinds={"pytorch", "lance"}, code_version="3",
    deps=[influence_scores],
    description="With an `evaluation:` block in the config (else it records that there is none): fresh LoRA adapters fine-tuned with the warm-up "
                "recipe on every candidate curation (query x ranking x fraction), on random subsets of the same "
                "sizes, on the whole pool and on the pool without its planted flips, each tested on both halves of "
                "the test file: the validation half chooses (`curation.method: auto` exports the winner), the "
                "test half is reported. One row per fit in the `evaluation` table (finished fits are reused).",
)
def evaluation(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    cfg = hyperinf.config
    plan = evaluation_plan(cfg)
    if plan is None:  # a result all the same: the export downstream must not be skipped
        context.log.info("no `evaluation:` block in the config: nothing to evaluate")
        return dg.MaterializeResult(data_version=dg.DataVersion("none"),
                                    metadata={"configured": dg.MetadataValue.bool(False)})
    from hyperinf_ops.stages.evaluation import run_evaluation

    summary, wall = timed(run_evaluation, hyperinf.store, cfg.model_spec, cfg.lora, cfg.train, cfg.data, plan,
                          log=context.log.info)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": summary.fits,
        **summary_metadata(summary, skip=("seconds", "rows")),
        "results": table_metadata(summary.rows),
        "plot": _accuracy_plot(summary.rows),
        **{f"test_accuracy/{_label(r)}": dg.MetadataValue.float(r["test_accuracy"])
           for r in summary.rows if r["test_accuracy"] is not None},
        "wall_time_s": wall,
    })


def _label(row: dict) -> str:
    """A metadata key for an option: `full`, `oracle`, `random_0.8`, `relabel_fused_0.2`,
    `top_fraction_hyperinf_0.2_balanced` (`balance: [false, true]` fits both variants)."""
    if row["candidate"]:
        return f"{row['query']}_{row['method']}_{row['fraction']:g}" + ("_balanced" if row.get("balance") else "")
    return row["subset"] if row["subset"] != "random" else f"random_{row['fraction']:g}"


def _accuracy_plot(rows: list[dict]) -> dg.MetadataValue:
    """Mean test accuracy (test loss for tasks without classes) against the candidates' $fraction: a line per
    query and ranking, random subsets against their size share; the full pool and the oracle as lines."""
    key = "test_accuracy" if any(r["test_accuracy"] is not None for r in rows) else "test_loss"
    fractions = sorted({r["fraction"] for r in rows if r["subset"] in ("curated", "random")})
    series: dict[str, list[float | None]] = {}
    for r in rows:
        if r["subset"] in ("curated", "random"):
            balanced = ", balanced" if r.get("balance") else ""
            name = f"{r['query']} ({r['method']}{balanced})" if r["candidate"] else "random (x = size share)"
            series.setdefault(name, [None] * len(fractions))[fractions.index(r["fraction"])] = r[key]
    refs = {f"{r['subset']} pool": r[key] for r in rows if r["subset"] in ("full", "oracle")}
    return lines_markdown(fractions, series, title=f"mean {key.replace('_', ' ')} over seeds (test half)",
                          xlabel="$fraction of the query", hlines=refs)
