"""The curated fine-tuning subset (a `sql/` query over the scores) and the mislabel report."""

import math
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from assets_defs.influence import influence_scores
from assets_defs.metadata import markdown_table, summary_metadata, timed
from pipelines.resources import HyperinfConfigResource

_PREVIEW_ROWS = 10


@dg.asset(
    deps=[influence_scores],
    group_name="curation",
    kinds={"duckdb", "parquet"},
    description="The configured `sql/` curation query over the scores, exported as Parquet + JSONL + "
                "manifest.json (query text, parameters, Lance versions); the DuckDB file is re-synced.",
)
def curated_subset(context: dg.AssetExecutionContext, hyperinf: HyperinfConfigResource) -> dg.MaterializeResult:
    from hyperinf_ops import steps

    summary, wall = timed(steps.curate, hyperinf.config, hyperinf.store, log=context.log.info)
    parquet = summary.files["parquet"]
    preview = pq.read_table(parquet).slice(0, _PREVIEW_ROWS).to_pylist()
    return dg.MaterializeResult(metadata={
        "dagster/row_count": summary.rows,
        "parquet": dg.MetadataValue.path(parquet),
        "jsonl": dg.MetadataValue.path(summary.files["jsonl"]),
        "manifest": dg.MetadataValue.path(str(Path(summary.out_dir) / "manifest.json")),
        **summary_metadata(summary, skip=("seconds", "files", "out_dir")),
        "preview": markdown_table(preview),
        "wall_time_s": wall,
    })


@dg.asset_check(
    asset=curated_subset,
    description="The exported subset is non-empty, no larger than the pool, free of duplicate ids, and "
                "(for a `fraction` parameter) holds ceil(fraction x pool) examples.",
)
def curated_subset_size(hyperinf: HyperinfConfigResource) -> dg.AssetCheckResult:
    cfg, store = hyperinf.config, hyperinf.store
    path = cfg.storage_root / "exports" / cfg.curation.query / "subset.parquet"
    n_pool = store.open("examples").count_rows()
    ids = pq.read_table(path, columns=["sample_id"])["sample_id"].to_pylist()
    fraction = cfg.curation.params.get("fraction")
    expected = math.ceil(fraction * n_pool) if isinstance(fraction, int | float) else None
    problems = []
    if not ids:
        problems.append("the subset is empty")
    if len(ids) > n_pool:
        problems.append(f"{len(ids)} rows for a pool of {n_pool}")
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} duplicate sample ids")
    if expected is not None and len(ids) != expected:
        problems.append(f"{len(ids)} rows, expected ceil({fraction} x {n_pool}) = {expected}")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or None,
        metadata={"rows": len(ids), "pool_rows": n_pool, "share_of_pool": round(len(ids) / max(n_pool, 1), 4),
                  **({"expected_rows": expected} if expected is not None else {})},
    )


@dg.asset(
    deps=[influence_scores],
    group_name="curation",
    description="How well each estimator's most harmful examples find mislabeled ones: AUROC and share of "
                "flips found in the 10% / 20% most harmful (needs a boolean `flipped` pool column), plus the "
                "most harmful examples with text and label.",
)
def mislabel_report(context: dg.AssetExecutionContext, hyperinf: HyperinfConfigResource) -> dg.MaterializeResult:
    from hyperinf_ops import steps

    report, wall = timed(steps.mislabel_report, hyperinf.config, hyperinf.store)
    methods = [{"estimator": m, **r} for m, r in report.methods.items()]
    if report.has_truth:
        context.log.info("mislabel AUROC: " + ", ".join(f"{m} {r['auroc']:.3f}" for m, r in report.methods.items()))
    return dg.MaterializeResult(metadata={
        **summary_metadata(report, skip=("methods", "most_harmful")),
        **{f"auroc/{m}": dg.MetadataValue.float(r["auroc"]) for m, r in report.methods.items()},
        "detection": markdown_table(methods),
        "most_harmful": markdown_table(report.most_harmful,
                                       [c for c in ("rank", "score", "sample_id", "label", "text")
                                        if report.most_harmful and c in report.most_harmful[0]]),
        "wall_time_s": wall,
    })
