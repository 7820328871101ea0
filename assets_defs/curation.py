"""The curated fine-tuning subset (a `sql/` query over the scores) and the mislabel report."""

import math

import dagster as dg

from assets_defs.automation import step_asset
from assets_defs.influence import curation_pair, influence_scores
from assets_defs.metadata import column_schema, summary_metadata, table_metadata, timed
from assets_defs.resources import HyperinfResource
from hyperinf_ops.location import Location


@step_asset(
    group="curation", kinds={"duckdb", "parquet"}, code_version="3",
    deps=[influence_scores],
    description="The configured `sql/` curation query over the scores, exported as Parquet + JSONL + "
                "manifest.json (query text, parameters, Lance versions); the DuckDB file is re-synced.",
)
def curated_subset(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.curation import curate, subset_preview

    cfg = hyperinf.config
    summary, wall = timed(curate, hyperinf.store, cfg.curation.query, cfg.curation.params, retention=cfg.retention,
                          log=context.log.info)
    parquet = summary.files["parquet"]
    flipped = summary.flipped or {}
    return dg.MaterializeResult(metadata={
        "dagster/row_count": summary.rows,
        "labels": table_metadata(summary.labels),
        **{f"flipped_{k}": dg.MetadataValue.float(float(v)) for k, v in flipped.items() if v is not None},
        "preview": table_metadata(subset_preview(hyperinf.store, parquet, cfg.task)),
        "parquet": dg.MetadataValue.path(parquet),
        "jsonl": dg.MetadataValue.path(summary.files["jsonl"]),
        "manifest": dg.MetadataValue.path(str(Location(summary.out_dir) / "manifest.json")),
        **summary_metadata(summary, skip=("seconds", "files", "out_dir", "labels", "flipped")),
        "wall_time_s": wall,
        "dagster/column_schema": column_schema(Location(parquet).parquet_schema()),
    })


@dg.asset_check(
    asset=curated_subset,
    description="The exported subset is non-empty, no larger than the pool, free of duplicate ids, and "
                "(for a `fraction` parameter) holds ceil(fraction x pool) examples (with `balance`: the sum "
                "over labels of ceil(fraction x label's pool examples)).",
)
def curated_subset_size(hyperinf: HyperinfResource) -> dg.AssetCheckResult:
    from hyperinf_ops.stages.curation import export_dir

    cfg, store = hyperinf.config, hyperinf.store
    path = export_dir(cfg.storage_root, cfg.curation.query) / "subset.parquet"
    n_pool = store.open("examples").count_rows()
    ids = path.read_parquet(["sample_id"])["sample_id"].to_pylist()
    fraction = cfg.curation.params.get("fraction")
    expected = None
    if isinstance(fraction, int | float):
        sizes = [n_pool]
        if cfg.curation.params.get("balance") is True:
            sizes = store.open("examples").to_table(columns=["label"]).group_by("label").aggregate(
                [("label", "count")])["label_count"].to_pylist()
        expected = sum(math.ceil(fraction * n) for n in sizes)
    problems = []
    if not ids:
        problems.append("the subset is empty")
    if len(ids) > n_pool:
        problems.append(f"{len(ids)} rows for a pool of {n_pool}")
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} duplicate sample ids")
    if expected is not None and len(ids) != expected:
        problems.append(f"{len(ids)} rows, expected {expected} (fraction {fraction} of {n_pool})")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or None,
        metadata={"rows": len(ids), "pool_rows": n_pool, "share_of_pool": round(len(ids) / max(n_pool, 1), 4),
                  **({"expected_rows": expected} if expected is not None else {})},
    )


@step_asset(
    group="curation", kinds=set(), code_version="4",
    deps=[influence_scores],
    description="How well each estimator's most harmful examples find mislabeled ones: AUROC and share of "
                "flips found in the 10% / 20% / 30% most harmful (needs a boolean `flipped` pool column; with raw "
                "gradients also the self-influence rankings of target set `self`), plus the most harmful "
                "examples with text and label. Reads the stored scores only.",
)
def mislabel_report(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.reports import mislabel_report as report_of

    cfg = hyperinf.config
    target, method = curation_pair(hyperinf)
    methods = [cfg.estimator(method)] + [cfg.estimator(m) for m in cfg.estimators if m != method]
    report, wall = timed(report_of, hyperinf.store, cfg.gradient_settings, methods, target_set=target,
                         task=cfg.task)
    rows = [{"ranking": m, **r} for m, r in report.methods.items()]
    if report.has_truth:
        context.log.info("mislabel AUROC: " + ", ".join(f"{m} {r['auroc']:.3f}" for m, r in report.methods.items()))
    return dg.MaterializeResult(metadata={
        "detection": table_metadata(rows),
        "most_harmful": table_metadata(report.most_harmful),
        **summary_metadata(report, skip=("methods", "most_harmful")),
        **{f"auroc/{m}": dg.MetadataValue.float(r["auroc"]) for m, r in report.methods.items()},
        "wall_time_s": wall,
    })
