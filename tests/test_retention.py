"""Issue 12.3 / 12.5 on a tiny project: identical runs keep the disk flat (old Lance versions cleaned, those an export
manifest names kept and reproducible), a replaced export is kept under `exports/<query>.history/`, and a
`lora.rank` change is refused before anything is written, then `hyperinf migrate --yes` archives the derived
tables and the run succeeds."""

import os
from pathlib import Path

import dagster as dg
import pytest
import yaml
from hyperinf_project import make_project
from tiny_models import save_tiny_model

from hyperinf_ops.adapters import AdapterStore
from hyperinf_ops.config import load_config
from hyperinf_ops.errors import ConfigError
from hyperinf_ops.export import Manifest, history_dir, reproduce
from hyperinf_ops.location import Location
from hyperinf_ops.retention import TAG_PREFIX
from hyperinf_ops.stages.refresh_record import REFRESH_RECORD
from hyperinf_ops.store import LanceStore
from pipelines.cli import main
from pipelines.runner import materialize_all

RUNS = 3


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _files(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its write time: what 'nothing was written' compares (hidden files at the
    top, a run's lease / lock bookkeeping, aside)."""
    return {str(f.relative_to(folder)): f.stat().st_mtime_ns for f in folder.rglob("*")
            if f.is_file() and not f.relative_to(folder).parts[0].startswith(".")}


def _run(cfg_path: Path) -> None:
    with dg.instance_for_test() as instance:
        materialize_all(instance, cfg_path, load_config(cfg_path), log=lambda _: None)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A tiny project refreshed RUNS times unchanged (cleanup of every version older than now, one replaced export
    kept); the bytes of the storage root and of its Lance tables after each run."""
    root = tmp_path_factory.mktemp("retention")
    cfg = make_project(root, save_tiny_model(root / "model"), n_pool=40, n_shards=2, n_target=10,
                       train={"epochs": 1, "lr": 3.0e-2, "batch_size": 8, "seed": 0}, estimators=["hyperinf"],
                       retention={"keep_hours": 0, "keep_exports": 1})
    store = root / "store"
    sizes = []
    for _ in range(RUNS):
        # an identical run refreshes nothing (tests/test_pipeline.py); forced here, each run rewrites the scores
        # and replaces the export, which is what retention has to keep flat
        (store / REFRESH_RECORD).unlink(missing_ok=True)
        _run(cfg)
        sizes.append((_bytes(store), _bytes(store / "lance")))
    print(f"storage root / Lance bytes after each of {RUNS} identical runs: {sizes}")
    return {"cfg": cfg, "store": store, "sizes": sizes}


def test_identical_runs_keep_disk_flat(project):
    (first, _), (_, lance_second), (last, lance_last) = project["sizes"]
    assert last <= first * 1.1
    # Once the one kept export is replaced, run after run removes as many versions as it adds.
    assert lance_last <= lance_second * 1.02
    store = LanceStore(str(project["store"]))
    for table in ("scores", "gradients", "examples"):
        kept = [v["version"] for v in store.open(table).versions()]
        assert len(kept) < store.open(table).version, (table, kept)  # old versions were removed


def test_exports_reproducible_after_cleanup(project):
    latest = project["store"] / "exports" / "top_fraction"
    kept = history_dir(latest).folders()
    assert len(kept) == 1  # keep_exports: 1, after RUNS - 1 replacements
    for folder in [Location(latest), *kept]:
        manifest = Manifest.load(folder)
        exported = (folder / "subset.parquet").read_parquet(["sample_id"])["sample_id"].to_pylist()
        assert manifest.row_count > 0
        assert reproduce(manifest)["sample_id"].to_pylist() == exported
        store = LanceStore(str(project["store"]))
        for table, version in manifest.table_versions.items():
            assert f"{TAG_PREFIX}{version}" in store.open(table).tags.list() or store.open(table).version == version


@pytest.mark.parametrize(("key", "value"), [("modules", ["query"]), ("gradient_modules", ["layer.0."])])
def test_a_module_change_is_refused_before_training(project, key, value):
    """lora.modules (or the matrices entering influence) changes the row width: the preflight predicts it from
    the model's config.json, before any warm-up is trained or `adapters/current.json` moves (issue 19, route 9;
    before, `lora.modules` trained ~30 s, switched the adapter, then failed on the gradient schema)."""
    cfg, store = project["cfg"], project["store"]
    doc = yaml.safe_load(cfg.read_text())
    doc["lora"][key] = value
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    before = _files(store)
    with pytest.raises(ConfigError, match=r"holds gradient rows of adapter \w+ \(rank 4, \d+ \w+ values per row\); "
                       r"model .*, lora\.modules .*needs rows of \d+ \w+ values: run `hyperinf migrate"):
        _run(cfg)
    assert _files(store) == before  # nothing trained, written or replaced


def test_rank_change_refused_then_migrated(project, capsys):
    cfg, store = project["cfg"], project["store"]
    doc = yaml.safe_load(cfg.read_text())
    doc["lora"]["rank"] = 2
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    before, adapter = _files(store), AdapterStore(store).current()
    with pytest.raises(ConfigError) as refused:
        _run(cfg)
    message = str(refused.value)
    print(message)
    assert "\n" not in message and "rank 4" in message and "hyperinf migrate" in message
    assert _files(store) == before  # nothing trained, written or replaced

    assert main(["migrate", "--config", str(cfg)]) == 0  # without --yes: only says what would move
    assert _files(store) == before
    assert main(["migrate", "--config", str(cfg), "--yes"]) == 0
    archives = list((store / "archive").iterdir())
    assert len(archives) == 1 and (archives[0] / "lance" / "gradients.lance").is_dir()
    assert not (store / "lance" / "gradients.lance").exists() and (store / "lance" / "examples.lance").is_dir()
    assert "nothing deleted" in capsys.readouterr().out

    _run(cfg)
    tables = LanceStore(str(store))
    assert tables.fingerprint("gradients").rank == 2 and tables.open("scores").count_rows() > 0
    assert (AdapterStore(store).location(adapter) / "manifest.json").is_file()  # the old adapter is still there
    old = LanceStore(str(archives[0]))
    assert old.fingerprint("gradients").adapter_hash == adapter.adapter_hash
    assert os.listdir(store / "exports" / "top_fraction.history")
