"""Bad input ends in one `hyperinf: error: ...` line, exit 2, before anything is written (stages/preflight.py),
and a run that fails inside a step says which step, in one line that names the file holding the trace."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from hyperinf_project import make_project, sentences, write_shard
from tiny_models import save_tiny_model

from pipelines.cli import main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


def _project(root: Path, model: Path, edit) -> Path:
    """A tiny project whose config (a dict) `edit` changes; returns the config file."""
    path = make_project(root, model, n_pool=40, n_target=10)
    doc = yaml.safe_load(path.read_text())
    edit(doc, root)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _labels_meh(doc, root):
    frame = sentences(10, seed=3)
    frame.loc[0, "label"] = "meh"
    frame.to_parquet(root / "targets" / "odd.parquet", index=False)
    doc["targets"]["odd"] = {"path": "targets/odd.parquet"}


def _duplicate_id_in_a_later_shard(doc, root):
    later = pd.read_parquet(write_shard(root / "pool", "shard-2", 20, seed=7))
    later.loc[3, "id"] = "shard-0-0001"  # an id of the first shard
    later.to_parquet(root / "pool" / "shard-2.parquet", index=False)


def _test_file_without_label(doc, root):
    sentences(10, seed=5).drop(columns=["label"]).to_parquet(root / "test" / "nolabel.parquet", index=False)
    doc["evaluation"] = {"test": {"path": "test/nolabel.parquet"}, "seeds": 1}


def _one_label_pool(doc, root):
    for path in (root / "pool").glob("*.parquet"):
        pd.read_parquet(path).assign(label="pos").to_parquet(path, index=False)


def _one_row_pool(doc, root):
    for path in sorted((root / "pool").glob("*.parquet"))[1:]:
        path.unlink()
    first = next((root / "pool").glob("*.parquet"))
    pd.read_parquet(first).iloc[:1].to_parquet(first, index=False)


def _a_column_added_to_one_pool_file(doc, root):
    path = root / "pool" / "shard-1.parquet"
    pd.read_parquet(path).assign(source="web").to_parquet(path, index=False)


def _pool_file_renamed_to_json(doc, root):
    (root / "pool" / "shard-1.parquet").rename(root / "pool" / "shard-1.json")


CASES = {
    "a misspelled data column": (
        lambda doc, root: doc["data"].update(text_column="txt"),
        "pool file shard-0.parquet: column 'txt' not found (did you mean 'text'?); available columns: "
        "['id', 'text', 'label', 'flipped']"),
    "a misspelled column in a where: target": (
        lambda doc, root: doc["targets"].update(pos={"where": "lable = 'pos'"}),
        "target set 'pos': `where: lable = 'pos'` failed over the pool: Binder Error: Referenced column \"lable\" "
        "not found in FROM clause!"),
    "a where: target that selects nothing": (
        lambda doc, root: doc["targets"].update(none={"where": "label = 'neutral'"}),
        "target set 'none' is empty: `where: label = 'neutral'` selects no pool rows"),
    "a target label the pool does not have": (
        _labels_meh, "target set 'odd' has labels the pool does not have: ['meh'] (pool labels: ['neg', 'pos'])"),
    "an id in two pool files": (
        _duplicate_id_in_a_later_shard,
        "ids used by more than one pool file: 'shard-0-0001' (shard-0, shard-2) (1 in all); ids in column 'id' "
        "must be unique across the pool"),
    "an evaluation test file without the label column": (
        _test_file_without_label, "evaluation test file "),
    # issue 19: checkable before any work, found late before
    "a pool with one label": (_one_label_pool, "every pool example has the label 'pos': a classifier needs at "
                                               "least two labels (column 'label')"),
    "a pool with one example": (_one_row_pool, "the pool has 1 example: influence ranks examples against each "
                                               "other; give at least two"),
    "max_length beyond the model's positions": (
        lambda doc, root: doc.update(max_length=512),
        "max_length: 512 is beyond the 256 positions model"),
    "a LoRA rank above the model's width": (
        lambda doc, root: doc["lora"].update(rank=64),
        "lora.rank: 64 is above model"),
    "a column added to one pool file": (
        _a_column_added_to_one_pool_file,
        "pool file shard-1.parquet: its columns differ from pool file shard-0.parquet's: new ['source'], missing []"),
    "a pool file of another type": (
        _pool_file_renamed_to_json,
        "pool file"),
    "more cross-fit folds than a label has examples": (
        lambda doc, root: doc.update(signals={"folds": 20}),
        "signals.folds: 20 folds need at least 20 pool examples of every label; {'pos': 17} have fewer"),
}
if not torch.cuda.is_available():
    CASES["device: cuda without CUDA"] = (
        lambda doc, root: doc.update(device="cuda"),
        "device: device 'cuda' was asked for, but this torch build sees no CUDA device; use `device: auto` or `cpu`")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_before_any_work(case, tmp_path, tiny_model, capsys):
    edit, message = CASES[case]
    config = _project(tmp_path, tiny_model, edit)
    assert main(["run", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"hyperinf: error: {message}"), captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert "warm-up" not in captured.out and "Dagster instance" not in captured.out  # no training, no run
    assert not (tmp_path / "store").exists() and not (tmp_path / ".dagster_home").exists()  # nothing written


def test_a_target_file_that_repeats_pool_examples_is_a_warning(tmp_path, tiny_model, capsys):
    from hyperinf_ops.config import load_config
    from hyperinf_ops.stages.preflight import preflight
    from hyperinf_ops.store import LanceStore

    def overlap(doc, root):
        pool = pd.read_parquet(root / "pool" / "shard-0.parquet").head(4).drop(columns=["id"])
        pd.concat([pool, sentences(6, seed=11)]).to_parquet(root / "targets" / "mixed.parquet", index=False)
        doc["targets"]["mixed"] = {"path": "targets/mixed.parquet"}
        # a test file holding 3 of the target set's own examples: the curation selects for them
        pd.concat([sentences(6, seed=11).head(3), sentences(7, seed=12)]).to_parquet(root / "test" / "t.parquet",
                                                                                    index=False)
        doc["evaluation"] = {"test": {"path": "test/t.parquet"}, "seeds": 1}

    cfg = load_config(_project(tmp_path, tiny_model, overlap))
    lines: list[str] = []
    checked = preflight(LanceStore(str(cfg.storage_root)), cfg, log=lines.append)
    assert lines == ["warning: target set 'mixed': 4 of 10 examples are also in the pool (same text and label): "
                     "their scores include their own gradient",
                     "warning: evaluation test file: 3 of 10 examples are also in target set 'mixed' (same text and "
                     "label): the curation selects for them, so the evaluation overstates it"]
    assert checked.pending == ["shard-0", "shard-1"] and checked.pool_rows == 40
    assert checked.target_rows == {"clean": 10, "mixed": 10}


def test_a_target_set_without_one_of_the_pools_labels_is_a_warning(tmp_path, tiny_model):
    from hyperinf_ops.config import load_config
    from hyperinf_ops.stages.preflight import preflight
    from hyperinf_ops.store import LanceStore

    def one_label(doc, root):
        frame = sentences(20, seed=13)
        frame[frame["label"] == "pos"].to_parquet(root / "targets" / "pos.parquet", index=False)
        doc["targets"]["pos"] = {"path": "targets/pos.parquet"}

    cfg = load_config(_project(tmp_path, tiny_model, one_label))
    lines: list[str] = []
    preflight(LanceStore(str(cfg.storage_root)), cfg, log=lines.append)
    assert lines == ["warning: target set 'pos' has no example of label(s) ['neg'] of the pool: their examples score "
                     "as harmful to it and a drop curation removes them first; add a few examples of every label the "
                     "curated set should keep"]


def test_the_warm_up_is_not_judged_on_target_rows_it_trains_on(tmp_path, tiny_model):
    """Target rows that are also pool rows are left out of the warm-up's held-out records (they measure fit)."""
    from hyperinf_ops.config import load_config
    from hyperinf_ops.stages.adapter import heldout_records
    from hyperinf_ops.stages.pool import ingest_shard
    from hyperinf_ops.store import LanceStore

    def overlap(doc, root):
        pool = pd.read_parquet(root / "pool" / "shard-0.parquet").head(4).drop(columns=["id"])
        pd.concat([pool, sentences(6, seed=11)]).to_parquet(root / "targets" / "clean.parquet", index=False)

    cfg = load_config(_project(tmp_path, tiny_model, overlap))
    store = LanceStore(str(cfg.storage_root))
    for shard in sorted((tmp_path / "pool").glob("*.parquet")):
        ingest_shard(store, shard.stem, shard, cfg.data, cfg.task, log=lambda *_: None)
    held = heldout_records(store, cfg.targets, cfg.data, cfg.task)
    assert held.source == "target set clean (not trained on; 4 rows also in the pool left out)"
    assert [r["text"] for r in held.records] == sentences(6, seed=11)["text"].tolist()


def test_a_failed_step_is_one_line_naming_the_step_and_the_trace_file(tmp_path, tiny_model, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("hyperinf_ops.stages.pool.ingest_targets", broken)
    config = _project(tmp_path, tiny_model, lambda doc, root: None)
    assert main(["run", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    match = re.fullmatch(r"hyperinf: error: target_sets failed: RuntimeError: disk on fire \(full trace: (\S+)\)\n",
                         captured.err)
    assert match, captured.err
    trace = Path(match[1]).read_text()
    assert "Traceback" not in captured.out + captured.err and "disk on fire" in trace and "broken" in trace
    # The terminal had the steps' own lines (progress), not Dagster's event dump.
    assert re.search(r"^\d\d:\d\d:\d\d lora_adapter: warm-up: \d+/\d+ examples", captured.out, flags=re.M)
    assert "STEP_FAILURE" not in captured.out and "DagsterExecutionStepExecutionError" not in captured.out


@pytest.mark.parametrize(("n_pool", "message"), [
    ("0", "need 0 <= flip_fraction <= 1, n_pool >= n_shards >= 1"),
    ("-5", "need 0 <= flip_fraction <= 1, n_pool >= n_shards >= 1"),
    ("10000000", "the corpus has 12752 usable snippets; asked for 10000000 + 500 + 500"),
])
@pytest.mark.real_weights
def test_demo_sizes_out_of_range_are_one_line(n_pool, message, tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert main(["demo", "--n-pool", n_pool, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hyperinf: error: {message}") and err.count("\n") == 1, err
    assert not workdir.exists()


def test_ui_port_out_of_range_or_in_use_is_one_line(tmp_path, tiny_model, capsys):
    import socket

    config = _project(tmp_path, tiny_model, lambda doc, root: None)
    assert main(["ui", "--config", str(config), "--port", "70000"]) == 2
    assert capsys.readouterr().err == "hyperinf: error: --port 70000: a port is a number from 1 to 65535\n"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--config", str(config), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hyperinf: error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)")
    assert err.count("\n") == 1 and not (tmp_path / ".dagster_home").exists()


def _saved_adapter(folder: Path, rank: int) -> Path:
    """A peft adapter folder as peft writes it: adapter_config.json and its safetensors weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": rank, "lora_alpha": 8, "target_modules": ["query", "value"]}))
    save_file({"w": torch.zeros(rank, 2)}, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize(("case", "message"), [
    ("rank", "adapter.path: the adapter in {folder} has rank 2 where the config has 4: set lora to match it "
             "(or remove adapter.path to train one)"),
    ("garbage", "adapter.path: {folder}/adapter_model.safetensors is not a readable safetensors file ("),
])
def test_a_given_adapter_of_another_shape_or_with_garbage_weights(case, message, tmp_path, tiny_model, capsys):
    folder = _saved_adapter(tmp_path / "adapter", rank=2 if case == "rank" else 4)
    if case == "garbage":
        (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    config = _project(tmp_path, tiny_model, lambda doc, root: doc.update(adapter={"path": str(folder)}))
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hyperinf: error: {message.format(folder=folder)}") and err.count("\n") == 1, err
    assert not (tmp_path / "store").exists() and not (tmp_path / ".dagster_home").exists()


def test_a_bad_later_shard_changes_nothing_on_an_existing_store(tmp_path, tiny_model, capsys):
    """Issue 12.1: adding `id_column` while the third shard repeats an id. Every shard is checked before any is
    written, so the store keeps its versions and every score row still joins `examples`."""
    from hyperinf_ops.config import load_config
    from hyperinf_ops.store import LanceStore

    config = make_project(tmp_path, tiny_model, n_pool=60, n_shards=3, n_target=10)
    doc = yaml.safe_load(config.read_text())
    doc["data"].pop("id_column")
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["run", "--config", str(config)]) in (0, 1)
    store = LanceStore(str(load_config(config).storage_root))
    before = store.versions()
    third = tmp_path / "pool" / "shard-2.parquet"
    frame = pd.read_parquet(third)
    frame.loc[5, "id"] = frame.loc[4, "id"]
    frame.to_parquet(third, index=False)
    doc["data"]["id_column"] = "id"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    capsys.readouterr()
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hyperinf: error: pool file shard-2.parquet: duplicated id(s) in column 'id'"), err
    assert store.versions() == before
    ids = set(store.open("examples").to_table(columns=["sample_id"])["sample_id"].to_pylist())
    assert set(store.open("scores").to_table(columns=["sample_id"])["sample_id"].to_pylist()) == ids
