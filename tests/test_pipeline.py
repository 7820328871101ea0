"""The Dagster graph end to end on a tiny random BERT, launched as `hyperinf run` launches it: every asset,
every check, runs that carry the code location's origin, the curated subset, the evaluation, re-runs that
compute nothing twice, one batched solve per refresh, a warm-up that learns nothing failing its check, and bad
input that fails the right asset and overwrites nothing."""

import json
import math
import shutil
from pathlib import Path
from unittest import mock

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hyperinf_project import make_project, write_shard
from tiny_models import save_tiny_model

from assets_defs import ASSET_CHECKS, ASSETS
from hyperinf_ops.config import load_config
from hyperinf_ops.config.sections import DROP_ISSUES_MAX_FRACTION
from hyperinf_ops.preconditioners import exact as exact_module
from hyperinf_ops.preconditioners import hyperinf as hyperinf_module
from hyperinf_ops.query import connect, run_query
from hyperinf_ops.store import LanceStore
from pipelines.definitions import build_definitions
from pipelines.launcher import PipelineRunError, failure_message
from pipelines.runner import failed_checks, materialize_all

ROW_TABLES = ("examples", "targets", "gradients", "curvature", "queries", "scores", "evaluation")
# The built project's evaluation: 2 seeds x (full + oracle + 3 queries x 2 rankings + a random subset of each
# smaller size) fits; `curation.method: auto` exports the validation winner.
EVALUATION = {"test": {"path": "test/test.parquet"}, "queries": ["drop_harmful", "drop_issues", "relabel"],
              "fractions": [0.2], "seeds": 2, "methods": ["fused", "loss"]}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    """A 200-example project (with an evaluation) materialized once; yields (config path, instance, run report)."""
    cfg_path = make_project(tmp_path_factory.mktemp("project"), tiny_model, evaluation=EVALUATION)
    with dg.instance_for_test() as instance:
        report = materialize_all(instance, cfg_path, load_config(cfg_path), log=lambda _: None)
        yield cfg_path, instance, report


def _row_counts(store: LanceStore) -> dict[str, int]:
    return {t: store.open(t).count_rows() for t in ROW_TABLES}


def _meta(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> dict:
    """Metadata of the asset's (partition's) latest materialization."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_definitions_load():
    defs = build_definitions("unused.yaml")
    dg.Definitions.validate_loadable(defs)
    keys = {a.key.to_user_string() for a in ASSETS}
    assert keys == {"pool_files", "pool_examples", "target_sets", "lora_adapter", "row_codec", "lora_gradients",
                    "cross_fit", "checkpoint_scores", "preconditioners", "target_queries", "influence_scores",
                    "curated_subset", "mislabel_report", "evaluation"}
    assert len(ASSET_CHECKS) == 4
    assert {j for j in ("shard_job", "adapter_job", "refresh_job") if defs.resolve_job_def(j)} == {
        "shard_job", "adapter_job", "refresh_job"}
    # every computed asset says what its code is, so a changed step marks its output stale in the UI
    assert all(a.code_versions_by_key[a.key] for a in ASSETS if a.is_executable and a.key.path != ["pool_files"])


def test_whole_graph_runs_as_code_location_runs_and_every_check_passes(built):
    _, instance, report = built
    # 2 ingest, 1 adapter, 2 gradient shards, 1 refresh: all of them runs of the hyperinf code location, the
    # kind the UI lists on its Overview timeline and on each job's Runs tab (execute_in_process runs are not)
    assert [r.job_name for r in report.runs] == ["shard_job"] * 2 + ["adapter_job"] + ["shard_job"] * 2 + ["refresh_job"]
    assert report.ingested == report.gradients == ["shard-0", "shard-1"] and report.adapter
    assert all(r.is_success for r in report.runs)
    for run in report.runs:
        assert run.remote_job_origin.repository_origin.get_label() == "__repository__@hyperinf"
        assert run.tags_for_storage()[".dagster/repository"] == "__repository__@hyperinf"
    assert failed_checks(instance, report.runs) == []
    evaluations = [r.event_log_entry.dagster_event.event_specific_data for run in report.runs
                   for r in instance.get_records_for_run(run.run_id,
                                                         of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records]
    assert {e.check_name for e in evaluations} == {
        "gradients_finite", "gradient_rows_match_pool", "inverses_converged", "scores_cover_pool",
        "agreement_with_exact", "curated_subset_size", "warmup_learns"}
    assert len([e for e in evaluations if e.check_name == "gradients_finite"]) == 2  # one per shard


def test_metadata_and_data_versions(built):
    cfg_path, instance, _ = built
    assert _meta(instance, "preconditioners")["all_converged"] is True
    scores = _meta(instance, "influence_scores")
    assert scores["histogram"].startswith("![clean / hyperinf](data:image/png;base64,")
    assert len(scores["most_harmful (curation target/method)"].records) == 10
    assert scores["dagster/row_count"] == 200
    report = _meta(instance, "mislabel_report")
    assert set(report) >= {"auroc/hyperinf", "auroc/datainf", "auroc/tracin", "detection", "most_harmful"}
    adapter = _meta(instance, "lora_adapter")
    assert adapter["source"] == "trained" and adapter["heldout_source"] == "target set clean (not trained on)"
    assert adapter["heldout_accuracy"] > adapter["majority_class_accuracy"]  # the warm-up check's condition
    assert [r.data["epoch"] for r in adapter["training"].records] == list(range(11))  # 0 = before training
    # inline (issue 19): the per-epoch values as text, with a sparkline when it fits
    assert "**warm-up per epoch (0 = before training)** (epoch: 0 / 1 / 2 / 3" in adapter["curve"]
    assert "- held-out accuracy" in adapter["curve"] and len(adapter["curve"]) < 1000
    subset = _meta(instance, "curated_subset")
    kept = [r.data for r in subset["labels"].records]
    assert sum(r["subset"] for r in kept) == subset["dagster/row_count"]
    n = subset["dagster/row_count"]
    assert subset["flipped_pool"] == 40 and subset["flipped_removed_at_random"] == pytest.approx(40 * (1 - n / 200), abs=0.01)
    assert subset["chosen"] == _meta(instance, "evaluation")["chosen"]  # auto: the evaluation's winner
    assert _meta(instance, "pool_examples", "shard-0")["written"] is True
    # data versions: the adapter's is its hash, a gradient shard's is what it was computed under and from
    adapter = instance.get_latest_data_version_record(dg.AssetKey("lora_adapter"))
    assert adapter.asset_materialization.tags["dagster/data_version"] == _meta(instance, "lora_adapter")["adapter_hash"]
    shard = instance.get_latest_data_version_record(dg.AssetKey("lora_gradients"), partition_key="shard-0")
    assert len(shard.asset_materialization.tags["dagster/data_version"]) == 32


def _metadata_values(instance: dg.DagsterInstance, asset: str) -> dict[str, dg.MetadataValue]:
    """The latest materialization's metadata as stored (typed values, not their contents)."""
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
    return dict(records[0].asset_materialization.metadata)


def _columns(table: dg.TableMetadataValue) -> list[str]:
    return [c.name for c in table.schema.columns]


def test_asset_pages_show_tables_inline(built):
    """What the UI shows at a glance: native tables with a schema (inline, every column) instead of Markdown
    tables, at most one Markdown block per asset and none of 1000 characters or more (the UI hides those
    behind a link; the warm-up and evaluation plots included), examples with the pool's `flipped` column,
    the subset preview without the 64-character content hash, and the tables' column schemas."""
    _, instance, _ = built
    for asset in ("pool_examples", "target_sets", "lora_adapter", "row_codec", "preconditioners", "target_queries",
                  "influence_scores", "curated_subset", "mislabel_report", "evaluation"):
        markdown = {k: v.value for k, v in _metadata_values(instance, asset).items()
                    if isinstance(v, dg.MarkdownMetadataValue)}
        assert len(markdown) <= 1, (asset, list(markdown))
        assert all(len(md) < 1000 for md in markdown.values()), asset
    tables = {asset: {k: v for k, v in _metadata_values(instance, asset).items()
                      if isinstance(v, dg.TableMetadataValue)}
              for asset in ("target_sets", "preconditioners", "target_queries", "influence_scores",
                            "curated_subset", "mislabel_report")}
    assert all(t.schema is not None and t.records for ts in tables.values() for t in ts.values())
    assert _columns(tables["preconditioners"]["solver_health"])[:3] == ["matrix", "iterations", "residual"]
    # per target set 3 estimators + hyperinf_cp + fused; self: 2 self-influence + loss, margin, aum, probe
    assert len(tables["influence_scores"]["score_stats"].records) == 11
    example_tables = [tables["influence_scores"]["most_harmful (curation target/method)"],
                      tables["influence_scores"]["most_helpful (curation target/method)"],
                      tables["mislabel_report"]["most_harmful"]]
    for table in example_tables:  # the pool's carry column `flipped`, typed, before the text
        assert _columns(table) == ["rank", "score", "sample_id", "label", "flipped", "text"]
        assert {c.name: c.type for c in table.schema.columns}["flipped"] == "bool"
    harmful = [r.data for r in tables["mislabel_report"]["most_harmful"].records]
    assert [r["rank"] for r in harmful] == list(range(200, 190, -1))  # most harmful first
    assert sum(r["flipped"] for r in harmful) >= 1
    preview = tables["curated_subset"]["preview"]
    assert _columns(preview) == ["rank", "score", "sample_id", "label", "flipped", "text"]  # no content_hash
    assert [r.data["rank"] for r in preview.records] == list(range(1, 11))
    detection = [r.data["ranking"] for r in tables["mislabel_report"]["detection"].records]
    assert detection == ["hyperinf", "datainf", "fused", "hyperinf_cp", "tracin", "aum", "self_influence_hyperinf",
                         "loss", "margin", "probe", "self_influence_tracin"]  # the curation's method first
    schemas = {asset: _metadata_values(instance, asset)["dagster/column_schema"].schema
               for asset in ("target_sets", "influence_scores", "curated_subset")}
    assert {"sample_id", "target_set", "method", "score", "rank"} <= {c.name for c in schemas["influence_scores"].columns}
    assert "influence_score" in {c.name for c in schemas["curated_subset"].columns}
    shard = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("pool_examples"),
                                                                  asset_partitions=["shard-0"]), limit=1).records[0]
    assert "flipped" in {c.name for c in shard.asset_materialization.metadata["dagster/column_schema"].schema.columns}


def test_short_ids_and_inline_histogram():
    """Hash ids shrink to 12 characters in tables, readable ids stay; the histogram stays under the UI's
    1000-character inline limit whatever the number of scores."""
    import numpy as np

    from assets_defs.metadata import histogram_markdown, short_id, table_metadata

    assert short_id("0123456789abcdef") == "0123456789ab"
    assert short_id("shard-0-0001") == "shard-0-0001" and short_id(None) is None
    row = table_metadata([{"sample_id": "f" * 64, "text": "word " * 100}]).records[0].data
    assert row["sample_id"] == "f" * 12 and len(row["text"]) == 80
    rng = np.random.default_rng(0)
    for values in (rng.normal(size=20), rng.uniform(-1, 1, size=100_000)):
        markdown = histogram_markdown(values, title="clean / hyperinf").value
        assert markdown.startswith("![clean / hyperinf](data:image/png;base64,") and len(markdown) < 1000


def test_curated_subset_matches_sql_on_scores(built, tmp_path):
    """A fixed curation (the stage `curated_subset` runs for `curation.method: fixed`): exactly the SQL's rows."""
    from hyperinf_ops.stages.curation import curate

    cfg_path, _, _ = built
    cfg = load_config(cfg_path)
    store = LanceStore(str(cfg.storage_root))
    params = {"target_set": "clean", "method": "hyperinf", "fraction": 0.5, "balance": True}
    summary = curate(store, "top_fraction", params, name="test_fixed", log=lambda _: None)
    subset = pq.read_table(summary.files["parquet"]).to_pandas()
    con = connect(store)
    expected = run_query(con, "top_fraction", params).to_pandas()
    con.close()
    labels = store.open("examples").to_table(columns=["label"])["label"]
    assert len(subset) == sum(math.ceil(0.5 * c["counts"]) for c in labels.value_counts().to_pylist())  # balanced
    assert subset["sample_id"].tolist() == expected["sample_id"].tolist()
    assert subset["influence_score"].tolist() == pytest.approx(expected["score"].tolist())
    assert not subset["relabelled"].any() and (subset["label"] == subset["original_label"]).all()


def test_relabel_export_keeps_every_example_and_the_original_labels(built):
    """relabel: every pool example; among the 30% most harmful by fused, those whose suggested label differs get
    it (`label`), with `original_label` and `relabelled`; the report counts corrections against the truth."""
    from hyperinf_ops.stages.curation import curate

    cfg_path, _, _ = built
    cfg = load_config(cfg_path)
    store = LanceStore(str(cfg.storage_root))
    summary = curate(store, "relabel", {"target_set": "clean", "method": "fused", "fraction": 0.3},
                     name="test_relabel", log=lambda _: None)
    subset = pd.read_parquet(summary.files["parquet"]).set_index("sample_id")
    con = connect(store)
    suggestions = con.sql("SELECT sample_id, label, suggested_label FROM label_suggestions").df().set_index("sample_id")
    fused = con.sql("SELECT sample_id, rank FROM scores WHERE target_set = 'clean' AND method = 'fused'").df()
    examples = con.sql("SELECT sample_id, label, flipped FROM examples").df().set_index("sample_id")
    con.close()
    assert len(subset) == 200 and set(subset.index) == set(examples.index)
    harmful = set(fused.loc[fused["rank"] > 200 - math.ceil(0.3 * 200), "sample_id"])
    changed = {i for i in harmful if suggestions.loc[i, "suggested_label"] != suggestions.loc[i, "label"]}
    assert set(subset.index[subset["relabelled"]]) == changed and changed
    assert (subset.loc[list(changed), "label"] == suggestions.loc[list(changed), "suggested_label"]).all()
    assert (subset["original_label"] == examples.loc[subset.index, "label"]).all()
    kept = subset.index[~subset["relabelled"]]
    assert (subset.loc[kept, "label"] == subset.loc[kept, "original_label"]).all()
    flipped = examples["flipped"].astype(bool)
    corrected = sum(bool(flipped[i]) for i in changed)  # two classes: a relabelled flip gets its true label
    assert summary.relabelled == len(changed)
    assert (summary.flipped["corrected"], summary.flipped["broken"]) == (corrected, len(changed) - corrected)
    assert summary.flipped["still_wrong"] == int(flipped.sum()) - corrected + (len(changed) - corrected)
    # the manifest reproduces the rows and their labels (the suggestions' Lance version is pinned with the rest)
    from hyperinf_ops.export import Manifest, reproduce

    again = reproduce(Manifest.load(summary.out_dir)).to_pandas().set_index("sample_id")
    assert again["label"].sort_index().equals(subset["label"].sort_index())
    assert again["relabelled"].sort_index().equals(subset["relabelled"].sort_index())


def test_evaluation_fits_every_candidate_and_auto_exports_the_validation_winner(built):
    cfg_path, instance, _ = built
    cfg = load_config(cfg_path)
    store = LanceStore(str(cfg.storage_root))
    con = connect(store)  # what `hyperinf sql` reads
    rows = con.sql("SELECT * FROM evaluation ORDER BY seed, subset, candidate").to_arrow_table().to_pylist()
    examples = {i: (lab, f) for i, lab, f in con.sql("SELECT sample_id, label, flipped FROM examples").fetchall()}
    subsets = {}
    for q in ("drop_harmful", "drop_issues", "relabel"):
        for m in ("fused", "loss"):
            params = {"target_set": "self" if m == "loss" else "clean", "method": m,
                      **({"max_fraction": DROP_ISSUES_MAX_FRACTION} if q == "drop_issues" else {"fraction": 0.2})}
            subsets[f"{q}({m}{'' if q == 'drop_issues' else ', 0.2'})"] = run_query(con, q, params).to_pylist()
    n_issues = con.execute("SELECT count(*) FROM label_suggestions WHERE issue").fetchone()[0]
    con.close()
    dropped = min(n_issues, math.ceil(DROP_ISSUES_MAX_FRACTION * 200))
    sizes = sorted({160, 200 - dropped} - {200}, reverse=True)
    assert sorted((r["seed"], r["subset"], r["candidate"] or "") for r in rows) == sorted(
        (seed, s, c) for seed in (0, 1) for s, c in [("full", ""), ("oracle", ""), *(("curated", c) for c in subsets),
                                                     *(("random", "") for _ in sizes)])
    for r in rows:
        assert r["validation_examples"] == r["test_examples"] == 20  # the 40 test rows, halved
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["validation_accuracy"] <= 1 and r["test_loss"] > 0
        assert sum(json.loads(r["label_counts"]).values()) == r["n_examples"]
        if r["subset"] == "full":
            assert (r["n_examples"], r["n_flipped"], r["n_relabelled"]) == (200, 40, 0)
        if r["subset"] == "oracle":  # the pool without its planted flips
            assert (r["n_examples"], r["n_flipped"]) == (160, 0)
        if r["subset"] == "random":
            assert r["n_examples"] in sizes and r["n_relabelled"] == 0
        if r["subset"] != "curated":
            continue
        # exactly the query's rows and labels: the flips still wrong counted by hand (two classes: a relabelled
        # flip is corrected, a relabelled clean example broken)
        selected = subsets[r["candidate"]]
        new = {x["sample_id"]: x["new_label"] for x in selected if x.get("new_label") is not None}
        wrong = sum(examples[x["sample_id"]][1] != (x["sample_id"] in new) for x in selected)
        assert (r["n_examples"], r["n_relabelled"], r["n_flipped"]) == (len(selected), len(new), wrong)
        assert r["query"] in r["candidate"] and (r["target_set"] == "self") == (r["method"] == "loss")
        if r["query"] == "relabel":
            assert len(selected) == 200 and all(new[i] != examples[i][0] for i in new)
        if r["query"] == "drop_issues":
            assert len(selected) == 200 - dropped
    meta = _meta(instance, "evaluation")
    assert meta["fits"] == len(rows) == 2 * (2 + 6 + len(sizes)) and meta["reused"] == 0
    assert meta["plot"].startswith("![mean test accuracy")
    # the winner: the best mean validation accuracy over seeds, by hand (ties: the full pool, then config order)
    mean_val = {}
    for r in rows:
        if r["subset"] in ("full", "curated"):
            mean_val.setdefault(r["candidate"] or "full pool", []).append(r["validation_accuracy"])
    order = ["full pool", *[c.name for c in cfg.evaluation_candidates]]
    best = max(order, key=lambda c: (sum(mean_val[c]) / 2, -order.index(c)))
    assert meta["chosen"] == best
    manifest = json.loads((cfg.storage_root / "exports" / "auto" / "manifest.json").read_text())
    assert manifest["report"]["chosen"] == best and manifest["report"]["chosen_by"] == "validation_accuracy"
    assert {r["candidate"] or r["subset"] for r in manifest["report"]["evaluation"]} >= {"full", "oracle", *subsets}
    exported = pd.read_parquet(cfg.storage_root / "exports" / "auto" / "subset.parquet")
    winner = subsets.get(best, [{"sample_id": i} for i in examples])
    assert sorted(exported["sample_id"]) == sorted(x["sample_id"] for x in winner)
    assert manifest["report"]["flipped"]["pool"] == 40 and len(manifest["report"]["labels"]) == 2


def test_drop_rules_bench_drops_what_each_rule_says(built):
    """benchmarks/drop_rules.py on a finished store: each rule drops what it names (cleanlab's count, the flagged,
    the flagged with negative influence, a fifth, the planted flips), scored by the frozen-embedding probe."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from drop_rules import drop_rules

    cfg_path, _, _ = built
    cfg = load_config(cfg_path)
    con = connect(LanceStore(str(cfg.storage_root)))
    issues, harmful_issues = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE s.score < 0) FROM label_suggestions AS g JOIN scores AS s USING "
        "(sample_id) WHERE g.issue AND s.target_set = 'clean' AND s.method = 'hyperinf'").fetchone()
    con.close()
    result = drop_rules(cfg_path)
    dropped = {name: r["dropped"] for name, r in result["rules"].items()}
    assert result["n"] == 200 and result["issues"] == issues and result["flips"] == 40
    capped = min(issues, math.ceil(DROP_ISSUES_MAX_FRACTION * 200))  # sql/drop_issues.sql, the product's cut
    assert dropped == {"full": 0, "drop_issues": capped, "cleanlab": issues, "issues_harmful": harmful_issues,
                       "drop_harmful_0.2": 40, "random_k": issues, "oracle": 40}
    assert result["rules"]["oracle"]["flips_dropped"] == 40 and result["rules"]["full"]["flips_dropped"] == 0
    assert all(0 <= r["probe_accuracy"] <= 1 for r in result["rules"].values())


def test_auto_never_reads_the_test_rows_it_reports(tmp_path, tiny_model):
    """Only the test half changes (labels of the rows it holds, ids kept): every fit is made again, its
    validation numbers are the same, its test numbers move, and the choice does not."""
    evaluation = {"test": {"path": "test/test.parquet"}, "queries": ["drop_harmful", "relabel"], "fractions": [0.2],
                  "seeds": 1, "methods": ["fused"]}
    cfg_path = make_project(tmp_path, tiny_model, n_pool=120, evaluation=evaluation)
    cfg = load_config(cfg_path)
    store = LanceStore(str(cfg.storage_root))

    def outcome() -> tuple[str, dict, dict]:
        with dg.DagsterInstance.ephemeral() as instance:
            materialize_all(instance, cfg_path, cfg, log=lambda _: None)
            chosen = _meta(instance, "evaluation")["chosen"]
        rows = store.open("evaluation").to_table().to_pylist()
        key = [(r["candidate"] or r["subset"], r["n_examples"]) for r in rows]
        return (chosen, dict(zip(key, [r["validation_accuracy"] for r in rows], strict=True)),
                dict(zip(key, [(r["test_accuracy"], r["test_loss"]) for r in rows], strict=True)))

    chosen, validation, test = outcome()
    from hyperinf_ops.data.prepare import prepare_test
    from hyperinf_ops.stages.evaluation_plan import split_test

    test_file = tmp_path / "test" / "test.parquet"
    rows = prepare_test(test_file, cfg.data, cfg.task, ["neg", "pos"]).to_pylist()
    reported = {r["sample_id"] for r in split_test(rows, cfg.evaluation.validation)[1]}
    df = pd.read_parquet(test_file)
    swap = df["id"].isin(reported)
    df.loc[swap, "label"] = df.loc[swap, "label"].map({"pos": "neg", "neg": "pos"})
    df.to_parquet(test_file, index=False)
    again, validation_again, test_again = outcome()
    assert again == chosen and validation_again == validation
    assert all(test_again[k] != test[k] for k in test)  # the reported half did change under every fit


def test_untrainable_warmup_fails_its_check_with_the_message(tmp_path, tiny_model):
    """lr 1e-9: the adapter cannot move; the check fails with a message naming the majority class, both
    accuracies, where they were measured and what to change, and `hyperinf run` reports it."""
    with dg.DagsterInstance.ephemeral() as instance:
        _, defs, _, _ = _ingested(tmp_path, tiny_model, instance,
                                  train={"epochs": 1, "lr": 1.0e-9, "batch_size": 8, "seed": 0})
        target = pd.read_parquet(tmp_path / "targets" / "clean.parquet")
        pool = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "pool").glob("*.parquet"))])
        counts = pool["label"].value_counts()
        majority = min(counts.index, key=lambda c: (-counts[c], c))
        # a target set of the majority label only: the constant predictor is perfect there, so an adapter that
        # cannot move (lr 1e-9) is no better whatever its random head predicts
        target.assign(label=majority).to_parquet(tmp_path / "targets" / "clean.parquet", index=False)
        result = defs.resolve_job_def("adapter_job").execute_in_process(instance=instance)
        assert result.success  # advisory: the run goes on, the check is red
        check = [e for e in result.get_asset_check_evaluations() if e.check_name == "warmup_learns"][0]
        assert not check.passed
        assert check.description.startswith("the warm-up adapter is no better than always predicting the pool's "
                                            f"majority class {majority!r}: accuracy")
        assert "on target set clean (not trained on) (lr 1e-09, 1 epochs, batch 8): raise train.lr" in check.description
        assert failed_checks(instance, [result.dagster_run])[0].startswith("lora_adapter:warmup_learns: the warm-up")


def test_a_diverged_warmup_replaces_no_export_and_says_lower_the_lr(tmp_path, tiny_model):
    """lr 1e6: the warm-up diverges; its check says so and advises a lower lr, the refresh refuses to export
    from it, and the previous export stays current, byte for byte (issue 19, route 7)."""
    cfg_path = make_project(tmp_path, tiny_model, curation={  # learns: the first export is made
        "query": "top_fraction", "params": {"fraction": 0.5, "target_set": "clean", "method": "hyperinf"},
        "require_warmup": True})
    export = tmp_path / "store" / "exports" / "top_fraction"
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_all(instance, cfg_path, load_config(cfg_path), log=lambda _: None)
        before = {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()}
        doc = yaml.safe_load(cfg_path.read_text())
        doc["train"]["lr"] = 1.0e6
        cfg_path.write_text(yaml.safe_dump(doc))
        with pytest.raises(PipelineRunError, match=r"curated_subset failed: no curated subset exported \(the "
                           r"previous export, if any, stays current\): the warm-up diverged: loss on target set "
                           r"clean \(not trained on\) 0\.69\d* before training, .* after \(lr 1000000\.0, 10 "
                           r"epochs, batch 8\): lower train\.lr; or set curation\.require_warmup: false"):
            materialize_all(instance, cfg_path, load_config(cfg_path), log=lambda _: None)
        assert {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()} == before
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("lora_adapter"), "warmup_learns")])
        assert "diverged" in next(iter(check.values())).event.dagster_event.event_specific_data.description


def test_an_identical_rerun_writes_nothing_and_a_forced_refresh_duplicates_nothing(built):
    """An identical `hyperinf run` launches no Dagster run and writes no file of the store (issue 19, route 10:
    before, every rerun wrote 4 scores and 2 queries versions and a new identical export). With its record of the
    last refresh removed, it launches the one refresh, which reuses every stored inverse and fit."""
    cfg_path, instance, _ = built
    cfg = load_config(cfg_path)
    store = LanceStore(str(cfg.storage_root))
    root = Path(cfg.storage_root)

    def files() -> dict[str, int]:
        return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
                if p.is_file() and p.name != ".hyperinf.lease"}

    before, runs_before = files(), len(instance.get_run_records())
    report = materialize_all(instance, cfg_path, cfg, log=lambda _: None)
    assert report.runs == [] and not (report.ingested or report.adapter or report.gradients)
    assert files() == before and len(instance.get_run_records()) == runs_before

    counts = _row_counts(store)
    scores_before = store.open("scores").to_table().to_pandas().sort_values(["method", "sample_id"])
    (root / ".hyperinf.refresh.json").unlink()
    report = materialize_all(instance, cfg_path, cfg, log=lambda _: None)
    assert [r.job_name for r in report.runs] == ["refresh_job"]  # nothing changed: no ingest, adapter, gradients
    assert _row_counts(store) == counts
    after = store.open("scores").to_table().to_pandas().sort_values(["method", "sample_id"])
    assert after["score"].to_numpy() == pytest.approx(scores_before["score"].to_numpy(), rel=1e-6)
    assert _meta(instance, "preconditioners")["prepared"] == []  # the stored inverses still fit
    fits = _meta(instance, "evaluation")["fits"]
    assert _meta(instance, "evaluation")["reused"] == fits > 0
    assert (root / ".hyperinf.refresh.json").is_file()


def test_added_shard_computes_only_that_shard_and_one_solve_per_refresh(tmp_path, tiny_model):
    """`hyperinf run` twice, with a pool file added in between: the second run computes the new shard's
    gradients only (through Dagster runs), and each refresh inverts the curvature once (one batched Schulz
    solve for the tiny BERT's equal-width matrices, one batched Cholesky) although two target sets, four
    methods, self-influence and the agreement check all use the inverse (hyperinf_cp, which inverts the
    curvature of every earlier checkpoint, is off here)."""
    cfg_path = make_project(tmp_path, tiny_model, n_pool=80, n_target=10,
                            estimators=["hyperinf", "datainf", "tracin", "exact"], signals={"checkpoints": False})
    doc = yaml.safe_load(cfg_path.read_text())
    doc["targets"]["positive"] = {"where": "label = 'pos'"}
    cfg_path.write_text(yaml.safe_dump(doc))
    cfg = load_config(cfg_path)
    schulz = mock.patch.object(hyperinf_module, "schulz_with_options", wraps=hyperinf_module.schulz_with_options)
    cholesky = mock.patch.object(exact_module, "cholesky_inverses", wraps=exact_module.cholesky_inverses)
    with dg.instance_for_test() as instance, schulz as schulz_calls, cholesky as cholesky_calls:
        first = materialize_all(instance, cfg_path, cfg, log=lambda _: None)
        assert first.gradients == ["shard-0", "shard-1"]
        assert (schulz_calls.call_count, cholesky_calls.call_count) == (1, 1)
        write_shard(tmp_path / "pool", "shard-2", 30, seed=5)
        second = materialize_all(instance, cfg_path, cfg, log=lambda _: None)
        assert second.ingested == ["shard-2"] and not second.adapter and second.gradients == ["shard-2"]
        assert [r.tags.get("dagster/partition") for r in second.runs] == ["shard-2", "shard-2", None]
        assert (schulz_calls.call_count, cholesky_calls.call_count) == (2, 2)  # the curvature changed: once more
        assert [_meta(instance, "lora_gradients", s)["computed"] for s in ("shard-0", "shard-1", "shard-2")] == \
            [True, True, True]  # every shard was computed exactly once: shard-0/1 in the first run only
        materializations = instance.fetch_materializations(dg.AssetKey("lora_gradients"), limit=100).records
        assert sorted(r.partition_key for r in materializations) == ["shard-0", "shard-1", "shard-2"]
    store = LanceStore(str(cfg.storage_root))
    # 4 estimators and fused per target set; self: hyperinf, tracin, loss, margin, aum, probe
    assert store.open("scores").count_rows() == 110 * (5 * 2 + 6)


# ------------------------------------------------------------------------------------------------ bad input

def _fail(defs: dg.Definitions, instance, job: str, *, partition: str | None = None, assets=None) -> str:
    result = defs.resolve_job_def(job).execute_in_process(
        instance=instance, partition_key=partition, raise_on_error=False,
        asset_selection=[dg.AssetKey(a) for a in assets] if assets else None)
    assert not result.success
    return failure_message(instance, result.dagster_run)


def _ingested(tmp_path: Path, tiny_model: Path, instance, **overrides):
    """A fresh project with both pool shards ingested; returns (config path, defs, store, versions)."""
    cfg_path = make_project(tmp_path, tiny_model, n_pool=60, n_target=10, **overrides)
    defs = build_definitions(str(cfg_path))
    instance.add_dynamic_partitions("pool_shards", ["shard-0", "shard-1"])
    for key in ("shard-0", "shard-1"):
        assert defs.resolve_job_def("shard_job").execute_in_process(
            instance=instance, partition_key=key, asset_selection=[dg.AssetKey("pool_examples")]).success
    store = LanceStore(str(load_config(cfg_path).storage_root))
    return cfg_path, defs, store, store.versions()


def _edit_shard(cfg_path: Path, edit) -> None:
    path = cfg_path.parent / "pool" / "shard-0.parquet"
    edit(pd.read_parquet(path)).to_parquet(path, index=False)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda df: df.rename(columns={"text": "txt"}), "column 'text' not found (did you mean 'txt'?)"),
    (lambda df: df.drop(columns=["label"]), "column 'label' not found"),
    (lambda df: df.iloc[0:0], "is empty: no rows"),
])
def test_bad_pool_file_fails_ingest_and_keeps_tables(tmp_path, tiny_model, edit, message):
    with dg.DagsterInstance.ephemeral() as instance:
        cfg_path, defs, store, versions = _ingested(tmp_path, tiny_model, instance)
        _edit_shard(cfg_path, edit)
        error = _fail(defs, instance, "shard_job", partition="shard-0", assets=["pool_examples"])
        assert "pool_examples[shard-0] failed" in error and message in error
        assert store.versions() == versions


def test_unchanged_pool_file_writes_nothing(tmp_path, tiny_model):
    with dg.DagsterInstance.ephemeral() as instance:
        _, defs, store, versions = _ingested(tmp_path, tiny_model, instance)
        assert defs.resolve_job_def("shard_job").execute_in_process(
            instance=instance, partition_key="shard-0", asset_selection=[dg.AssetKey("pool_examples")]).success
        assert store.versions() == versions and _meta(instance, "pool_examples", "shard-0")["written"] is False


@pytest.mark.parametrize(("target", "message"), [
    (lambda df: df.iloc[0:0], "is empty: no rows"),
    (lambda df: df.assign(label="neutral"), "has labels the pool does not have: ['neutral']"),
])
def test_bad_target_set_fails_and_keeps_tables(tmp_path, tiny_model, target, message):
    with dg.DagsterInstance.ephemeral() as instance:
        cfg_path, defs, store, versions = _ingested(tmp_path, tiny_model, instance)
        path = cfg_path.parent / "targets" / "clean.parquet"
        target(pd.read_parquet(path)).to_parquet(path, index=False)
        error = _fail(defs, instance, "refresh_job", assets=["target_sets"])
        assert "target_sets failed" in error and "target set 'clean'" in error and message in error
        assert store.versions() == versions


def test_texts_that_tokenize_to_nothing(tmp_path, tiny_model):
    with dg.DagsterInstance.ephemeral() as instance:
        cfg_path, defs, store, versions = _ingested(tmp_path, tiny_model, instance)
        _edit_shard(cfg_path, lambda df: df.assign(text=["\x00\x01"] + df["text"].tolist()[1:]))
        assert defs.resolve_job_def("shard_job").execute_in_process(
            instance=instance, partition_key="shard-0", asset_selection=[dg.AssetKey("pool_examples")]).success
        versions = store.versions()
        error = _fail(defs, instance, "adapter_job")
        assert "lora_adapter failed" in error and "shard-0-0000" in error and "tokenizes to nothing" in error
        assert store.versions() == versions
        assert not (cfg_path.parent / "store" / "adapters").exists()


def test_model_folder_that_is_not_a_hf_model(tmp_path, tiny_model):
    (tmp_path / "not_a_model").mkdir()  # a config.json the config check accepts, of no model transformers knows
    (tmp_path / "not_a_model" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with dg.DagsterInstance.ephemeral() as instance:
        _, defs, store, versions = _ingested(tmp_path, tiny_model, instance, model=str(tmp_path / "not_a_model"))
        error = _fail(defs, instance, "adapter_job")
        assert "lora_adapter failed" in error and "not_a_model" in error
        assert store.versions() == versions


@pytest.mark.parametrize(("change", "messages"), [
    ({"model": "/no/such/model"}, ["model: '/no/such/model' is neither a bundled model"]),
    ({"compresion": {"sketch_dim": 8}, "damping_ratio": "high"},
     ["compresion: unknown key (did you mean 'compression'?)",
      "damping_ratio: expected a number, got str 'high'"]),
])
def test_bad_config_fails_before_any_work(tmp_path, tiny_model, change, messages):
    cfg_path = make_project(tmp_path, tiny_model, n_pool=20, n_target=4)
    cfg_path.write_text(yaml.safe_dump({**yaml.safe_load(cfg_path.read_text()), **change}))
    defs = build_definitions(str(cfg_path))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("pool_shards", ["shard-0"])
        error = _fail(defs, instance, "shard_job", partition="shard-0", assets=["pool_examples"])
    assert "pool_examples[shard-0] failed" in error and all(m in error for m in messages)
    assert not (tmp_path / "store").exists()


def test_retrained_adapter_replaces_stale_rows_and_scoring_waits_for_every_shard(tmp_path, tiny_model):
    """After a retrain every stored gradient row is stale: computing one shard replaces the stale rows in the
    same commit, and nothing downstream scores until every shard is computed under the new adapter."""
    with dg.DagsterInstance.ephemeral() as instance:
        cfg_path, defs, store, _ = _ingested(tmp_path, tiny_model, instance)
        assert defs.resolve_job_def("adapter_job").execute_in_process(instance=instance).success
        for shard in ("shard-0", "shard-1"):
            assert defs.resolve_job_def("shard_job").execute_in_process(
                instance=instance, partition_key=shard, asset_selection=[dg.AssetKey("lora_gradients")]).success
        first = store.row_fingerprints("gradients")
        doc = yaml.safe_load(cfg_path.read_text())
        cfg_path.write_text(yaml.safe_dump({**doc, "train": {**doc["train"], "seed": 1}}))  # retrains
        assert defs.resolve_job_def("adapter_job").execute_in_process(instance=instance).success
        assert _meta(instance, "lora_adapter")["source"] == "trained"
        assert defs.resolve_job_def("shard_job").execute_in_process(
            instance=instance, partition_key="shard-1", asset_selection=[dg.AssetKey("lora_gradients")]).success
        second = store.row_fingerprints("gradients")
        assert len(second) == 1 and second != first  # shard-0's stale rows went with shard-1's commit
        error = _fail(defs, instance, "refresh_job", assets=["preconditioners"])
        assert "preconditioners failed" in error and "missing ['shard-0']" in error
        # the first adapter is still on disk (its folder is kept by hash): switching back needs no training
        assert len(list((cfg_path.parent / "store" / "adapters").glob("*/manifest.json"))) == 2


def test_adapter_folder_changed_after_saving_is_refused(tmp_path, tiny_model):
    with dg.DagsterInstance.ephemeral() as instance:
        cfg_path, defs, store, _ = _ingested(tmp_path, tiny_model, instance)
        assert defs.resolve_job_def("adapter_job").execute_in_process(instance=instance).success
        folder = next((cfg_path.parent / "store" / "adapters").glob("*/adapter_model.safetensors")).parent
        from safetensors.torch import load_file, save_file
        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, folder / "adapter_model.safetensors")
        error = _fail(defs, instance, "shard_job", partition="shard-0", assets=["lora_gradients"])
        assert "does not hold the tensors its manifest names" in error
        shutil.rmtree(folder)


def test_the_full_pool_fit_of_seed_0_is_the_warm_up_adapter_tested(built):
    """The evaluation's `full`, seed-0 fit has the warm-up's records, recipe and seed: it tests the warm-up adapter
    instead of training it again (issue 19: one warm-up fewer per evaluation), and its numbers are those a fresh
    training gives."""
    from assets_defs.evaluation import evaluation_plan
    from hyperinf_ops.stages.evaluation import (
        EVALUATION_TABLE,
        _fit_and_test,
        evaluation_schema,
        pool_records,
        run_evaluation,
    )
    from hyperinf_ops.stages.evaluation_plan import plan_fits

    cfg_path, _, _ = built
    cfg = load_config(cfg_path)
    store = LanceStore(str(cfg.storage_root))
    rows = store.open(EVALUATION_TABLE).to_table().to_pylist()
    row = next(r for r in rows if r["subset"] == "full" and r["seed"] == 0)
    # made again with training forbidden: the row comes back, from the warm-up adapter
    store.replace_where(EVALUATION_TABLE, {"fit_key": row["fit_key"]}, evaluation_schema().empty_table(),
                        schema=evaluation_schema(), unique=None)
    with mock.patch("hyperinf_ops.stages.evaluation.warmup_train", side_effect=AssertionError("trained")):
        run_evaluation(store, cfg.model_spec, cfg.lora, cfg.train, cfg.data, evaluation_plan(cfg), log=lambda _: None)
    again = next(r for r in store.open(EVALUATION_TABLE).to_table().to_pylist() if r["fit_key"] == row["fit_key"])
    assert len(store.open(EVALUATION_TABLE).to_table()) == len(rows)
    # ... and a fresh training on the same records gives the same numbers
    pool = pool_records(store, cfg.task)
    fit = next(f for f in plan_fits(store, evaluation_plan(cfg), pool) if f.subset == "full" and f.seed == 0)
    from hyperinf_ops.stages.evaluation import evaluation_halves, fit_records

    halves = evaluation_halves(evaluation_plan(cfg), cfg.data, cfg.task, ["neg", "pos"])
    records = fit_records(fit, {r["sample_id"]: r for r in pool})
    fresh = _fit_and_test(cfg.model_spec, cfg.lora, cfg.train, ["neg", "pos"], records, *halves, fit, lambda _: None)
    for key in ("validation_accuracy", "test_accuracy", "validation_loss", "test_loss", "train_loss"):
        assert again[key] == row[key], key
        assert again[key] == pytest.approx(fresh[key], rel=1e-5, abs=1e-6), key


def test_subset_epochs_retrains_only_the_subsets_with_that_many_epochs(built, tmp_path):
    """`evaluation.subset_epochs` (LESS's regime: the selected subset trained for more epochs): every curated and
    random fit is trained again with that many epochs, on the same records; the full pool's and the oracle's fits
    keep the warm-up recipe and are reused, not retrained."""
    from dataclasses import replace

    from assets_defs.evaluation import evaluation_plan
    from hyperinf_ops.stages.evaluation import EVALUATION_TABLE, run_evaluation
    from hyperinf_ops.training import warmup_train

    cfg_path, _, _ = built
    cfg = load_config(cfg_path)
    shutil.copytree(cfg.storage_root, tmp_path / "store")  # the module's store stays as the other tests read it
    store = LanceStore(str(tmp_path / "store"))
    before = store.open(EVALUATION_TABLE).to_table().to_pylist()
    epochs = cfg.train.epochs + 1
    trained = []

    def recording(model, records, recipe, **kwargs):
        trained.append((len(records), recipe.epochs))
        return warmup_train(model, records, recipe, **kwargs)

    with mock.patch("hyperinf_ops.stages.evaluation.warmup_train", side_effect=recording):
        summary = run_evaluation(store, cfg.model_spec, cfg.lora, cfg.train, cfg.data,
                                 replace(evaluation_plan(cfg), subset_epochs=epochs), log=lambda _: None)
    after = store.open(EVALUATION_TABLE).to_table().to_pylist()
    subsets = [r for r in before if r["subset"] in ("curated", "random")]
    kept = {r["fit_key"] for r in before if r["subset"] in ("full", "oracle")}
    assert subsets and kept and summary.reused == len(kept)
    assert sorted(trained) == sorted((r["n_examples"], epochs) for r in subsets)
    assert kept <= {r["fit_key"] for r in after} and len(after) == len(before)
    new = {(r["candidate"], r["subset"], r["seed"], r["fraction"]): r for r in after if r["fit_key"] not in kept}
    for r in subsets:  # the same records, trained again
        again = new[r["candidate"], r["subset"], r["seed"], r["fraction"]]
        assert (again["n_examples"], again["label_counts"]) == (r["n_examples"], r["label_counts"])
