"""training.py: the warm-up learns a separable toy problem, deterministically, reports progress for the whole run
and evaluates held-out records before training and after every epoch; the warm-up check's verdicts."""

from pathlib import Path

import pytest
from tiny_models import save_tiny_model
from toy_data import toy_records

from hyperinf_ops.config import load_config
from hyperinf_ops.evaluation import evaluate_model, majority_baseline
from hyperinf_ops.models import adapter_hash, load_lora_model
from hyperinf_ops.progress import ProgressEvent, ProgressMeter, tenths
from hyperinf_ops.settings import TrainSettings
from hyperinf_ops.stages.adapter import warmup_problem
from hyperinf_ops.training import warmup_train


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
    heldout = toy_records(96)[64:]  # other draws of the same toy distribution, not trained on
    stats = warmup_train(loaded, toy_records(), train_cfg, max_length=16, progress=events.append, heldout=heldout)
    assert stats.steps == 12 * 8 and stats.examples == 64 and len(stats.loss_per_epoch) == 12
    assert stats.loss_per_epoch[-1] < 0.3 * stats.loss_per_epoch[0]
    assert stats.accuracy_per_epoch[-1] > 0.9
    assert not loaded.model.training
    # 2 periodic reports + 1 end-of-epoch report per epoch, with rate and ETA of the whole warm-up (12 epochs)
    assert len(events) == 12 * 3 and events[-1].done == events[-1].total == 12 * 64
    assert "examples/s" in str(events[0]) and "ETA" in str(events[0]) and "loss" in str(events[0])
    assert "heldout_accuracy" in str(events[2]) and events[2].extra["epoch"] == 1
    # held-out curve: before training + after each epoch; the last entry is the final model's evaluation
    assert stats.heldout_examples == 32 and len(stats.heldout_loss_per_epoch) == 13
    final = evaluate_model(loaded, heldout, max_length=16)
    assert final.loss == pytest.approx(stats.heldout_loss_per_epoch[-1], rel=1e-5)
    assert stats.heldout_accuracy_per_epoch[-1] == final.accuracy > 0.9 > stats.heldout_accuracy_per_epoch[0]
    assert stats.heldout_loss_per_epoch[-1] < 0.5 * stats.heldout_loss_per_epoch[0]


def test_progress_reports_about_ten_times_whatever_the_batch_sizes(tmp_path: Path):
    """A pass whose batches shrink (a byte cap on reads, a batch halved after running out of memory) still reports
    about ten times, each report at least a tenth further on, and at its end; the frozen-embedding pass reports so."""
    events: list[ProgressEvent] = []
    meter = ProgressMeter("pass", 1000, events.append, every=1, step=tenths(1000))
    for size in [64] * 5 + [16] * 30 + [1] * 100 + [10] * 10:
        meter.update(size)
    meter.finish()
    done = [event.done for event in events]
    assert 8 <= len(done) <= 11 and done[-1] == 1000 and done == sorted(set(done))
    assert all(b - a >= 100 for a, b in zip([0, *done[:-2]], done[:-1], strict=True))

    from hyperinf_ops.signals.probe import token_embeddings

    model = save_tiny_model(tmp_path / "model")
    heard: list[ProgressEvent] = []
    vectors = token_embeddings(model, [[5, 6, 7]] * 23, 0, batch_size=2, progress=heard.append)
    assert vectors.shape[0] == 23 and [e.done for e in heard] == [4, 8, 12, 16, 20, 23]
    assert heard[-1].phase == "embeddings" and heard[-1].total == 23


def test_majority_baseline_is_the_training_majority_scored_on_the_evaluated_labels():
    base = majority_baseline(["a", "b", "b", "c"], ["a", "b", "a", "a"])
    assert (base.label, base.accuracy) == ("b", 0.25)
    assert majority_baseline(["y", "x"], ["x", "x", "y"]).label == "x"  # ties: the first in sorted order


def test_an_untrainable_warmup_fails_the_check_with_its_message(cfg):
    """lr so small that nothing moves: held-out accuracy stays at chance, which the balanced toy's majority class
    also reaches, so the check names the majority class, both accuracies and what to change."""
    loaded = load_lora_model(cfg.model_spec, ["neg", "pos"], lora=cfg.lora)
    train_cfg = TrainSettings(epochs=1, lr=1e-9, batch_size=8, seed=0)
    records, heldout = toy_records(), [r for r in toy_records(96)[64:] if r["label"] == "neg"]
    stats = warmup_train(loaded, records, train_cfg, max_length=16, heldout=heldout)
    base = majority_baseline([r["label"] for r in records], [r["label"] for r in heldout])
    train = {"epochs": 1, "lr": 1e-9, "batch_size": 8, "heldout_source": "target set t (not trained on)",
             "heldout_loss_per_epoch": stats.heldout_loss_per_epoch,
             "heldout_accuracy_per_epoch": stats.heldout_accuracy_per_epoch,
             "majority": {"label": base.label, "accuracy": base.accuracy}}
    assert base.label == "neg" and base.accuracy == 1.0  # an all-'neg' held-out set: the majority is perfect
    problem = warmup_problem(train)
    assert problem is not None and "no better than always predicting the pool's majority class 'neg'" in problem
    assert "target set t" in problem and "raise train.lr" in problem
    learned = {**train, "heldout_accuracy_per_epoch": (0.5, 0.9), "majority": {"label": "neg", "accuracy": 0.5}}
    assert warmup_problem(learned) is None
    causal = {**train, "heldout_accuracy_per_epoch": None, "majority": None, "heldout_loss_per_epoch": (2.0, 2.0)}
    assert "did not lower the loss" in warmup_problem(causal) and "raise train.lr" in warmup_problem(causal)
    assert warmup_problem({**causal, "heldout_loss_per_epoch": (2.0, 1.5)}) is None
    # a loss that rose, or became non-finite anywhere, diverged: the advice is the other way (issue 19, route 7)
    diverged = ("the warm-up diverged: loss on target set t (not trained on) 2 before training, 2.1 after (lr 1e-09, "
                "1 epochs, batch 8): lower train.lr")
    assert warmup_problem({**causal, "heldout_loss_per_epoch": (2.0, 2.1)}) == diverged
    assert warmup_problem({**learned, "heldout_loss_per_epoch": (0.7, 2.1)}) is None  # accuracy decides: learned
    assert "diverged" in warmup_problem({**learned, "loss_per_epoch": (0.7, float("nan"))})
    assert "diverged" in warmup_problem({**train, "heldout_loss_per_epoch": (0.69, float("inf"))})
    assert warmup_problem(None) is None


def test_deterministic(cfg):
    train_cfg = TrainSettings(epochs=1, lr=1e-3, batch_size=16, seed=3)
    runs = []
    for _ in range(2):
        lora = cfg.lora.model_copy(update={"dropout": 0.1})  # seeded dropout
        loaded = load_lora_model(cfg.model_spec, ["neg", "pos"], lora=lora)
        stats = warmup_train(loaded, toy_records(32), train_cfg, max_length=16)
        runs.append((stats.loss_per_epoch, adapter_hash(loaded.model)))
    assert runs[0] == runs[1]
