"""What ``hyperinf demo`` / ``hyperinf run`` print at the end: read back from the Dagster instance, so the
numbers are the ones the UI shows."""

from pathlib import Path

import dagster as dg

from hyperinf_ops.config import HyperinfConfig
from hyperinf_ops.query import DUCKDB_FILE


def latest_metadata(instance: dg.DagsterInstance, asset: str) -> dict:
    """Metadata values (plain Python) of an asset's latest materialization; {} if never materialized."""
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def print_summary(instance: dg.DagsterInstance, cfg: HyperinfConfig, config_path: Path, home: Path) -> None:
    """Mislabel AUROC per estimator, the curated subset, and where to look next."""
    report = latest_metadata(instance, "mislabel_report")
    aurocs = {key.split("/", 1)[1]: value for key, value in report.items() if key.startswith("auroc/")}
    if aurocs:
        print(f"\nMislabel detection on target set {report.get('target_set')!r} "
              f"({report.get('flipped')} of {report.get('examples')} labels flipped), AUROC:")
        width = max(map(len, aurocs))
        for method, auroc in sorted(aurocs.items(), key=lambda kv: -kv[1]):
            print(f"  {method:<{width}}  {auroc:.3f}")
    subset = latest_metadata(instance, "curated_subset")
    if subset:
        print(f"\nCurated subset ({subset.get('query')}): {subset.get('dagster/row_count')} examples")
        print(f"  {subset.get('parquet')}\n  {subset.get('jsonl')}\n  {subset.get('manifest')}")
    config = str(config_path)
    print("\nNext:")
    print(f"  hyperinf ui --config {config}     # Dagster UI: asset graph, runs, checks, metadata")
    print(f"  hyperinf sql --config {config} \"SELECT target_set, method, count(*), avg(score) FROM scores GROUP BY 1, 2\"")
    target = report.get("target_set") or next(iter(cfg.targets))
    print(f"  hyperinf sql --config {config} mislabel_candidates --param target_set={target} "
          f"--param method={cfg.estimators[0]} --param n=10")
    print(f"  duckdb {cfg.storage_root / DUCKDB_FILE}     # the synced tables, from any DuckDB shell")
    print(f"  (Dagster instance: DAGSTER_HOME={home})")
