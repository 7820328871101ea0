"""training.py: the warm-up learns a separable toy problem, deterministically, and reports progress."""

import random
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

from hyperinf_ops.config import load_config
from hyperinf_ops.models import adapter_hash, load_lora_model
from hyperinf_ops.progress import ProgressEvent
from hyperinf_ops.settings import TrainSettings
from hyperinf_ops.training import warmup_train


def toy_records(n: int = 64) -> list[dict]:
    rng = random.Random(0)
    filler = ["the", "movie", "film", "plot", "was", "very", "it", "this"]
    out = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(filler, 3) + [rng.choice(["good", "great", "fun"] if label == "pos" else ["bad", "awful"])]
        rng.shuffle(words)
        out.append({"sample_id": str(i), "text": " ".join(words), "label": label})
    return out


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    model = save_tiny_model(folder / "model")
    (folder / "pool.csv").write_text("text,label\nx,y\n")
    return load_config({"model": str(model), "data": {"path": "pool.csv"}, "targets": {"t": {"path": "pool.csv"}},
                        "lora": {"rank": 4, "alpha": 16, "dropout": 0.0}}, base_dir=folder)


def test_loss_decreases_and_progress(cfg, tmp_path: Path):
    loaded = load_lora_model(cfg.model_spec, ["neg", "pos"], lora=cfg.lora)
    events: list[ProgressEvent] = []
    # a random tiny BERT needs ~10 epochs before the LoRA matrices route the sentiment word to [CLS]
    train_cfg = TrainSettings(epochs=12, lr=3e-2, batch_size=8, seed=0, log_every=4)
    stats = warmup_train(loaded, toy_records(), train_cfg, max_length=16, progress=events.append)
    assert stats.steps == 12 * 8 and stats.examples == 64 and len(stats.loss_per_epoch) == 12
    assert stats.loss_per_epoch[-1] < 0.3 * stats.loss_per_epoch[0]
    assert stats.accuracy_per_epoch[-1] > 0.9
    assert not loaded.model.training
    # 2 periodic reports + 1 end-of-epoch report per epoch, with rate and ETA
    assert len(events) == 12 * 3 and events[-1].done == events[-1].total == 64
    assert "examples/s" in str(events[0]) and "ETA" in str(events[0]) and "loss" in str(events[0])


def test_deterministic(cfg):
    train_cfg = TrainSettings(epochs=1, lr=1e-3, batch_size=16, seed=3)
    runs = []
    for _ in range(2):
        lora = cfg.lora.model_copy(update={"dropout": 0.1})  # seeded dropout
        loaded = load_lora_model(cfg.model_spec, ["neg", "pos"], lora=lora)
        stats = warmup_train(loaded, toy_records(32), train_cfg, max_length=16)
        runs.append((stats.loss_per_epoch, adapter_hash(loaded.model)))
    assert runs[0] == runs[1]
