"""Stage: the LoRA adapter every gradient row is taken under.

`adapter.path` given: copy it into the store as an adapter artifact. Else warm up a fresh adapter on the
whole pool, unless the store already holds one made by the same recipe (model, labels, LoRA and training
settings): then it is reused even if shards were added since, because gradients are only comparable under
one adapter and new data must not silently invalidate every stored row (pass `retrain=True` to train
again). The new adapter becomes current only once it is saved whole (adapters.py).

While it trains, the warm-up records every example's margin at every step (the AUM, signals/margins.py; stored
in `label_signals` as signal `aum`, target set `self`, source = the adapter hash) and keeps the adapter's tensors
after each earlier epoch (checkpoints beside the adapter: what `hyperinf_cp` scores under).

The warm-up is evaluated on held-out records before training and after every epoch: the configured target
sets read from files (never trained on), or, when every target set is a `where:` selection of the pool, a
seeded sample of pool rows (trained on, so it measures fit, not generalisation). `warmup_problem` says why
an adapter did not learn: held-out accuracy no better than the pool's majority class (tasks with classes),
or held-out loss no lower than before training (causal LM).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hyperinf_ops.adapters import AdapterManifest, AdapterStore, folder_digest, recipe_key
from hyperinf_ops.core.gradients import lora_matrix_shapes
from hyperinf_ops.data.prepare import prepare_targets, record_columns, records_digest
from hyperinf_ops.devices import resolve_dtype_name
from hyperinf_ops.evaluation import majority_baseline
from hyperinf_ops.models import adapter_hash, load_lora_model, model_hash, pooling_of, resolve_model
from hyperinf_ops.models.lora import LoadedModel, adapter_parameters
from hyperinf_ops.settings import SELF_TARGET, LoraSettings, ModelSpec, TrainSettings
from hyperinf_ops.signals.margins import MarginHistory
from hyperinf_ops.stages.common import Log, Summary, require_table, sample_filter
from hyperinf_ops.store import LanceStore
from hyperinf_ops.tasks import get_task
from hyperinf_ops.training import TrainStats, warmup_train

__all__ = ["AdapterSummary", "HeldOut", "adapter_pending", "adapter_recipe", "heldout_records", "over_length_warning",
           "pool_labels", "pool_change", "train_or_load_adapter", "warmup_problem"]

# A held-out loss that ends this much above its start (relative) diverged; below it, it merely stayed flat.
DIVERGED_RISE = 0.01

# Pool rows the warm-up is evaluated on when no target set comes from a file.
POOL_SAMPLE_EXAMPLES = 512

# Pool rows tokenized to estimate the share longer than max_length: seconds, where a million pairs through a chat
# template would take minutes.
_LENGTH_SAMPLE = 2000


@dataclass(frozen=True)
class HeldOut:
    """The records the warm-up is evaluated on, and where they come from (shown with the numbers)."""

    source: str
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AdapterSummary(Summary):
    source: str  # "trained", "given" or "reused"
    changed: bool  # the current adapter is another one than before this step
    path: str
    adapter_hash: str
    model_hash: str
    labels: list[str]
    trained_on: int  # pool examples the warm-up saw (0 for a given adapter)
    pool_examples: int
    train: dict[str, Any] | None  # TrainStats of the warm-up that made it
    seconds: float


def pool_labels(store: LanceStore, task: str) -> list[str]:
    """The pool's label set, sorted (it fixes the class ids); empty for tasks without classes."""
    if not get_task(task).has_classes:
        return []
    labels = require_table(store, "examples", "ingest the pool first").to_table(columns=["label"])["label"]
    return sorted(pc.unique(labels).to_pylist())


def adapter_recipe(labels: list[str], spec: ModelSpec, lora: LoraSettings, train: TrainSettings,
                   given: Path | None) -> str:
    """The recipe key of the adapter these settings ask for (see adapters.py)."""
    if given is not None:
        return recipe_key({"given": folder_digest(given)})
    path = resolve_model(spec.name)
    dtype = resolve_dtype_name(spec.precision, spec.device)
    return recipe_key({
        # a bf16 warm-up trains another adapter; float32 keeps the keys of adapters trained before the setting
        **({"precision": dtype} if dtype != "float32" else {}),
        "model_hash": model_hash(path), "task": spec.task, "max_length": spec.max_length, "labels": labels,
        # The pooling the classifier head reads (mean for sentence-transformers folders) changes what is trained.
        "pooling": pooling_of(path) if get_task(spec.task).has_classes else "model",
        "lora": lora.model_dump(exclude={"gradient_modules"}),  # which matrices enter influence: not the adapter
        "train": train.model_dump(exclude={"log_every", "retrain_share"}),  # when to retrain: not what is trained
    })


def adapter_pending(store: LanceStore, spec: ModelSpec, lora: LoraSettings, train: TrainSettings,
                    given: Path | None) -> bool:
    """Whether the current adapter is not the one these settings ask for, or the pool has changed past
    `train.retrain_share` since the warm-up trained it (so the adapter step has work)."""
    current = AdapterStore(store.root).current()
    key = adapter_recipe(pool_labels(store, spec.task), spec, lora, train, given)
    return current is None or current.recipe_key != key or _retrain_due(store, current, train) is not None


def pool_change(store: LanceStore, manifest: AdapterManifest) -> float | None:
    """The share of examples the pool and the warm-up's training set do not share (new, edited or removed, over
    both together: 0 = the pool it trained on, 1 = nothing in common); None for an adapter no warm-up trained here
    (a given one, or one saved before its training set was kept) or a store without examples. Sample ids are
    unique in both, so the shared examples are the (sample_id, content_hash) keys of one found in the other."""
    trained = AdapterStore(store.root).trained_examples(manifest) if manifest.source == "trained" else None
    if trained is None or not store.exists("examples"):
        return None
    pool = store.open("examples").to_table(columns=["sample_id", "content_hash"])

    def keys(table: pa.Table) -> pa.Array:
        return pc.binary_join_element_wise(table["sample_id"], table["content_hash"], "\x1f")

    shared = pc.sum(pc.is_in(keys(pool), value_set=keys(trained))).as_py() or 0
    union = trained.num_rows + pool.num_rows - shared
    return (union - shared) / union if union else 0.0


def _retrain_due(store: LanceStore, manifest: AdapterManifest, train: TrainSettings) -> float | None:
    """The pool's change since the warm-up trained `manifest` (`pool_change`) when it is past
    `train.retrain_share`, else None."""
    change = pool_change(store, manifest)
    return change if change is not None and change > train.retrain_share else None


def heldout_records(store: LanceStore, targets: Mapping[str, Any], data: Any, task: str, seed: int = 0) -> HeldOut:
    """What the warm-up is evaluated on: the rows of every target set given as a file that are not also pool rows
    (`targets`: the config's TargetSections, `data` its DataSection), else a seeded sample of POOL_SAMPLE_EXAMPLES
    pool rows."""
    examples = require_table(store, "examples", "ingest the pool first")
    columns = record_columns(task)
    files = {name: t for name, t in targets.items() if t.path is not None}
    if files:
        pool = examples.to_table(columns=[*columns, "content_hash"])
        tables = prepare_targets(files, data, task, pool)
        trained = set(pool["content_hash"].to_pylist())  # target rows that are also pool rows measure fit
        kept = [r for name in files for r in tables[name].select([*columns, "content_hash"]).to_pylist()
                if r["content_hash"] not in trained]
        if kept:
            left_out = sum(t.num_rows for t in tables.values()) - len(kept)
            return HeldOut(source=f"target set{'s' if len(files) > 1 else ''} {', '.join(files)} (not trained on"
                           + (f"; {left_out} rows also in the pool left out" if left_out else "") + ")",
                           records=[{c: r[c] for c in columns} for r in kept])
    sample = examples.to_table(columns=columns, filter=sample_filter(examples, POOL_SAMPLE_EXAMPLES, seed))
    return HeldOut(source=f"{sample.num_rows} pool rows (trained on: fit, not generalisation)",
                   records=sample.to_pylist())


def train_or_load_adapter(store: LanceStore, spec: ModelSpec, lora: LoraSettings, train: TrainSettings, *,
                          given: Path | None = None, retrain: bool = False,
                          heldout: Callable[[], HeldOut] | None = None, log: Log = print) -> AdapterSummary:
    """Make the adapter these settings ask for current: reused, copied from `given`, or trained (and evaluated
    on the records `heldout()` gives, before training and after each epoch; called only when it trains: a
    reused adapter needs no held-out records)."""
    start = time.perf_counter()
    adapters = AdapterStore(store.root)
    examples = require_table(store, "examples", "ingest the pool first")
    labels = pool_labels(store, spec.task)
    key = adapter_recipe(labels, spec, lora, train, given)
    before = adapters.current()
    manifest = None if retrain else adapters.find(key)
    change = None if manifest is None else _retrain_due(store, manifest, train)
    if change is not None:
        log(f"the pool has changed by {change:.0%} since adapter {manifest.short_hash} was trained (past "
            f"train.retrain_share {train.retrain_share:.0%}): training the warm-up again")
        manifest = None
    if manifest is not None:
        log(f"reusing adapter {manifest.short_hash} ({manifest.source})"
            + (f"; the pool grew by {examples.count_rows() - manifest.trained_on} examples since it was trained"
               if manifest.source == "trained" and examples.count_rows() > manifest.trained_on else ""))
        source = "reused"
    elif given is not None:
        loaded = load_lora_model(spec, labels, adapter_dir=given)
        manifest = _manifest(loaded, key, "given", spec.name, trained_on=0, train=None, given=given)
        log(f"using the given adapter {given} (hash {manifest.short_hash})")
        source = "given"
    else:
        loaded = load_lora_model(spec, labels, lora=lora, seed=train.seed)
        # sorted by sample id: the seeded shuffle must not depend on the order shards were stored in, and the
        # evaluation's full-pool fit (sorted the same way) is then this very training (its records' digest)
        records = sorted(examples.to_table(columns=record_columns(spec.task)).to_pylist(),
                         key=lambda r: r["sample_id"])
        heldout = heldout() if heldout else None
        long = over_length_warning(loaded, records, spec.max_length)
        if long:
            log(f"warning: {long}")
        log(f"warm-up training on {len(records)} examples: {train.epochs} epochs, batch {train.batch_size}, "
            f"lr {train.lr}, device {loaded.device}"
            + (f"; evaluated on {len(heldout.records)} records of {heldout.source}" if heldout else ""))
        margins = MarginHistory()
        checkpoints: dict[int, dict[str, Any]] = {}

        def keep_checkpoint(epoch: int) -> None:
            if epoch < train.epochs:  # the last epoch's tensors are the adapter itself
                checkpoints[epoch] = {k: v.detach().cpu().clone()
                                      for k, v in adapter_parameters(loaded.model).items()}

        stats = warmup_train(loaded, records, train, max_length=spec.max_length, progress=lambda e: log(str(e)),
                             heldout=heldout.records if heldout else (), margins=margins,
                             on_epoch_end=keep_checkpoint)
        manifest = _manifest(loaded, key, "trained", spec.name, trained_on=len(records),
                             train={**_train_record(stats, train, records, heldout),
                                    "records_digest": records_digest(records, spec.task)},
                             checkpoints=tuple(sorted(checkpoints)))
        log(f"adapter {manifest.short_hash} trained, final loss {stats.loss_per_epoch[-1]:.4f}")
        source = "trained"
    if source != "reused":
        adapters.save(loaded.model, manifest, checkpoints if source == "trained" else None,
                      trained=examples.to_table(columns=["sample_id", "content_hash"]) if source == "trained" else None)
        if source == "trained" and len(margins):
            aum = margins.aum()
            store.write_label_signal("aum", SELF_TARGET, list(aum), np.array(list(aum.values())),
                                     source=manifest.adapter_hash)
    adapters.set_current(manifest)
    return AdapterSummary(source=source, changed=before is None or before.adapter_hash != manifest.adapter_hash,
                          path=str(adapters.location(manifest)), adapter_hash=manifest.adapter_hash,
                          model_hash=manifest.model_hash, labels=list(manifest.labels),
                          trained_on=manifest.trained_on, pool_examples=examples.count_rows(), train=manifest.train,
                          seconds=time.perf_counter() - start)


def over_length_warning(loaded: LoadedModel, records: Sequence[Mapping[str, Any]], max_length: int) -> str | None:
    """What share of `records` (an evenly spaced sample of at most _LENGTH_SAMPLE) is longer than max_length
    tokens and what the cut keeps of them, or None when none is: the gradients, the warm-up and the evaluation
    all see the cut example."""
    sample = records[:: max(1, -(-len(records) // _LENGTH_SAMPLE))]
    lengths = loaded.task.token_lengths(loaded.tokenizer, sample)
    long = sum(n > max_length for n in lengths)
    if not long:
        return None
    share = (f"{long} of the pool's {len(records)} examples ({long / len(sample):.1%})" if len(sample) == len(records)
             else f"{long / len(sample):.1%} of the pool's {len(records)} examples (a sample of {len(sample)})")
    return (f"{share} are longer than max_length {max_length} tokens (longest {max(lengths)}): "
            f"{loaded.task.truncation}; raise max_length to keep them whole")


def warmup_problem(train: Mapping[str, Any] | None) -> str | None:
    """Why the warm-up recorded in `train` (an AdapterSummary's `train`) did not learn, with advice that fits the
    failure, or None when it learned or when there is no held-out curve to judge (a given adapter, one trained
    before curves were recorded). Learned: every loss finite, and on the held-out records an accuracy above the
    majority class's (tasks with classes) or a lower loss than before training. A failure whose loss rose or
    became non-finite diverged (lower the lr); one that stayed flat learned too little (raise the lr or epochs)."""
    if not train or not train.get("heldout_loss_per_epoch"):
        return None
    where = train["heldout_source"]
    recipe = f"(lr {train['lr']}, {train['epochs']} epochs, batch {train['batch_size']})"
    heldout, trained = train["heldout_loss_per_epoch"], train.get("loss_per_epoch") or ()
    finite = all(math.isfinite(x) for x in (*heldout, *trained))
    accuracy = train.get("heldout_accuracy_per_epoch")
    majority = train.get("majority")
    if finite and (accuracy[-1] > majority["accuracy"] if accuracy and majority else heldout[-1] < heldout[0]):
        return None
    if not finite or heldout[-1] > heldout[0] * (1 + DIVERGED_RISE):
        return (f"the warm-up diverged: loss on {where} {heldout[0]:.4g} before training, {heldout[-1]:.4g} after "
                f"{recipe}: lower train.lr")
    data = "the labels follow from the text" if majority else "the responses follow from the prompts"
    too_little = f"{recipe}: raise train.lr or train.epochs, or check that {data}"
    if accuracy and majority:
        return (f"the warm-up adapter is no better than always predicting the pool's majority class "
                f"{majority['label']!r}: accuracy {accuracy[-1]:.3f} vs {majority['accuracy']:.3f} on {where} "
                f"{too_little}")
    return (f"the warm-up did not lower the loss on {where}: {heldout[0]:.4f} before training, "
            f"{heldout[-1]:.4f} after {too_little}")


def _train_record(stats: TrainStats, train: TrainSettings, records: Sequence[Mapping[str, Any]],
                  heldout: HeldOut | None) -> dict[str, Any]:
    """The warm-up as stored in the adapter's manifest: its TrainStats, the recipe numbers a message quotes, where
    the held-out records came from and the majority-class baseline on them."""
    out: dict[str, Any] = {**dataclasses.asdict(stats), "examples_per_s": stats.examples_per_s,
                           "lr": train.lr, "batch_size": train.batch_size}
    if heldout is not None and heldout.records and stats.heldout_accuracy_per_epoch is not None:
        base = majority_baseline([r["label"] for r in records], [r["label"] for r in heldout.records])
        out["majority"] = {"label": base.label, "accuracy": base.accuracy}
    return {**out, "heldout_source": heldout.source if heldout else None}


def _manifest(loaded: LoadedModel, key: str, source: str, model: str, *, trained_on: int,
              train: dict[str, Any] | None, given: Path | None = None,
              checkpoints: tuple[int, ...] = ()) -> AdapterManifest:
    peft = loaded.model.peft_config["default"]
    return AdapterManifest(
        adapter_hash=adapter_hash(loaded.model), recipe_key=key, source=source, model=model,
        model_hash=model_hash(loaded.model_path), task=loaded.task.name, labels=tuple(loaded.label2id),
        lora_modules=loaded.lora_modules, rank=int(peft.r), alpha=float(peft.lora_alpha),
        matrix_shapes=lora_matrix_shapes(loaded.model), pooling=loaded.pooling, trained_on=trained_on,
        train=train, given_path=None if given is None else str(given), checkpoints=checkpoints)
