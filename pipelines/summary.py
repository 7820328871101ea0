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
    adapter = latest_metadata(instance, "lora_adapter")
    if adapter.get("heldout_source"):
        accuracy, majority = adapter.get("heldout_accuracy"), adapter.get("majority_class_accuracy")
        print(f"\nWarm-up adapter on {adapter['heldout_source']}: "
              + (f"accuracy {accuracy:.3f} (always predicting the majority class: {majority:.3f})"
                 if accuracy is not None and majority is not None else f"loss {adapter.get('heldout_loss'):.4f}"))
    change = _pool_change(cfg)
    if change:
        print(f"  the pool has changed by {change:.1%} since the warm-up trained it (new, edited or removed "
              "examples): the scores are this adapter's, equal to a from-scratch run under it, not a fresh warm-up's; "
              f"it is trained again past train.retrain_share ({cfg.train.retrain_share:.0%})")
    report = latest_metadata(instance, "mislabel_report")
    aurocs = {key.split("/", 1)[1]: value for key, value in report.items() if key.startswith("auroc/")}
    if aurocs:
        print(f"\nMislabel detection on target set {report.get('target_set')!r} "
              f"({report.get('flipped')} of {report.get('examples')} labels flipped), AUROC:")
        width = max(map(len, aurocs))
        for method, auroc in sorted(aurocs.items(), key=lambda kv: -kv[1]):
            print(f"  {method:<{width}}  {auroc:.3f}")
        print("  (AUROC: the chance that a flipped example ranks as more harmful than a clean one; 0.5 = no better "
              "than random order. fused: the loss, influence and probe rankings combined by rank; loss, margin, "
              "aum, probe and self_influence_* need no target set.)")
    subset = latest_metadata(instance, "curated_subset")
    if subset:
        chosen = f", chosen by the evaluation: {subset['chosen']}" if subset.get("chosen") else ""
        print(f"\nCurated subset ({subset.get('query')} {subset.get('params')}{chosen}): "
              f"{subset.get('dagster/row_count')} examples" + (f", {subset['relabelled']} labels replaced"
                                                               if subset.get("relabelled") else ""))
        labels = subset.get("labels")
        if labels is not None and labels.records:
            print("  kept per label: " + ", ".join(f"{r.data['label']} {r.data['subset']} of {r.data['pool']}"
                                                   for r in labels.records))
        if "flipped_pool" in subset:
            print(f"  flipped labels removed: {subset['flipped_removed']:.0f} of {subset['flipped_pool']:.0f} "
                  f"(a random subset of the same size removes {subset['flipped_removed_at_random']:.1f} on average)")
        print(f"  {subset.get('parquet')}\n  {subset.get('jsonl')}\n  {subset.get('manifest')}")
    evaluation = latest_metadata(instance, "evaluation")
    if evaluation.get("results") is not None:
        from hyperinf_ops.stages.evaluation_plan import subset_label

        print(f"\nEvaluation (validation half {evaluation.get('validation_examples')} examples: chooses; test half "
              f"{evaluation.get('test_examples')}: reported), mean over seeds; chosen: {evaluation.get('chosen')}")
        for r in (rec.data for rec in evaluation["results"].records):
            acc = "" if r["test_accuracy"] is None else f"test accuracy {r['test_accuracy']:.3f}" + (
                f" ± {r['test_accuracy_std']:.3f}" if r["test_accuracy_std"] is not None else "") + ", "
            print(f"  {subset_label(r):<28} {r['n_examples']:>6} examples  {acc}test loss {r['test_loss']:.4f}"
                  + (f", {r['n_flipped']:.0f} labels wrong" if r["n_flipped"] is not None else ""))
    config = str(config_path)
    print("\nNext:")
    print(f"  hyperinf ui --config {config}     # Dagster UI: asset graph, runs, checks, metadata")
    print(f"  hyperinf sql --config {config} \"SELECT target_set, method, count(*), avg(score) FROM scores GROUP BY 1, 2\"")
    target = report.get("target_set") or next(iter(cfg.targets))
    print(f"  hyperinf sql --config {config} mislabel_candidates --param target_set={target} "
          f"--param method={cfg.estimators[0]} --param n=10")
    print(f"  hyperinf shell --config {config}     # an SQL prompt over the tables ({DUCKDB_FILE}: the same tables "
          "for any DuckDB 1.x shell)")
    print(f"  (Dagster instance: DAGSTER_HOME={home})")


def _pool_change(cfg: HyperinfConfig) -> float | None:
    """stages.adapter.pool_change of the current adapter (None: none, or one no warm-up trained here)."""
    from hyperinf_ops.adapters import AdapterStore
    from hyperinf_ops.stages.adapter import pool_change
    from hyperinf_ops.store import LanceStore

    current = AdapterStore(cfg.storage_root).current()
    return None if current is None else pool_change(LanceStore(str(cfg.storage_root)), current)
