"""Issue 20 item 4 on CPU: bf16 base weights with float32 LoRA / gradients, activation checkpointing, and batches
that back off on an out-of-memory, for the gradient pass and the warm-up; the settings that drive them."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import save_tiny_model
from toy_data import toy_records

from hyperinf_ops.config import load_config
from hyperinf_ops.core.gradients import lora_gradients_and_outputs, per_example_lora_gradients
from hyperinf_ops.devices import (
    activation_bytes_per_example,
    auto_batch_size,
    resolve_dtype,
    resolve_dtype_name,
    run_with_backoff,
    use_checkpointing,
)
from hyperinf_ops.errors import ModelLoadError
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.models import adapter_parameters, batches, load_lora_model
from hyperinf_ops.models.checkpointing import activation_checkpointing, checkpoint_layers
from hyperinf_ops.settings import CompressionSpec, GradientSettings, LoraSettings, ModelSpec, TrainSettings
from hyperinf_ops.stages import loading
from hyperinf_ops.training import warmup_train

PAIRS = [("hello how is the movie", "it was very good"), ("what is the plot", "a boring story"),
         ("who is the actor", "the best actor"), ("why", "i love this film"), ("how was the music", "awful"),
         ("please help", "yes"), ("is it fun", "no it was dull and not funny"), ("hi", "hello you")]


def _records(n: int = 8) -> list[dict]:
    return [{"sample_id": str(i), "prompt": PAIRS[i % len(PAIRS)][0], "response": PAIRS[i % len(PAIRS)][1]}
            for i in range(n)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama") / "model", task="causal_lm")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("bert") / "model")


def _load(folder, precision="float32", task="causal_lm", labels=(), dropout=0.0, checkpointing=False):
    spec = ModelSpec(name=str(folder), task=task, max_length=32, device="cpu", precision=precision,
                     gradient_checkpointing=checkpointing)
    loaded = load_lora_model(spec, list(labels), lora=LoraSettings(rank=4, alpha=8.0, dropout=dropout), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh lora_B is zero, which makes every lora_A gradient zero: randomise it
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return loaded


def _rel(got: dict, ref: dict) -> float:
    return max(float((got[k].double() - ref[k].double()).norm() / ref[k].double().norm()) for k in ref)


def _loop(model, batch) -> dict:
    """Per-example LoRA gradients by one backward per (unpadded) example, in the model's own dtypes."""
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    params = dict(model.named_parameters())
    out: dict[str, list] = {n: [] for n in names}
    model.eval()
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        model.zero_grad(set_to_none=True)
        keep = mask.bool()
        model(input_ids=ids[keep][None], labels=labels[keep][None]).loss.backward()
        for n in names:
            out[n].append(params[n].grad.detach().clone())
    model.zero_grad(set_to_none=True)
    # lora_B weights are (d_out, r): the gradient pass returns them transposed
    return {n: torch.stack([g.T if "lora_B" in n else g for g in grads]) for n, grads in out.items()}


def test_bf16_base_weights_keep_lora_and_gradients_in_float32(llama):
    fp32, bf16 = _load(llama), _load(llama, "bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.dtype_name == "bfloat16" and fp32.dtype_name == "float32"
    lora = adapter_parameters(bf16.model)
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    base = [p for n, p in bf16.model.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in base)
    (_, batch), = batches(bf16, _records(), 8, 32)
    ref = per_example_lora_gradients(fp32.model, batch)
    got, outputs = lora_gradients_and_outputs(bf16.model, batch)
    assert all(g.dtype == torch.float32 for g in got.values()) and set(got) == set(ref)
    assert _rel(got, ref) < 0.05  # bf16 rounding of the base path only
    assert outputs.losses.dtype.itemsize >= 4
    # the same dtype path one example at a time: the batched pass is exact up to bf16 batching noise
    loop = _loop(bf16.model, batch)
    assert _rel(got, loop) < 0.03
    assert _rel(per_example_lora_gradients(fp32.model, batch), _loop(fp32.model, batch)) < 1e-5


def test_bf16_classifier_head_trains_in_float32(bert):
    loaded = _load(bert, "bfloat16", task="classification", labels=["neg", "pos"])
    heads = {n: p for n, p in loaded.model.named_parameters() if "classifier" in n}
    assert heads and all(p.dtype == torch.float32 for p in heads.values())
    (_, batch), = batches(loaded, toy_records(6), 6, 16)
    assert loaded.model(**batch).logits.dtype == torch.float32
    grads = per_example_lora_gradients(loaded.model, batch)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_checkpointing_gives_identical_gradients(llama, precision):
    loaded = _load(llama, precision)
    (_, batch), = batches(loaded, _records(), 8, 32)
    layers = checkpoint_layers(loaded.model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    calls = []
    hook = layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    try:
        plain, plain_out = lora_gradients_and_outputs(loaded.model, batch)
        assert len(calls) == 1
        ckpt, ckpt_out = lora_gradients_and_outputs(loaded.model, batch, checkpointing=True)
        assert len(calls) == 3  # the checkpointed backward ran the layer again
    finally:
        hook.remove()
    assert all(torch.equal(plain[k], ckpt[k]) for k in plain)
    assert torch.equal(plain_out.losses, ckpt_out.losses)
    assert all("forward" not in vars(m) for m in layers)  # the wrappers are gone after the pass


def test_checkpointing_in_the_warmup_gives_the_same_adapter(bert):
    """Dropout on (BERT hidden dropout, LoRA dropout): the recompute replays the forward's RNG state."""
    train = TrainSettings(epochs=2, lr=1e-2, batch_size=8, seed=0)
    runs = []
    for checkpointing in (False, True):
        loaded = _load(bert, task="classification", labels=["neg", "pos"], dropout=0.1, checkpointing=checkpointing)
        assert loaded.checkpointing is checkpointing
        stats = warmup_train(loaded, toy_records(32), train, max_length=16)
        runs.append((stats.loss_per_epoch, adapter_parameters(loaded.model)))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    assert all(torch.allclose(runs[0][1][k], runs[1][1][k], atol=1e-6) for k in runs[0][1])


def test_bf16_warmup_learns_with_float32_adapter(llama):
    """The bf16 warm-up (checkpointed) lowers the loss every epoch and follows the float32 one."""
    train = TrainSettings(epochs=8, lr=0.1, batch_size=4, seed=0, schedule="constant")
    reference = warmup_train(_load(llama), _records(8), train, max_length=32).loss_per_epoch
    loaded = _load(llama, "bfloat16", checkpointing=True)
    losses = warmup_train(loaded, _records(8), train, max_length=32).loss_per_epoch
    assert losses[-1] < losses[0] - 0.15 and all(b <= a + 0.01 for a, b in zip(losses, losses[1:], strict=False))
    assert losses == pytest.approx(reference, abs=0.05)
    assert all(p.dtype == torch.float32 for p in adapter_parameters(loaded.model).values())
    assert all(p.dtype == torch.bfloat16 for n, p in loaded.model.named_parameters() if "lora_" not in n)


def _oom(limit: int):
    def fail_when_big(n: int) -> None:
        if n > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    return fail_when_big


def test_run_with_backoff_halves_and_never_loses_or_repeats():
    seen, halvings = [], []
    check = _oom(3)

    def fn(chunk):
        check(len(chunk))
        seen.append(list(chunk))
        return sum(chunk)

    out = list(run_with_backoff(list(range(23)), 16, fn, device=torch.device("cpu"),
                                on_backoff=lambda a, b: halvings.append((a, b))))
    assert [x for chunk, _ in out for x in chunk] == list(range(23))  # every item once, in order
    assert all(r == sum(c) for c, r in out) and halvings == [(16, 8), (8, 4), (4, 2)]
    assert max(len(c) for c, _ in out) == 2

    def other(chunk):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        list(run_with_backoff([1, 2], 2, other, device=torch.device("cpu")))
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a single example that does not fit is an error
        list(run_with_backoff([1, 2], 2, lambda c: _oom(0)(len(c)), device=torch.device("cpu")))


def test_gradient_pass_backs_off_on_out_of_memory(llama, monkeypatch):
    loaded = _load(llama)
    records = _records(11)
    settings = GradientSettings(batch_size=8)
    clean = list(loading.gradient_batches(loaded, records, settings, 32))
    real = loading.lora_gradients_and_outputs
    check = _oom(2)

    def flaky(model, batch, **kw):
        check(len(batch["input_ids"]))
        return real(model, batch, **kw)

    monkeypatch.setattr(loading, "lora_gradients_and_outputs", flaky)
    logs: list[str] = []
    backed = list(loading.gradient_batches(loaded, records, settings, 32, log=logs.append))
    ids = [i for chunk, _, _ in backed for i in chunk]
    assert ids == [r["sample_id"] for r in records]  # no example lost or scored twice
    assert any("ran out of device memory; continuing with 4" in line for line in logs)
    ref = {k: torch.cat([g[k] for _, g, _ in clean]) for k in clean[0][1]}
    got = {k: torch.cat([g[k] for _, g, _ in backed]) for k in clean[0][1]}
    assert _rel(got, ref) < 1e-5


def test_gradient_pass_refuses_rows_of_another_dtype(llama):
    loaded = _load(llama)
    with pytest.raises(ModelLoadError, match="fingerprinted as bfloat16"):
        next(loading.gradient_batches(loaded, _records(2), GradientSettings(model_dtype="bfloat16"), 32))


def test_warmup_micro_batches_on_out_of_memory_give_the_same_step(llama, monkeypatch):
    """An optimizer step split into micro-batches after an (injected) OOM equals the unsplit step: the micro-batch
    losses are weighted by their target tokens back to the batch's token mean (no dropout here)."""
    train = TrainSettings(epochs=2, lr=1e-2, batch_size=8, seed=0)
    plain = _load(llama)
    plain_stats = warmup_train(plain, _records(16), train, max_length=32)
    split = _load(llama)
    forward = split.model.forward
    check = _oom(3)

    def flaky(*args, **kwargs):
        check(len(kwargs["input_ids"]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(split.model, "forward", flaky)
    split_stats = warmup_train(split, _records(16), train, max_length=32)
    assert split_stats.micro_batch == 2 and plain_stats.micro_batch == 0
    assert split_stats.steps == plain_stats.steps == 4
    assert split_stats.loss_per_epoch == pytest.approx(plain_stats.loss_per_epoch, rel=1e-4)
    a, b = adapter_parameters(plain.model), adapter_parameters(split.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_resolution_rules(monkeypatch):
    assert resolve_dtype_name("auto", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype_name("float32", "auto") == "float32"
    with pytest.raises(ValueError, match="precision"):
        resolve_dtype_name("float16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype_name("auto", "auto") == "bfloat16" == resolve_dtype_name("auto", "cuda:0")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype_name("auto", "cuda") == "float32"
    assert use_checkpointing("auto", 1024) and not use_checkpointing("auto", 512)
    assert use_checkpointing(True, 8) and not use_checkpointing(False, 4096)


def test_auto_batch_size_from_free_memory(monkeypatch):
    assert auto_batch_size(torch.device("cpu"), 1e9, fallback=32) == 32
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    cuda = torch.device("cuda")
    assert auto_batch_size(cuda, 2**28) == 16  # 0.7 * 10 GiB / 256 MiB = 28 -> 16
    assert auto_batch_size(cuda, 2**20, cap=64) == 64
    assert auto_batch_size(cuda, 2**40) == 1
    config = type("C", (), {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256,
                            "num_attention_heads": 32, "is_decoder": True})()
    full = activation_bytes_per_example(config, 1024, torch.bfloat16, checkpointing=False)
    ckpt = activation_bytes_per_example(config, 1024, torch.bfloat16, checkpointing=True)
    assert ckpt < full / 4 and full > 2**30


def test_dtype_is_part_of_the_fingerprint_and_float32_digests_are_unchanged():
    kw = dict(model_id="m", model_hash="h", adapter_hash="a", task="causal_lm", lora_modules=("q_proj",),
              shapes={"x.lora_A.default.weight": (4, 32)}, compression=CompressionSpec())
    fp32, bf16 = Fingerprint.create(**kw), Fingerprint.create(**kw, model_dtype="bfloat16")
    assert "model_dtype" not in fp32.to_json() and '"model_dtype": "bfloat16"' in bf16.to_json()
    assert fp32.digest() != bf16.digest() and fp32.diff(bf16) == ["model_dtype"]
    assert Fingerprint.from_json(bf16.to_json()) == bf16 and Fingerprint.from_json(fp32.to_json()) == fp32


def test_config_settings(tmp_path, llama):
    (tmp_path / "pool.csv").write_text("prompt,response\nhi,hello\n")
    base = {"model": str(llama), "task": "causal_lm", "data": {"path": "pool.csv"},
            "targets": {"t": {"path": "pool.csv"}}, "device": "cpu"}
    cfg = load_config(base, base_dir=tmp_path)
    assert (cfg.precision, cfg.gradient_checkpointing, cfg.gradient_batch_size) == ("auto", "auto", 32)
    assert cfg.gradient_settings.model_dtype == "float32"
    cfg = load_config({**base, "precision": "bfloat16", "gradient_checkpointing": True,
                       "gradient_batch_size": "auto"}, base_dir=tmp_path)
    assert cfg.model_spec.precision == "bfloat16" and cfg.model_spec.gradient_checkpointing is True
    assert cfg.gradient_settings.model_dtype == "bfloat16" and cfg.gradient_settings.batch_size == "auto"
    assert load_config(cfg.to_dict(), base_dir=tmp_path) == cfg
    for key, bad in (("precision", "float16"), ("gradient_checkpointing", "yes"), ("gradient_batch_size", "max"),
                     ("gradient_batch_size", 0)):
        with pytest.raises(Exception, match=key):
            load_config({**base, key: bad}, base_dir=tmp_path)


def test_a_model_copy_keeps_its_dtypes(llama):
    """deepcopy (checkpoints, cross-fits) keeps the bf16 base and the float32 adapter."""
    loaded = _load(llama, "bfloat16")
    clone = copy.deepcopy(loaded.model)
    assert {p.dtype for n, p in clone.named_parameters() if "lora_" in n} == {torch.float32}
    with activation_checkpointing(clone) as n:
        assert n == 2
