"""per_example_lora_gradients against a bs=1 backward loop (each example alone, unpadded), padding leaks,
module selection, model-state hygiene and error cases. Tiny random models run in fp64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hyperinf_ops.core.gradients import lora_matrix_shapes, per_example_lora_gradients
from hyperinf_ops.errors import DataError, GradientMismatchError
from hyperinf_ops.models import resolve_model

VOCAB = 500
PAD = 1  # RoBERTa's padding_idx; reused as the pad id everywhere


def _lora(model, targets, task, r=4, **kw):
    torch.manual_seed(1)
    # init_lora_weights=False: lora_B != 0, so lora_A grads are nonzero; the call must switch dropout off
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.1,
        target_modules=targets,
        init_lora_weights=False,
        task_type=task,
        **kw,
    )
    return get_peft_model(model, cfg)


# tiny random architectures; every config shares these sizes
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
)


def _build(name: str):
    torch.manual_seed(0)
    if name in ("bert", "bert_pooler"):
        head = BertForSequenceClassification(BertConfig(**TINY, num_labels=3, pad_token_id=PAD))
        # pooler.dense sees one vector per example (B, d): the no-token-axis path
        targets = ["query", "value"] if name == "bert" else ["query", "pooler.dense"]
        model = _lora(head, targets, "SEQ_CLS")
    elif name == "roberta":
        cfg = RobertaConfig(**TINY, max_position_embeddings=66, num_labels=3, pad_token_id=PAD)
        model = _lora(RobertaForSequenceClassification(cfg), ["query", "value"], "SEQ_CLS")
    elif name == "albert":  # one layer shared by both blocks: each LoRA matrix runs twice per forward
        cfg = AlbertConfig(**TINY, embedding_size=32, num_hidden_groups=1, num_labels=3, pad_token_id=PAD)
        model = _lora(AlbertForSequenceClassification(cfg), ["query", "value"], "SEQ_CLS")
    elif name in ("llama", "llama_cls"):
        cfg = LlamaConfig(**TINY, num_key_value_heads=2, num_labels=3, pad_token_id=PAD)
        head = LlamaForSequenceClassification(cfg) if name == "llama_cls" else LlamaForCausalLM(cfg)
        model = _lora(head, ["q_proj", "v_proj"], "SEQ_CLS" if name == "llama_cls" else "CAUSAL_LM")
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4)
        model = _lora(GPT2LMHeadModel(cfg), ["c_attn"], "CAUSAL_LM", fan_in_fan_out=True)
    model.double().train()  # train mode on purpose: the call must switch LoRA dropout off
    return model


@pytest.fixture(scope="module")
def models():
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = _build(name)
        return cache[name]

    return get


def _seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def _token_labels(seqs, prompt_lengths):
    """Causal LM labels: the token ids with the first k (prompt) tokens set to -100."""
    out = []
    for s, k in zip(seqs, prompt_lengths, strict=True):
        y = s.clone()
        y[:k] = -100
        out.append(y)
    return out


def _collate(seqs, labels, side, extra=0, pad_label=-100, garbage=False):
    """Pad to the longest sequence + ``extra`` columns on ``side``. ``garbage`` fills padded positions with
    random ids instead of PAD (the mask alone must hide them). Token labels are padded with ``pad_label``."""
    width = max(len(s) for s in seqs) + extra
    g = torch.Generator().manual_seed(7)
    rows, masks, ys = [], [], []
    for s, y in zip(seqs, labels, strict=True):
        n = width - len(s)
        fill = torch.randint(3, VOCAB, (n,), generator=g) if garbage else torch.full((n,), PAD)
        parts = [fill, s] if side == "left" else [s, fill]
        rows.append(torch.cat(parts))
        m = [torch.zeros(n, dtype=torch.long), torch.ones(len(s), dtype=torch.long)]
        masks.append(torch.cat(m if side == "left" else m[::-1]))
        if y.dim() == 1:
            pad = torch.full((n,), pad_label)
            ys.append(torch.cat([pad, y] if side == "left" else [y, pad]))
    batch = {"input_ids": torch.stack(rows), "attention_mask": torch.stack(masks)}
    batch["labels"] = torch.stack(ys) if ys else torch.stack(labels)
    return batch


def _loop_grads(model, names, seqs, labels, causal):
    """Reference: each example alone, unpadded, ordinary loss.backward(), read .grad (lora_B transposed)."""
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for ids, y in zip(seqs, labels, strict=True):
        model.zero_grad(set_to_none=True)
        if causal:  # mean next-token CE over the non-ignored targets, in the model's dtype
            logits = model(input_ids=ids[None]).logits[0]
            loss = F.cross_entropy(logits[:-1], y[1:], ignore_index=-100)
        else:  # HF's own classification loss
            loss = model(input_ids=ids[None], labels=y.view(1)).loss
        loss.backward()
        for n in names:
            g = params[n].grad
            out[n].append((g.T if ".lora_B." in n else g).clone())
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: torch.stack(v) for n, v in out.items()}


def _max_rel_err(got, ref):
    assert list(got) == sorted(ref)
    errs = []
    for n, r in ref.items():
        assert got[n].shape == r.shape, n
        assert r.norm() > 0, f"degenerate reference for {n}"
        errs.append(((got[n] - r).norm() / r.norm()).item())
    return max(errs)


CLS_LENGTHS, CLS_LABELS = [7, 12, 4, 9], torch.tensor([0, 2, 1, 1])


@pytest.mark.parametrize(
    ("name", "side"),
    [
        ("bert", "right"),
        ("bert_pooler", "right"),
        ("roberta", "right"),
        ("albert", "right"),
        ("llama_cls", "left"),
    ],
)
def test_classification_matches_bs1_loop(models, name, side):
    """Encoders pool position 0, so they are right-padded; RoBERTa derives its own (offset) positions; a
    decoder classifier is left-padded and needs mask-derived position_ids to match the unpadded run."""
    model = models(name)
    seqs = _seqs(CLS_LENGTHS)
    batch = _collate(seqs, list(CLS_LABELS), side)
    got = per_example_lora_gradients(model, batch)
    assert model.training  # mode restored
    ref = _loop_grads(model, list(got), seqs, list(CLS_LABELS), causal=False)
    assert list(got) == list(lora_matrix_shapes(model))
    assert _max_rel_err(got, ref) <= 1e-10


@pytest.mark.parametrize(
    ("name", "side", "pad_label"),
    [("llama", "right", -100), ("llama", "left", -100), ("llama", "left", PAD), ("gpt2", "left", PAD)],
)
def test_causal_lm_matches_bs1_loop(models, name, side, pad_label):
    """-100 prompt tokens; pad_label=PAD: the collator labelled padding, which must not become a target."""
    model = models(name)
    seqs = _seqs([6, 11, 3, 8], seed=1)
    labels = _token_labels(seqs, [2, 5, 0, 3])
    got = per_example_lora_gradients(model, _collate(seqs, labels, side, pad_label=pad_label))
    ref = _loop_grads(model, list(got), seqs, labels, causal=True)
    assert _max_rel_err(got, ref) <= 1e-10


def test_bfloat16_model_gives_float32_gradients(models):
    """A model cast to bf16 whole (LoRA matrices included) runs in bf16, but the per-example sums over tokens
    are taken and returned in float32."""
    model = models("llama")
    seqs = _seqs([6, 11, 3], seed=4)
    batch = _collate(seqs, _token_labels(seqs, [2, 5, 0]), "left")
    ref = per_example_lora_gradients(model, batch)
    got = per_example_lora_gradients(copy.deepcopy(model).bfloat16(), batch)
    assert all(g.dtype == torch.float32 for g in got.values())
    assert _max_rel_err({n: g.double() for n, g in got.items()}, ref) <= 0.05


@pytest.mark.parametrize(("name", "side"), [("bert", "right"), ("llama", "left")])
def test_extra_padding_does_not_leak(models, name, side):
    model = models(name)
    seqs = _seqs([5, 9, 3], seed=2)
    labels = _token_labels(seqs, [1, 2, 0]) if name == "llama" else [torch.tensor(i) for i in (0, 1, 2)]
    tight = per_example_lora_gradients(model, _collate(seqs, labels, side))
    # 6 more padded columns holding random (not PAD) ids: only the attention mask hides them
    loose = per_example_lora_gradients(model, _collate(seqs, labels, side, extra=6, garbage=True))
    for n in tight:
        torch.testing.assert_close(loose[n], tight[n], rtol=1e-10, atol=1e-12)


def test_mean_of_per_example_grads_is_batch_gradient(models):
    model = models("bert")
    batch = _collate(_seqs(CLS_LENGTHS), list(CLS_LABELS), "right")
    got = per_example_lora_gradients(model, batch)
    model.eval()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()  # HF: mean cross-entropy over the batch
    params = dict(model.named_parameters())
    for n, g in got.items():
        full = params[n].grad.T if ".lora_B." in n else params[n].grad
        torch.testing.assert_close(g.mean(0), full, rtol=1e-10, atol=1e-12)
    model.zero_grad(set_to_none=True)
    model.train()


def test_module_selection_and_shapes(models):
    model = models("bert")
    batch = _collate(_seqs(CLS_LENGTHS), list(CLS_LABELS), "right")
    full = per_example_lora_gradients(model, batch)
    names = dict(model.named_parameters())
    assert list(full) == sorted(full) and set(full) <= set(names)
    shapes = lora_matrix_shapes(model)
    assert list(shapes) == list(full)
    for n, g in full.items():
        assert g.shape == (4, *shapes[n])
        assert shapes[n] == ((4, 64) if ".lora_A." in n else names[n].shape[::-1])

    query = per_example_lora_gradients(model, batch, modules="query")  # a bare str is one pattern
    assert list(query) == [n for n in full if ".query." in n] and len(query) == 4
    for n, g in query.items():
        torch.testing.assert_close(g, full[n], rtol=1e-12, atol=0)
    layer1_b = per_example_lora_gradients(model, batch, modules=["layer.1.attention.self.value.lora_B"])
    assert list(layer1_b) == [n for n in full if "layer.1." in n and ".value.lora_B." in n]
    assert list(lora_matrix_shapes(model, ["layer.0."])) == [n for n in full if "layer.0." in n]


def test_model_state_is_left_alone(models):
    model = models("bert")
    batch = _collate(_seqs(CLS_LENGTHS), list(CLS_LABELS), "right")
    ref = per_example_lora_gradients(model, batch)
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    model.classifier.eval()  # mixed train/eval modes must come back exactly
    for p in lora:
        p.requires_grad_(False)  # e.g. an adapter loaded for inference
    try:
        got = per_example_lora_gradients(model, batch, dtype=torch.float32)
        assert model.training and not model.classifier.training
        assert not any(p.requires_grad for p in lora)
        assert all(p.grad is None for p in model.parameters())
        for n, g in got.items():
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, ref[n].float())
    finally:
        for p in lora:
            p.requires_grad_(True)
        model.train()


def test_errors(models):
    bert, llama = models("bert"), models("llama")
    batch = _collate(_seqs(CLS_LENGTHS), list(CLS_LABELS), "right")
    torch.manual_seed(0)
    plain = BertForSequenceClassification(bert.config)
    with pytest.raises(GradientMismatchError, match="no LoRA matrices"):
        per_example_lora_gradients(plain, batch)
    with pytest.raises(GradientMismatchError, match="selects none"):
        per_example_lora_gradients(bert, batch, modules=["key"])
    with pytest.raises(GradientMismatchError, match="selects none"):
        lora_matrix_shapes(bert, ["classifier"])  # modules_to_save heads are never LoRA matrices
    with pytest.raises(DataError, match="no 'labels'"):
        per_example_lora_gradients(bert, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(DataError, match=r"examples \[2\]"):
        per_example_lora_gradients(bert, {**batch, "labels": torch.tensor([0, 1, 3, 1])})
    headless = _lora(BertModel(bert.config), ["query"], None)
    with pytest.raises(GradientMismatchError, match="unsupported model head"):
        per_example_lora_gradients(headless, batch)
    with bert.disable_adapter(), pytest.raises(GradientMismatchError, match="not used in the forward"):
        per_example_lora_gradients(bert, batch)
    dora = _lora(BertForSequenceClassification(bert.config), ["query"], "SEQ_CLS", use_dora=True)
    with pytest.raises(GradientMismatchError, match="DoRA"):
        lora_matrix_shapes(dora)
    conv = get_peft_model(
        torch.nn.Sequential(torch.nn.Conv1d(4, 4, 1)), LoraConfig(r=2, target_modules=["0"])
    )
    with pytest.raises(GradientMismatchError, match="only nn.Linear"):
        lora_matrix_shapes(conv)

    seqs = _seqs([6, 4, 5], seed=3)
    labels = _token_labels(seqs, [2, 4, 1])  # example 1: every token is prompt
    with pytest.raises(DataError, match=r"examples \[1\] have no target tokens"):
        per_example_lora_gradients(llama, _collate(seqs, labels, "left"))
    with pytest.raises(DataError, match="shape of input_ids"):
        per_example_lora_gradients(
            llama, {**_collate(seqs, labels, "left"), "labels": torch.tensor([1, 2, 3])}
        )
    for m in (bert, llama):
        assert m.training and all(p.grad is None for p in m.parameters())


@pytest.mark.real_weights
def test_real_minilm_matches_bs1_loop():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging

    path = resolve_model("minilm")  # the bundled weights: installed by make setup
    tok = AutoTokenizer.from_pretrained(path)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new classification head is reported "missing", as expected
    try:
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    finally:
        logging.set_verbosity(verbosity)
    model = _lora(base, ["query", "value"], "SEQ_CLS", r=8)
    texts = [
        "A man is eating food.",
        "The stock market fell sharply today after the announcement.",
        "Great film!",
        "I would not recommend this restaurant to anyone who values their time.",
    ]
    labels = torch.tensor([1, 0, 1, 0])
    batch = {**tok(texts, padding=True, return_tensors="pt"), "labels": labels}
    got = per_example_lora_gradients(model, batch)
    assert len(got) == 24  # 6 layers x (query, value) x (A, B)
    seqs = [ids[m.bool()] for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    ref = _loop_grads(model, list(got), seqs, list(labels), causal=False)
    assert _max_rel_err(got, ref) <= 1e-4
