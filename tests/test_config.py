"""config.py: one ConfigError listing every problem, defaults, relative paths, round trip."""

import time
from pathlib import Path

import pytest
import yaml

from hyperinf_ops.config import HyperinfConfig, load_config
from hyperinf_ops.config.sections import DEFAULT_CURATION, DROP_ISSUES_MAX_FRACTION
from hyperinf_ops.errors import ConfigError
from hyperinf_ops.settings import CompressionSpec
from hyperinf_ops.store.lease import hold_root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pool.parquet").write_bytes(b"")
    (tmp_path / "data" / "val.parquet").write_bytes(b"")
    return tmp_path


def minimal() -> dict:
    return {"data": {"path": "data/pool.parquet"}, "targets": {"clean_val": {"path": "data/val.parquet"}}}


def write(folder: Path, doc: dict) -> Path:
    path = folder / "hyperinf.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def problems(source, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(source, **kw)
    return info.value.problems


def test_defaults_and_relative_paths(project: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir("/")  # paths resolve against the config file, not the cwd
    cfg = load_config(write(project, minimal()))
    assert cfg.data.path == project / "data" / "pool.parquet"
    assert cfg.targets["clean_val"].path == project / "data" / "val.parquet"
    assert cfg.storage_root == project / "hyperinf_data"
    assert cfg.model == "minilm" and cfg.task == "classification"
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 16 and cfg.train.epochs == 2
    assert cfg.estimators == ("hyperinf", "datainf", "tracin")
    # half-whitened int4 rows, dense unless a row would pass 64 KB, then rank-2 factors within 1 GB of codec state
    # (the width rule, docs/compression.md); a compression mapping overrides key by key
    assert cfg.compression == CompressionSpec(whiten=0.25, dtype="int4", row_budget=65536, row_rank=2,
                                              state_budget=10**9) and cfg.damping_ratio == 0.1
    partial = load_config({**minimal(), "compression": {"sketch_dim": 48}}, base_dir=project).compression
    assert (partial.sketch_dim, partial.whiten, partial.dtype, partial.row_budget) == (48, 0.25, "int4", 65536)
    exact = load_config({**minimal(), "compression": {"whiten": 0, "dtype": "float32"}}, base_dir=project).compression
    assert (exact.sketch_dim, exact.whiten, exact.dtype) == (0, 0.0, "float32")  # raw float32 at any width
    # without a curation block: the measured default (docs/results.md, section 7), over the first target set
    assert cfg.curation.query == DEFAULT_CURATION["query"] and cfg.curation.method is None and not cfg.curation_auto
    assert cfg.curation.params == {"target_set": "clean_val", "method": "hyperinf", **DEFAULT_CURATION["params"],
                                   "max_fraction": DROP_ISSUES_MAX_FRACTION}  # a weak warm-up's count capped
    # the rankings beside influence: the loss, HyperINF over the warm-up's checkpoints and the probe fused, no
    # cross-fit; the fusion follows the estimators and the task
    assert (cfg.signals.folds, cfg.signals.checkpoints, cfg.signals.probe) == (0, True, True)
    assert cfg.fusion_members == ("loss", "hyperinf_cp", "probe")
    assert load_config({**minimal(), "estimators": ["tracin"]}, base_dir=project).fusion_members == (
        "loss", "tracin", "probe")
    causal = load_config({**minimal(), "task": "causal_lm"}, base_dir=project)
    assert causal.fusion_members == ("loss", "hyperinf_cp") and causal.curation.query == "top_fraction"
    # a causal LM: the top 20% by the cover ranking, which is on by default there (docs/results.md, section 8 (f)),
    # not balanced by the label (a causal LM's label is metadata: balancing by source would undo the selection)
    assert causal.curation.params == {"target_set": "clean_val", "method": "hyperinf_cover", "fraction": 0.2,
                                      "balance": False}
    assert [o.method for o in causal.cover_estimators] == ["hyperinf", "tracin"] and not cfg.cover_estimators
    assert load_config({**minimal(), "task": "causal_lm", "signals": {"cover": False}},
                       base_dir=project).curation.params["method"] == "hyperinf"
    # a query's target set and method default to the first target set and estimator, balance to on
    top = load_config({**minimal(), "curation": {"query": "top_fraction", "params": {"fraction": 0.8}}},
                      base_dir=project)
    assert top.curation.params == {"target_set": "clean_val", "method": "hyperinf", "fraction": 0.8, "balance": True}
    # a target-free ranking defaults to target set `self`
    loss = load_config({**minimal(), "curation": {"query": "drop_harmful", "params": {"fraction": 0.1,
                                                                                     "method": "loss"}}},
                       base_dir=project)
    assert loss.curation.params["target_set"] == "self"


def test_round_trip(project: Path):
    doc = {**minimal(), "lora": {"rank": 4, "alpha": 8, "modules": ["query"]}, "compression": {"sketch_dim": 48},
           "estimators": ["exact", "lissa"], "estimator_options": {"lissa_iterations": 50},
           "curation": {"query": "top_k", "params": {"k": 10, "method": "exact"}}}
    cfg = load_config(write(project, doc))
    again = load_config(cfg.to_dict())
    assert again == cfg and isinstance(again, HyperinfConfig)
    assert cfg.lora.modules == ("query",)
    assert load_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_every_problem_in_one_error(project: Path):
    doc = {
        **minimal(),
        "modle": "minilm",  # unknown key, with a suggestion
        "lora": {"rank": "eight", "alpah": 16},  # wrong type + unknown nested key
        "train": {"epochs": 0, "lr": -1.0},  # impossible values
        "estimators": ["hyperinf", "hyperinff", "datainf"],  # bad estimator name
        "damping_ratio": True,  # a bool is not a number
        "compression": {"sketch_dim": -5},
        "targets": {"clean_val": {"path": "data/val.parquet", "where": "label = 'x'"}},
        "curation": {"query": "top_fractoin"},
    }
    found = problems(write(project, doc))
    text = "\n".join(found)
    assert "modle: unknown key (did you mean 'model'?)" in text
    assert "lora.rank: expected an integer, got str 'eight'" in text
    assert "lora.alpah: unknown key (did you mean 'alpha'?)" in text
    assert "train.epochs: must be >= 1" in text and "train.lr: must be > 0" in text
    assert "estimators[1]: 'hyperinff' is not one of" in text and "did you mean 'hyperinf'" in text
    assert "damping_ratio: expected a number, got bool True" in text
    assert "compression.sketch_dim: must be >= 0" in text
    assert "targets.clean_val: give exactly one of" in text
    assert "curation.query: no query 'top_fractoin'" in text and "did you mean 'top_fraction'" in text
    assert len(found) == 10, found  # nothing reported twice
    found = problems({**minimal(), "curation": {"query": "top_fraction",
                                                "params": {"target_set": "clean", "fraction": "most"}}},
                     base_dir=project)
    assert any("curation.params.target_set: 'clean' is not a configured target set" in p for p in found)
    # params without their query: the default query has other params, so say which query
    assert problems({**minimal(), "curation": {"params": {"fraction": 0.8}}}, base_dir=project) == [
        "curation.query: required with curation.params (the default curation is drop_issues with the default "
        "target set and method): name the query the params are for"]


def test_missing_required_and_missing_files(tmp_path: Path):
    found = problems({"model": "no/such/folder"}, base_dir=tmp_path)
    assert "data: required key is missing" in found
    assert "targets: required key is missing" in found
    assert any(p.startswith("model: 'no/such/folder' is neither a bundled model") for p in found)
    found = problems({"data": {"path": "nope.csv"}, "targets": {"t": {"path": "nope.jsonl"}}}, base_dir=tmp_path)
    assert any("data.path" in p and "does not exist" in p for p in found)
    assert any("targets.t.path" in p and "is not a file" in p for p in found)


def test_where_targets_must_parse(project: Path):
    cfg = load_config({**minimal(), "targets": {"sport": {"where": "label = 'sport' AND length(text) > 5"}}},
                      base_dir=project)
    assert cfg.targets["sport"].where.startswith("label")
    found = problems({**minimal(), "targets": {"a": {"where": "label = "}, "b": {"where": "1=1; DROP TABLE x"}}},
                     base_dir=project)
    assert any("targets.a.where: does not parse" in p for p in found)
    assert any(p.startswith("targets.b.where: ") for p in found)  # a second statement never runs


def test_task_specific_columns(project: Path):
    cfg = load_config({**minimal(), "task": "causal_lm"}, base_dir=project)
    assert (cfg.data.prompt_column, cfg.data.response_column, cfg.data.label_column) == ("prompt", "response", None)
    found = problems({**minimal(), "data": {"path": "data/pool.parquet", "prompt_column": "q"}}, base_dir=project)
    assert any("data.prompt_column: only used with task causal_lm" in p for p in found)
    found = problems({**minimal(), "data": {"path": "data/pool.parquet", "id_column": "text"}}, base_dir=project)
    assert any("same column is used for two roles: ['text']" in p for p in found)


def test_other_value_checks(project: Path):
    found = problems({**minimal(), "storage_root": "gs://bucket/x", "device": "tpu", "compression": {"dtype": "int2"},
                      "estimators": ["tracin", "tracin"], "estimator_options": {"lissa_iters": 3},
                      "curation": {"query": "top_k", "params": {"kk": 3, "method": "lissa"}}}, base_dir=project)
    text = "\n".join(found)
    for expected in ("storage_root: 'gs://bucket/x': object-store roots must be s3://bucket/prefix", "device: 'tpu'", "compression.dtype",
                     "estimators: listed more than once: ['tracin']", "estimator_options.lissa_iters: unknown",
                     "curation.params.kk: query 'top_k' takes no such parameter",
                     "curation.params.method: 'lissa' is not a ranking this config writes for a target set",
                     "curation.params: query 'top_k' needs ['k']"):
        assert expected in text
    with pytest.raises(ConfigError, match="not valid YAML"):
        (project / "bad.yaml").write_text("data: [unclosed")
        load_config(project / "bad.yaml")


def test_self_is_the_self_influence_target_set(project: Path):
    """'self' names the self-influence rankings: no configured target set may take it; curation may select it,
    with a method that scores it."""
    found = problems({**minimal(), "targets": {"self": {"path": "data/val.parquet"}}}, base_dir=project)
    assert any("targets: 'self' is reserved for the self-influence scores" in p for p in found), found
    cfg = load_config({**minimal(), "curation": {"query": "drop_harmful",
                                                 "params": {"target_set": "self", "method": "tracin",
                                                            "fraction": 0.05}}},
                      base_dir=project)
    assert cfg.curation.params["target_set"] == "self"
    found = problems({**minimal(), "curation": {"query": "drop_harmful",
                                                "params": {"target_set": "self", "method": "datainf"}}},
                     base_dir=project)
    assert any("curation.params.method: target set 'self' holds ['hyperinf', 'tracin', 'loss', 'margin', 'aum', "
               "'probe'], not 'datainf'" in p for p in found), found
    # a target-free ranking under a configured target set: say where it is stored
    found = problems({**minimal(), "curation": {"query": "drop_harmful", "params": {
        "target_set": "clean_val", "method": "aum", "fraction": 0.1}}}, base_dir=project)
    assert found == ["curation.params.method: 'aum' ranks without a target set: it is stored under target set "
                     "'self' (set curation.params.target_set: self)"]


def test_keys_of_earlier_versions_name_their_replacement(project: Path):
    """projection_* (the JL projection, removed) are refused with where their meaning went, beside any other
    problem of the same file."""
    found = problems({**minimal(), "projection_dim": 8192, "projection_dtype": "float16", "device": "tpu"},
                     base_dir=project)
    assert any(p.startswith("projection_dim: replaced by compression.sketch_dim") for p in found), found
    assert "projection_dtype: replaced by compression.dtype" in found
    assert any(p.startswith("device:") for p in found) and len(found) == 3


def test_evaluation_block(project: Path):
    """The evaluation block: defaults, candidates, relative test path, and every problem with the others."""
    cfg = load_config({**minimal(), "evaluation": {"test": {"path": "data/val.parquet"}}}, base_dir=project)
    ev = cfg.evaluation
    assert ev.test.path == project / "data" / "val.parquet" and ev.fractions == (0.2,) and ev.seeds == 2
    assert ev.queries == ("drop_issues", "relabel") and ev.validation == 0.5
    assert cfg.evaluation_target == "clean_val" and cfg.curation_auto and cfg.export_name == "auto"
    assert [c.name for c in cfg.evaluation_candidates] == [
        "drop_issues(hyperinf)", "drop_issues(fused)", "relabel(hyperinf, 0.2)", "relabel(fused, 0.2)"]
    # the curation's own drop_issues cap is the one its candidates are measured with
    capped = load_config({**minimal(), "curation": {"query": "drop_issues", "params": {"max_fraction": 0.1}},
                          "evaluation": {"test": {"path": "data/val.parquet"}}}, base_dir=project)
    issues = [c for c in capped.evaluation_candidates if c.query == "drop_issues"]
    assert [c.name for c in issues] == ["drop_issues(hyperinf, max 0.1)", "drop_issues(fused, max 0.1)"]
    assert {c.params["max_fraction"] for c in issues} == {0.1}
    causal = problems({**minimal(), "task": "causal_lm", "evaluation": {"test": {"path": "data/val.parquet"}}},
                      base_dir=project)
    assert causal == ["evaluation.queries: ['drop_issues', 'relabel'] read label suggestions, which need classes "
                      "(task causal_lm has none): use drop_harmful or top_fraction"]
    assert problems({**minimal(), "task": "causal_lm", "curation": {"query": "relabel", "params": {
        "fraction": 0.2}}}, base_dir=project)[0].startswith("curation.query: 'relabel' reads label suggestions")
    # a causal LM's evaluation compares the curation's default ranking (the cover one), unbalanced, with fused
    top = {"test": {"path": "data/val.parquet"}, "queries": ["top_fraction"]}
    llm = load_config({**minimal(), "task": "causal_lm", "evaluation": top}, base_dir=project)
    assert [c.name for c in llm.evaluation_candidates] == ["top_fraction(hyperinf_cover, 0.2)", "top_fraction(fused, 0.2)"]
    both = load_config({**minimal(), "task": "causal_lm", "evaluation": {**top, "queries": ["top_fraction", "drop_harmful"],
                                                                       "methods": ["hyperinf_cover", "hyperinf"]}},
                       base_dir=project)  # a cover ranking has no harmful end: no drop_harmful(hyperinf_cover)
    assert [c.name for c in both.evaluation_candidates] == [
        "top_fraction(hyperinf_cover, 0.2)", "top_fraction(hyperinf, 0.2)", "drop_harmful(hyperinf, 0.2)"]
    default_drop = load_config({**minimal(), "task": "causal_lm", "evaluation": {**top, "queries": ["drop_harmful"]}},
                               base_dir=project)
    assert [c.name for c in default_drop.evaluation_candidates] == ["drop_harmful(hyperinf, 0.2)",
                                                                   "drop_harmful(fused, 0.2)"]
    # a query that reads the harmful end or the sign takes the estimator itself, and refuses a cover ranking
    harm = load_config({**minimal(), "task": "causal_lm", "curation": {"query": "drop_harmful", "params": {
        "fraction": 0.1}}}, base_dir=project)
    assert harm.curation.params["method"] == "hyperinf"
    assert problems({**minimal(), "task": "causal_lm", "curation": {"query": "conflicts", "params": {
        "set_a": "clean_val", "set_b": "clean_val", "method": "hyperinf_cover"}}}, base_dir=project) == [
        "curation.params.method: 'hyperinf_cover' ranks by a best percentile in (0, 1], with no sign and no harmful "
        "end, which query 'conflicts' reads: use method: hyperinf (the cover rankings drive top_fraction, top_k, "
        "class_balanced_top_k)"]
    assert load_config(cfg.to_dict()) == cfg
    grid = load_config({**minimal(), "evaluation": {"test": {"path": "data/val.parquet"}, "queries": ["top_fraction"],
                                                    "methods": ["loss", "hyperinf"], "fractions": [0.8],
                                                    "balance": [False, True]}}, base_dir=project)
    assert [(c.name, c.target_set) for c in grid.evaluation_candidates] == [
        ("top_fraction(loss, 0.8)", "self"), ("top_fraction(loss, 0.8, balanced)", "self"),
        ("top_fraction(hyperinf, 0.8)", "clean_val"), ("top_fraction(hyperinf, 0.8, balanced)", "clean_val")]
    fixed = load_config({**minimal(), "curation": {"method": "fixed"},
                         "evaluation": {"test": {"path": "data/val.parquet"}}}, base_dir=project)
    assert not fixed.curation_auto and fixed.export_name == DEFAULT_CURATION["query"]
    assert problems({**minimal(), "curation": {"method": "auto"}}, base_dir=project) == [
        "curation.method: auto chooses by the evaluation: add an `evaluation:` block (a labelled test file), or "
        "use method: fixed"]
    found = problems({**minimal(), "evaluation": {
        "test": {"path": "data/nope.parquet"}, "fractions": [0, 1.5], "seeds": 0, "methods": ["lissa", "hyperinff"],
        "target_set": "clean_vall", "queries": ["keep_all"], "validation": 1}}, base_dir=project)
    text = "\n".join(found)
    assert "evaluation.test.path:" in text and "nope.parquet' is not a file" in text
    assert "evaluation.fractions[0]: must be > 0" in text and "evaluation.fractions[1]: must be <= 1" in text
    assert "evaluation.seeds: must be >= 1" in text and "evaluation.validation: must be < 1" in text
    assert "evaluation.queries[0]: 'keep_all' is not one of" in text
    assert "evaluation.target_set: 'clean_vall' is not a configured target set" in text
    assert "did you mean 'clean_val'" in text
    assert "evaluation.methods: ['lissa', 'hyperinff'] are not rankings this config writes" in text


def test_signals_block(project: Path):
    """`signals`: which rankings exist decides what `fuse`, the curation and the evaluation may name."""
    cfg = load_config({**minimal(), "signals": {"folds": 3, "fuse": ["confident", "aum", "hyperinf"]},
                       "curation": {"query": "relabel", "params": {"method": "confident", "fraction": 1}}},
                      base_dir=project)
    assert cfg.fusion_members == ("confident", "aum", "hyperinf") and cfg.curation.params["target_set"] == "self"
    found = problems({**minimal(), "signals": {"folds": 1, "checkpoints": False,
                                               "fuse": ["confident", "hyperinf_cp", "los"]}}, base_dir=project)
    text = "\n".join(found)
    assert "signals.folds: one fold leaves nothing out" in text
    assert "signals.fuse: 'hyperinf_cp' is not a ranking this config writes (needs signals.checkpoints: true and " \
           "hyperinf)" in text
    assert "signals.fuse: 'los' is not a ranking this config writes (did you mean 'loss'?" in text
    causal = problems({**minimal(), "task": "causal_lm", "signals": {"fuse": ["margin", "loss"]}}, base_dir=project)
    assert causal == ["signals.fuse: 'margin' is not a ranking this config writes (needs classes)"]


@pytest.mark.parametrize(("curation", "problem"), [
    ({"query": "top_fraction", "params": {"fraction": "lots"}},
     "curation.params.fraction: input should be a valid number, got 'lots'"),
    ({"query": "top_fraction", "params": {"fraction": "0.8"}},
     "curation.params.fraction: input should be a valid number, got '0.8'"),
    ({"query": "top_fraction", "params": {"fraction": 0}},
     "curation.params.fraction: input should be greater than 0, got 0"),
    ({"query": "top_fraction", "params": {"fraction": 1.5}},
     "curation.params.fraction: input should be less than or equal to 1, got 1.5"),
    ({"query": "top_fraction", "params": {"fraction": 0.5, "balance": "yes"}},
     "curation.params.balance: input should be a valid boolean, got 'yes'"),
    ({"query": "relabel", "params": {"fraction": 0}}, "curation.params.fraction: input should be greater than 0, got 0"),
    ({"query": "drop_harmful", "params": {"fraction": 1}},
     "curation.params.fraction: input should be less than 1, got 1"),
    ({"query": "top_k", "params": {"k": 0}}, "curation.params.k: input should be greater than or equal to 1, got 0"),
    ({"query": "mislabel_candidates", "params": {"n": 2.5}}, "curation.params.n: input should be a valid integer, got 2.5"),
])
def test_curation_parameter_types_and_ranges(project: Path, curation: dict, problem: str):
    """A wrong type fails with the config (not in DuckDB after the run); an empty subset is refused (it would
    replace the last good export)."""
    assert problem in problems({**minimal(), "curation": curation}, base_dir=project)


def test_curation_parameters_in_range_pass(project: Path):
    for curation in ({"query": "top_fraction", "params": {"fraction": 1}},
                     {"query": "top_fraction", "params": {"fraction": 0.25, "balance": False}},
                     {"query": "drop_harmful", "params": {"fraction": 0}}, {"query": "top_k", "params": {"k": 3}},
                     {"query": "relabel", "params": {"fraction": 1}}, {"query": "drop_issues"}):
        load_config({**minimal(), "curation": curation}, base_dir=project)


def test_a_storage_root_that_is_a_file(project: Path):
    assert problems({**minimal(), "storage_root": "data/pool.parquet"}, base_dir=project) == [
        f"storage_root: '{project / 'data' / 'pool.parquet'}' is a file; give a folder (created when missing)"]


def test_an_empty_path_is_refused(project: Path):
    """`storage_root: ''` would write the tables under the filesystem root (issue 19, route 1); an empty pool or
    target path would read the config's folder."""
    empty = "must not be empty: give a path relative to the config file's folder, or an absolute one"
    assert problems({**minimal(), "storage_root": ""}, base_dir=project) == [f"storage_root: {empty}"]
    assert problems({**minimal(), "storage_root": "  ", "data": {"path": ""}}, base_dir=project) == [
        f"data.path: {empty}", f"storage_root: {empty}"]


def test_relative_model_folder_resolves_against_the_config_folder(project: Path, monkeypatch: pytest.MonkeyPatch):
    (project / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir("/")
    assert problems(write(project, {**minimal(), "model": "models/mine"})) == [  # caught before any work
        f"model: '{project / 'models' / 'mine'}' has no config.json: give a Hugging Face model folder (the one "
        "save_pretrained writes: config.json, the weights and the tokenizer)"]
    (project / "models" / "mine" / "config.json").write_text("{}")
    assert load_config(write(project, {**minimal(), "model": "models/mine"})).model == str(project / "models" / "mine")


@pytest.mark.parametrize(("doc", "problem"), [
    ({"estimator_options": {"schulz_order": 0}}, "estimator_options.schulz_order: must be >= 2, got 0"),
    ({"damping_ratio": float("nan")}, "damping_ratio: must be a finite number, got nan"),
    ({"train": {"lr": float("nan")}}, "train.lr: must be a finite number, got nan"),
    # values past which a number is a typo (issue 19: accepted silently before)
    ({"train": {"epochs": 1e23}}, "train.epochs: expected an integer, got float 1e+23"),
    ({"train": {"epochs": 100_000}}, "train.epochs: must be <= 1000, got 100000"),
    ({"damping_ratio": 1e30}, "damping_ratio: must be <= 100.0, got 1e+30"),
    ({"lora": {"rank": 10**9}}, "lora.rank: must be <= 4096, got 1000000000"),
])
def test_solver_options_and_nan_numbers(project: Path, doc: dict, problem: str):
    assert problem in problems({**minimal(), **doc}, base_dir=project)


def test_a_nan_curation_parameter_is_one_problem(project: Path):
    assert problems({**minimal(), "curation": {"query": "top_fraction", "params": {"fraction": float("nan")}}},
                    base_dir=project) == ["curation.params: fraction: must be a finite number, got nan"]


def test_the_yaml_is_read_strictly(project: Path):
    """What PyYAML accepts silently or slowly (issue 19): `2e-3` is the number (YAML 1.1 made it a string), a key
    given twice is refused, an alias bomb fails at once, a folder given as the config names the file to give."""
    base = "data: {path: data/pool.parquet}\ntargets: {clean_val: {path: data/val.parquet}}\n"
    path = project / "hyperinf.yaml"
    path.write_text(base + "train: {lr: 2e-3, epochs: 3}\n")
    assert load_config(path).train.lr == 0.002
    path.write_text(base + "damping_ratio: 0.1\ndamping_ratio: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'damping_ratio' is given twice in one mapping \(first on "
                                          r"line 3\): keep one"):
        load_config(path)
    path.write_text(base + "base: &b {epochs: 3}\ntrain: {<<: *b, epochs: 4}\n")  # a merge key may be overridden
    assert problems(path) == ["base: unknown key"]
    levels = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]'] + [
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    path.write_text("\n".join(levels) + "\n")  # 9**9 strings once expanded
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than 100,000 values"):
        load_config(path)
    assert time.perf_counter() - start < 5
    with pytest.raises(ConfigError, match=r"is a folder: give the config file in it \(e\.g\. '.*hyperinf\.yaml'\)"):
        load_config(project)


def test_a_storage_root_that_cannot_be_created_is_one_line(tmp_path: Path):
    refused = pytest.raises(ConfigError, match=r"^storage_root: cannot create /proc/x: No such file or directory; "
                                               r"give a folder this user can write$")
    with refused, hold_root("/proc/x", tmp_path / "hyperinf.yaml"):
        pass


def test_a_config_that_is_not_utf8(project: Path):
    path = project / "latin1.yaml"
    path.write_bytes(b"storage_root: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not a UTF-8 text file \(invalid start byte at byte 14\)"):
        load_config(path)
