"""models/ and tasks.py: model resolution errors, collation masks, causal-LM prompt masking, adapter round trips."""

from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model

from hyperinf_ops.config import load_config
from hyperinf_ops.errors import ConfigError, DataError, ModelLoadError
from hyperinf_ops.models import adapter_hash, load_lora_model, model_hash, pooling_of, resolve_model
from hyperinf_ops.tasks import IGNORE_INDEX, get_task

CHAT = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), task="causal_lm")


def cfg_for(folder: Path, tmp_path: Path, task: str = "classification", **extra):
    (tmp_path / "pool.csv").write_text("text,label\nx,y\n")
    return load_config({"model": str(folder), "task": task, "data": {"path": "pool.csv"},
                        "targets": {"t": {"path": "pool.csv"}}, "lora": {"rank": 4, "alpha": 8, **extra}},
                       base_dir=tmp_path)


def load(cfg, labels, adapter_dir: Path | None = None):
    """The config's model with a fresh adapter (its LoRA settings, seeded) or the saved one in adapter_dir."""
    return load_lora_model(cfg.model_spec, labels or [], lora=None if adapter_dir else cfg.lora,
                           adapter_dir=adapter_dir, seed=cfg.train.seed)


def collate(tokenizer, records, task: str, label2id, max_length: int):
    return get_task(task).collate(tokenizer, records, label2id, max_length)


def test_resolve_model(tmp_path: Path, tiny_bert: Path):
    assert (resolve_model("minilm") / "config.json").is_file()
    assert resolve_model(str(tiny_bert)) == tiny_bert
    with pytest.raises(ModelLoadError, match=r"not a bundled name \(minilm, smollm2\) and no folder"):
        resolve_model(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="has no weights"):
        resolve_model(tmp_path)
    assert model_hash(tiny_bert) == model_hash(tiny_bert) != model_hash(resolve_model("minilm"))


def test_collate_classification(tmp_path: Path, tiny_bert: Path):
    loaded = load(cfg_for(tiny_bert, tmp_path), ["neg", "pos"])
    records = [{"sample_id": "a", "text": "a good film", "label": "pos"},
               {"sample_id": "b", "text": "bad", "label": "neg"}]
    batch = collate(loaded.tokenizer, records, "classification", loaded.label2id, max_length=16)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["input_ids"].shape == (2, 5)
    long = collate(loaded.tokenizer, [{"text": "good " * 50, "label": "pos"}], "classification",
                   loaded.label2id, max_length=8)
    assert long["input_ids"].shape == (1, 8)
    with pytest.raises(DataError, match=r"sample_id\(s\) \['b'\] tokenizes to nothing"):
        collate(loaded.tokenizer, [records[0], {**records[1], "text": " \t "}], "classification",
                loaded.label2id, 16)
    with pytest.raises(DataError, match=r"labels \['maybe'\] are not in the model's label set"):
        collate(loaded.tokenizer, [{**records[0], "label": "maybe"}], "classification", loaded.label2id, 16)


@pytest.mark.parametrize("template", [None, CHAT])
def test_collate_causal_masks_the_prompt(tmp_path: Path, template: str | None):
    folder = save_tiny_model(tmp_path / "m", task="causal_lm", chat_template=template)
    loaded = load(cfg_for(folder, tmp_path, "causal_lm"), None)
    tok = loaded.tokenizer
    records = [{"sample_id": "a", "prompt": "what is good", "response": "fun"},
               {"sample_id": "b", "prompt": "hi", "response": "hello you"}]
    batch = collate(tok, records, "causal_lm", {}, max_length=64)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    for i, r in enumerate(records):
        real = mask[i].bool()
        labelled = labels[i][labels[i] != IGNORE_INDEX]
        # exactly the response tokens (+ eos) are labelled, and they are the row's last real tokens
        assert labelled.tolist()[-1] == tok.eos_token_id
        assert r["response"] in tok.decode(labelled)
        assert r["prompt"] not in tok.decode(labelled)
        n_real = int(real.sum())
        assert torch.equal(ids[i, n_real - len(labelled): n_real], labelled)
        assert (labels[i][~real] == IGNORE_INDEX).all() and (ids[i][~real] == tok.pad_token_id).all()
        if template is not None:
            assert tok.decode(ids[i][real]).startswith("<s> user")
    # over-long: a short response survives whole, the prompt is cut from the left
    cut = collate(tok, [{"prompt": "the " * 40 + "end", "response": "fun fun"}], "causal_lm", {}, max_length=12)
    assert cut["input_ids"].shape[1] == 12 and (cut["labels"] != IGNORE_INDEX).sum() >= 3
    task = get_task("causal_lm")
    prompt, response = task.token_ids(tok, {"prompt": "the " * 40 + "end", "response": "fun fun"})
    assert cut["input_ids"][0].tolist() == prompt[-(12 - len(response)):] + response
    # a long response keeps its start and leaves the prompt's end half of max_length: the request it answers
    both = {"prompt": "the " * 40 + "end", "response": "fun " * 40}
    cut = collate(tok, [both], "causal_lm", {}, max_length=12)
    prompt, response = task.token_ids(tok, both)
    kept = cut["labels"][0] != IGNORE_INDEX
    assert int((~kept).sum()) == 6 and cut["input_ids"][0, :6].tolist() == prompt[-6:]
    assert cut["input_ids"][0, 6:].tolist() == response[:6] and tok.eos_token_id not in cut["labels"][0].tolist()
    assert task.token_lengths(tok, [both, records[0]]) == [len(prompt) + len(response),
                                                          sum(map(len, task.token_ids(tok, records[0])))]
    with pytest.raises(DataError, match=r"response of sample_id\(s\) \['b'\] tokenizes to nothing"):
        collate(tok, [records[0], {**records[1], "response": "   "}], "causal_lm", {}, 64)


def test_an_over_long_pool_is_warned_with_its_share_and_the_cut(tmp_path: Path):
    """The warm-up warns (once, from a sample) what share of the pool max_length cuts and what the cut keeps."""
    from hyperinf_ops.stages.adapter import over_length_warning

    folder = save_tiny_model(tmp_path / "m", task="causal_lm")
    loaded = load(cfg_for(folder, tmp_path, "causal_lm"), None)
    short, long = {"prompt": "hi", "response": "fun"}, {"prompt": "the " * 40, "response": "fun"}
    assert over_length_warning(loaded, [short] * 3, 16) is None
    warning = over_length_warning(loaded, [short] * 3 + [long], 16)
    assert warning.startswith("1 of the pool's 4 examples (25.0%) are longer than max_length 16 tokens (longest 4")
    assert warning.endswith(f"{loaded.task.truncation}; raise max_length to keep them whole")


def test_adapter_round_trip(tmp_path: Path, tiny_bert: Path):
    cfg = cfg_for(tiny_bert, tmp_path)
    loaded = load(cfg, ["neg", "pos"])
    assert loaded.lora_modules == ("query", "value")  # the default for BERT
    with torch.no_grad():  # stand-in for training: every adapter tensor moves
        for p in loaded.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    batch = collate(loaded.tokenizer, [{"text": "a good film", "label": "pos"}, {"text": "dull", "label": "neg"}],
                    "classification", loaded.label2id, 16)
    loaded.model.eval()
    logits = loaded.model(**batch).logits
    loaded.model.save_pretrained(tmp_path / "adapter")
    again = load(cfg, ["neg", "pos"], adapter_dir=tmp_path / "adapter")
    again.model.eval()
    assert torch.equal(again.model(**batch).logits, logits)
    assert adapter_hash(again.model) == adapter_hash(loaded.model)
    # the head is part of the adapter: a fresh head (same seed) differs from the trained one
    assert adapter_hash(load(cfg, ["neg", "pos"]).model) != adapter_hash(loaded.model)
    trainable = [n for n, p in again.model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("modules_to_save" in n for n in trainable)


def test_fresh_adapters_are_seeded(tmp_path: Path, tiny_bert: Path):
    cfg = cfg_for(tiny_bert, tmp_path)
    assert adapter_hash(load(cfg, ["neg", "pos"]).model) == \
        adapter_hash(load(cfg, ["neg", "pos"]).model)


def test_bad_modules_and_labels(tmp_path: Path, tiny_bert: Path):
    with pytest.raises(ConfigError, match=r"'qurey' \(did you mean 'query'\?\) match no linear layer"):
        load(cfg_for(tiny_bert, tmp_path, modules=["qurey", "value"]), ["neg", "pos"])
    with pytest.raises(DataError, match="at least 2 labels"):
        load(cfg_for(tiny_bert, tmp_path), ["pos"])


def test_mean_pooling_for_sentence_transformers_folders(tmp_path: Path):
    assert pooling_of(resolve_model("minilm")) == "mean"
    folder = save_tiny_model(tmp_path / "st")
    assert pooling_of(folder) == "model"
    cfg = cfg_for(folder, tmp_path)
    assert load(cfg, ["neg", "pos"]).pooling == "model"
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    loaded = load(cfg, ["neg", "pos"])
    assert loaded.pooling == "mean"
    model = loaded.model.eval()
    records = [{"sample_id": "a", "text": "a good film", "label": "pos"},
               {"sample_id": "b", "text": "bad", "label": "neg"}]
    batch = collate(loaded.tokenizer, records, "classification", loaded.label2id, max_length=16)
    alone = collate(loaded.tokenizer, records[1:], "classification", loaded.label2id, max_length=16)
    with torch.no_grad():
        both, single = model(**batch).logits, model(**alone).logits
        bert = model.get_base_model().bert
        hidden = bert(**{k: v for k, v in alone.items() if k != "labels"}).last_hidden_state
        expected = model.get_base_model().classifier(hidden.mean(1))
    torch.testing.assert_close(both[1], single[0])  # padding never leaks into the pooled vector
    torch.testing.assert_close(single, expected)
