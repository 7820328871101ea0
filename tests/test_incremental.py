"""Incremental refresh by content, launched as `hyperinf run` launches it: an edited pool file gives a gradient
pass to its new and edited examples only, a deleted file's rows and curvature sums go, a renamed file keeps its
rows; every time the scores equal a from-scratch run over the same files under the same adapter."""

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hyperinf_project import make_project, sentences
from tiny_models import save_tiny_model

from hyperinf_ops.adapters import AdapterStore
from hyperinf_ops.config import load_config
from hyperinf_ops.core.curvature import curvature_partials
from hyperinf_ops.errors import GradientMismatchError
from hyperinf_ops.store import LanceStore
from pipelines.runner import RunReport, materialize_all

SHARD_TABLES = ("examples", "gradients", "example_outputs", "curvature")
# Rankings that read the warm-up's history (its AUM, its earlier checkpoints): a given adapter has none, so the
# from-scratch run below (given the same adapter) cannot reproduce them; every other ranking reads the rows.
HISTORY = ("aum", "hyperinf_cp", "fused")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


def _project(root: Path, model: Path) -> Path:
    """90 examples in 3 files of 30 (ids `shard-<i>-<row>`), exact float32 rows: a from-scratch run draws no
    other whitening pilot and rounds no row differently, so incremental and scratch scores compare to 1e-6."""
    return make_project(root, model, n_pool=90, n_shards=3, n_target=20,
                        train={"epochs": 2, "lr": 3.0e-2, "batch_size": 8, "seed": 0},
                        compression={"whiten": 0, "dtype": "float32"})


def _run(cfg_path: Path) -> tuple[RunReport, dict[str, dict]]:
    """`hyperinf run` on a fresh instance: the report and each shard's lora_gradients metadata of this run."""
    with dg.instance_for_test() as instance:
        report = materialize_all(instance, cfg_path, load_config(cfg_path), log=lambda _: None)
        meta = {}
        for record in instance.fetch_materializations(dg.AssetKey("lora_gradients"), limit=100).records:
            values = record.asset_materialization.metadata
            meta[record.partition_key] = {k: v.value for k, v in values.items()}
    return report, meta


def _scores(root: Path) -> pd.DataFrame:
    table = LanceStore(str(root)).open("scores").to_table(columns=["target_set", "method", "sample_id", "score"])
    return table.to_pandas().set_index(["target_set", "method", "sample_id"]).sort_index()


def _assert_equals_scratch(cfg_path: Path) -> None:
    """A from-scratch run over the pool files as they are now (fresh store, same adapter: gradients are only
    comparable under one) gives the incremental store's scores for every (target set, method) but the warm-up
    history's (HISTORY), to 1e-6 of each ranking's scale."""
    doc = yaml.safe_load(cfg_path.read_text())
    adapters = AdapterStore(cfg_path.parent / doc["storage_root"])
    doc.update(storage_root="scratch", adapter={"path": str(adapters.path(adapters.current()))})
    scratch = cfg_path.parent / "scratch.yaml"
    scratch.write_text(yaml.safe_dump(doc, sort_keys=False))
    report, _ = _run(scratch)
    assert report.gradients == sorted(p.stem for p in (cfg_path.parent / "pool").glob("*.parquet"))
    incremental, reference = _scores(cfg_path.parent / "store"), _scores(cfg_path.parent / "scratch")
    incremental = incremental[~incremental.index.get_level_values("method").isin(HISTORY)]
    reference = reference[~reference.index.get_level_values("method").isin(HISTORY)]
    assert incremental.index.equals(reference.index)
    for key, group in reference.groupby(level=["target_set", "method"]):
        scale = group["score"].abs().max()
        np.testing.assert_allclose(incremental.loc[group.index, "score"], group["score"], rtol=1e-6,
                                   atol=1e-6 * scale, err_msg=str(key))


def _shard_rows(cfg_path: Path, shard: str) -> dict[str, int]:
    """Rows of the shard in each table keyed by shard (curvature: one per LoRA matrix, 8 in the tiny BERT)."""
    store = LanceStore(str(cfg_path.parent / "store"))
    return {t: store.open(t).count_rows(f"shard = '{shard}'") for t in SHARD_TABLES}


def test_subtracting_examples_gives_the_sums_without_them():
    """(sums over a + b) - (sums over b) = sums over a, to float64 rounding of the larger sums (here the removed
    examples are the largest: the worst case for cancellation); more out than in is refused."""
    gen = torch.Generator().manual_seed(0)
    grads = {"m": torch.randn(10, 2, 6, generator=gen) * torch.logspace(-3, 3, 10)[:, None, None]}
    whole = curvature_partials(grads)["m"]
    kept = curvature_partials({"m": grads["m"][:7]})["m"]
    rest = whole.subtract(curvature_partials({"m": grads["m"][7:]})["m"])
    assert rest.count == kept.count == 7 and rest.numel == kept.numel
    scale = whole.gfim_sum.abs().max()
    assert (rest.gfim_sum - kept.gfim_sum).abs().max() <= 1e-14 * scale
    assert abs(rest.sq_sum - kept.sq_sum) <= 1e-14 * whole.sq_sum
    with pytest.raises(GradientMismatchError, match="cannot take 10 examples out of sums over 7"):
        kept.subtract(whole)


def test_edited_file_passes_only_new_and_edited_examples(tmp_path, tiny_model):
    cfg_path = _project(tmp_path, tiny_model)
    first, _ = _run(cfg_path)
    assert first.gradients == ["shard-0", "shard-1", "shard-2"]

    path = tmp_path / "pool" / "shard-0.parquet"
    df = pd.read_parquet(path)
    df.loc[0:2, "text"] = df.loc[0:2, "text"] + " very fresh"  # 3 edited texts; row 2's label flips too
    df.loc[2, "label"] = "pos" if df.loc[2, "label"] == "neg" else "neg"
    added = sentences(4, seed=50).assign(id=[f"shard-0-new-{i}" for i in range(4)])
    df = pd.concat([df.drop(index=[3, 4]), added[df.columns]], ignore_index=True)  # 2 deleted, 4 added
    df.to_parquet(path, index=False)

    report, meta = _run(cfg_path)
    assert report.ingested == ["shard-0"] and report.gradients == ["shard-0"] and not report.adapter
    # 3 edited + 4 new examples passed for their rows, 3 old contents + 2 deleted ones for the sums; 25 kept
    assert {k: meta["shard-0"][k] for k in ("rows", "kept", "recomputed", "subtracted")} == {
        "rows": 32, "kept": 25, "recomputed": 7, "subtracted": 5}
    assert _shard_rows(cfg_path, "shard-0") == {"examples": 32, "gradients": 32, "example_outputs": 32, "curvature": 8}
    _assert_equals_scratch(cfg_path)


def test_deleted_file_removes_its_rows_and_sums(tmp_path, tiny_model):
    cfg_path = _project(tmp_path, tiny_model)
    _run(cfg_path)
    (tmp_path / "pool" / "shard-2.parquet").unlink()

    report, _ = _run(cfg_path)
    assert report.removed == ["shard-2"] and report.gradients == [] and report.ingested == []
    assert [r.tags.get("dagster/partition") for r in report.runs] == ["shard-2", None]  # removal, refresh
    assert _shard_rows(cfg_path, "shard-2") == dict.fromkeys(SHARD_TABLES, 0)
    assert len(_scores(tmp_path / "store").loc["clean", "hyperinf"]) == 60
    _assert_equals_scratch(cfg_path)


def test_renamed_file_keeps_its_rows_by_content(tmp_path, tiny_model):
    cfg_path = _project(tmp_path, tiny_model)
    _run(cfg_path)
    shutil.move(tmp_path / "pool" / "shard-1.parquet", tmp_path / "pool" / "renamed.parquet")

    report, meta = _run(cfg_path)  # no "ids also used by other shards": the gone shard's rows do not count
    assert report.ingested == ["renamed"] and report.removed == ["shard-1"]
    assert report.gradients == []  # its rows and sums moved to the new name: current at once, no gradient pass
    assert "renamed" not in meta
    assert _shard_rows(cfg_path, "shard-1") == dict.fromkeys(SHARD_TABLES, 0)
    assert _shard_rows(cfg_path, "renamed") == {"examples": 30, "gradients": 30, "example_outputs": 30, "curvature": 8}
    _assert_equals_scratch(cfg_path)


def test_past_retrain_share_the_warm_up_is_trained_again_and_equals_a_run_from_scratch(tmp_path, tiny_model):
    """Below `train.retrain_share` an incremental run keeps the warm-up adapter (the tests above: scores equal a
    from-scratch run under it); past it (a third of the pool deleted, share 0.2) the warm-up is trained again on
    the pool as it is, and every ranking, the warm-up's history included, equals a run from scratch (issue 19,
    route 8)."""
    cfg_path = _project(tmp_path, tiny_model)
    doc = yaml.safe_load(cfg_path.read_text())
    doc["train"]["retrain_share"] = 0.2
    cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    _run(cfg_path)
    first = AdapterStore(tmp_path / "store").current()
    (tmp_path / "pool" / "shard-2.parquet").unlink()
    report, _ = _run(cfg_path)
    assert report.adapter and report.gradients == ["shard-0", "shard-1"]  # every row again, under the new adapter
    current = AdapterStore(tmp_path / "store").current()
    assert current.adapter_hash != first.adapter_hash and current.trained_on == 60

    doc.update(storage_root="scratch")
    scratch = tmp_path / "scratch.yaml"
    scratch.write_text(yaml.safe_dump(doc, sort_keys=False))
    _run(scratch)
    assert AdapterStore(tmp_path / "scratch").current().adapter_hash == current.adapter_hash
    incremental, reference = _scores(tmp_path / "store"), _scores(tmp_path / "scratch")
    assert incremental.index.equals(reference.index)
    for key, group in reference.groupby(level=["target_set", "method"]):
        np.testing.assert_allclose(incremental.loc[group.index, "score"], group["score"], rtol=1e-6,
                                   atol=1e-6 * group["score"].abs().max(), err_msg=str(key))
