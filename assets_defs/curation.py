"""The curated fine-tuning subset (a `sql/` query over the scores, or the evaluation's choice) and the mislabel
report."""

import math

import dagster as dg

from assets_defs.automation import step_asset
from assets_defs.evaluation import evaluation, evaluation_plan
from assets_defs.influence import curation_pair, influence_scores
from assets_defs.metadata import column_schema, summary_metadata, table_metadata, timed
from assets_defs.resources import HyperinfResource
from hyperinf_ops.location import Location


def chosen_curation(hyperinf: HyperinfResource, log=None) -> tuple[str, dict, dict]:
    """(query, params, report) the export runs: the configured ones, or under `curation.method: auto` the
    evaluation's choice (stages.evaluation_plan.choose; the full pool = drop_harmful with fraction 0), with the
    candidates' table for the manifest."""
    cfg = hyperinf.config
    if not cfg.curation_auto:
        return cfg.curation.query, dict(cfg.curation.params), {}
    from hyperinf_ops.stages.evaluation import EVALUATION_TABLE
    from hyperinf_ops.stages.evaluation_plan import choose
    from hyperinf_ops.tasks import get_task

    plan, store = evaluation_plan(cfg), hyperinf.store
    rows = store.open(EVALUATION_TABLE).to_table().to_pylist() if store.exists(EVALUATION_TABLE) else []
    choice = choose(rows, plan, has_classes=get_task(cfg.task).has_classes)
    query, params = choice.export(plan)
    if log:
        log(f"curation.method auto: {choice.name} has the best {choice.metric.replace('_', ' ')}; exporting "
            f"{query}{params}")
    return query, params, {"chosen": choice.name, "chosen_by": choice.metric, "evaluation": choice.table}


@step_asset(
    group="curation", kinds={"duckdb", "parquet"}, code_version="5",
    deps=[influence_scores, evaluation],
    description="The curated fine-tuning set, exported as Parquet + JSONL + manifest.json (query text, parameters, "
                "Lance versions, what it did to the labels): the configured `sql/` curation query over the scores, "
                "or under `curation.method: auto` the candidate the evaluation measured best on its validation "
                "half (the manifest names it and lists every candidate). The DuckDB file is re-synced.",
)
def curated_subset(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.export import update_manifest
    from hyperinf_ops.stages.curation import curate, refuse_unlearned_warmup, subset_preview

    cfg = hyperinf.config
    if cfg.curation.require_warmup:
        refuse_unlearned_warmup(cfg.storage_root)
    query, params, report = chosen_curation(hyperinf, log=context.log.info)
    summary, wall = timed(curate, hyperinf.store, query, params, name=cfg.export_name, retention=cfg.retention,
                          log=context.log.info)
    if report:
        update_manifest(summary.out_dir, **report)
    parquet = summary.files["parquet"]
    flipped = summary.flipped or {}
    return dg.MaterializeResult(metadata={
        "dagster/row_count": summary.rows,
        **({"chosen": dg.MetadataValue.text(report["chosen"]),
            "candidates": table_metadata(report["evaluation"])} if report else {}),
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
    description="The exported subset is non-empty, no larger than the pool, free of duplicate ids, and holds the "
                "size its query promises: top_fraction ceil(fraction x pool) examples (with `balance`: the sum "
                "over labels of ceil(fraction x label's pool examples)), drop_harmful the pool less "
                "ceil(fraction x pool), relabel the whole pool.",
)
def curated_subset_size(hyperinf: HyperinfResource) -> dg.AssetCheckResult:
    from hyperinf_ops.export import Manifest
    from hyperinf_ops.stages.curation import export_dir

    cfg, store = hyperinf.config, hyperinf.store
    folder = export_dir(cfg.storage_root, cfg.export_name)
    manifest = Manifest.load(folder)
    n_pool = store.open("examples").count_rows()
    ids = (folder / "subset.parquet").read_parquet(["sample_id"])["sample_id"].to_pylist()
    expected = _expected_size(store, manifest.query_name, manifest.params, n_pool)
    problems = []
    if not ids:
        problems.append("the subset is empty")
    if len(ids) > n_pool:
        problems.append(f"{len(ids)} rows for a pool of {n_pool}")
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} duplicate sample ids")
    if expected is not None and len(ids) != expected:
        problems.append(f"{len(ids)} rows, expected {expected} ({manifest.query_name} {manifest.params} of "
                        f"{n_pool})")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or None,
        metadata={"rows": len(ids), "pool_rows": n_pool, "share_of_pool": round(len(ids) / max(n_pool, 1), 4),
                  **({"expected_rows": expected} if expected is not None else {})},
    )


def _expected_size(store, query: str, params: dict, n_pool: int) -> int | None:
    """The row count `query` promises for `params` over a pool of n_pool scored examples (None: no promise)."""
    fraction = params.get("fraction")
    if query == "relabel":
        return n_pool
    if not isinstance(fraction, int | float) or query not in ("top_fraction", "drop_harmful"):
        return None
    if query == "drop_harmful":
        return n_pool - _share(fraction, n_pool)
    sizes = [n_pool]
    if params.get("balance") is True:
        sizes = store.open("examples").to_table(columns=["label"]).group_by("label").aggregate(
            [("label", "count")])["label_count"].to_pylist()
    return sum(_share(fraction, n) for n in sizes)


def _share(fraction: float, n: int) -> int:
    """The SQL files' count of a fraction of n rows: ceil(round(fraction * n, 9)) (0.07 x 100 is 7, not 8)."""
    return math.ceil(round(fraction * n, 9))


@step_asset(
    group="curation", kinds=set(), code_version="4",
    deps=[influence_scores],
    description="How well each ranking's most harmful examples find mislabeled ones: AUROC and share of flips "
                "found in the 10% / 20% / 30% most harmful (needs a boolean `flipped` pool column), for the target "
                "set's rankings (estimators, hyperinf_cp, fused) and the target-free ones (self-influence, loss, "
                "margin, aum, confident); how many label issues are flips and how many suggested labels are the "
                "truth; the most harmful examples with text and label. Reads the stored tables only.",
)
def mislabel_report(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.reports import mislabel_report as report_of

    cfg, store = hyperinf.config, hyperinf.store
    target, method = cfg.evaluation_target, curation_pair(hyperinf)[1]
    stored = sorted(set(store.open("scores").to_table(columns=["method"], filter=f"target_set = '{target}'")
                        ["method"].to_pylist()))
    first = method if method in stored else "fused"
    report, wall = timed(report_of, store, [first, *(m for m in stored if m != first)], target_set=target,
                         task=cfg.task)
    rows = [{"ranking": m, **r} for m, r in report.methods.items()]
    if report.has_truth:
        context.log.info("mislabel AUROC: " + ", ".join(f"{m} {r['auroc']:.3f}" for m, r in report.methods.items()))
    return dg.MaterializeResult(metadata={
        "detection": table_metadata(rows),
        "most_harmful": table_metadata(report.most_harmful),
        **({"label_suggestions": table_metadata([report.suggestions])} if report.suggestions else {}),
        **summary_metadata(report, skip=("methods", "most_harmful", "suggestions")),
        **{f"auroc/{m}": dg.MetadataValue.float(r["auroc"]) for m, r in report.methods.items()},
        "wall_time_s": wall,
    })
