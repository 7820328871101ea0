"""The model under the current adapter, loaded once per process, and per-example gradients of records."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hyperinf_ops.adapters import AdapterManifest, AdapterStore
from hyperinf_ops.core.gradients import lora_gradients_and_outputs
from hyperinf_ops.devices import activation_bytes_per_example, auto_batch_size, run_with_backoff
from hyperinf_ops.errors import ModelLoadError
from hyperinf_ops.memory import release_memory
from hyperinf_ops.models.lora import LoadedModel, adapter_hash, batches, load_lora_model
from hyperinf_ops.progress import ProgressMeter, tenths
from hyperinf_ops.settings import GradientSettings, ModelSpec
from hyperinf_ops.signals.outputs import ExampleOutputs
from hyperinf_ops.stages.common import Log

__all__ = ["finite_rows", "gradient_batches", "load_current_model"]

# The last model loaded in this process, keyed by (model spec, adapter hash, when its folder last changed): the
# steps of one run share it, and a folder changed since is loaded (and checked) again.
_LOADED: dict[tuple, LoadedModel] = {}


def _folder_stamp(folder: Path) -> int:
    return max((f.stat().st_mtime_ns for f in folder.iterdir() if f.is_file()), default=0)


def load_current_model(storage_root: str | Path, spec: ModelSpec) -> tuple[LoadedModel, AdapterManifest]:
    """The model with the current adapter (labels as it was trained with), checked against its manifest."""
    adapters = AdapterStore(storage_root)
    manifest = adapters.require_current()
    folder = adapters.path(manifest)  # local (for an S3 root: a cached download, re-fetched when changed)
    key = (spec, manifest.adapter_hash, _folder_stamp(folder))
    if key not in _LOADED:
        _LOADED.clear()
        loaded = load_lora_model(spec, manifest.labels, adapter_dir=folder)
        if adapter_hash(loaded.model) != manifest.adapter_hash:
            raise ModelLoadError(f"adapter folder {adapters.location(manifest)} does not hold the tensors its manifest "
                                 f"names ({manifest.short_hash}); it was changed after it was saved")
        _LOADED[key] = loaded
    return _LOADED[key], manifest


def gradient_batches(loaded: LoadedModel, records: Sequence[Mapping[str, Any]], settings: GradientSettings,
                     max_length: int, *, phase: str = "gradients", log: Log | None = None
                     ) -> Iterator[tuple[list[str], dict[str, Tensor], ExampleOutputs]]:
    """(sample_ids, per-example LoRA gradients name -> (b, r, d), what the forward said of each example: loss,
    logits) batch by batch (memory: one batch deep).

    With `log`, reports `phase: done/total examples (rate, ETA)` about ten times over the pass and at its end.
    The base weights must be in `settings.model_dtype` (the rows' fingerprint says so). An `auto` batch size is
    chosen from the free device memory (CUDA; 32 elsewhere); a batch that runs out of device memory is halved and
    run again (devices.run_with_backoff: every record is yielded exactly once, in order)."""
    if loaded.dtype_name != settings.model_dtype:
        raise ModelLoadError(f"the model's base weights are {loaded.dtype_name} but these gradient rows are "
                             f"fingerprinted as {settings.model_dtype}: load it with that precision")
    size = _batch_size(loaded, settings, max_length)
    meter = ProgressMeter(phase, len(records), (lambda e: log(str(e))) if log else None, every=1,
                          step=tenths(len(records)))

    def run(chunk: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Tensor], ExampleOutputs]:
        (_, batch), = batches(loaded, chunk, len(chunk), max_length)
        return lora_gradients_and_outputs(loaded.model, batch, modules=settings.modules,
                                          checkpointing=loaded.checkpointing)

    def backoff(old: int, new: int) -> None:
        if log:
            log(f"{phase}: a batch of {old} ran out of device memory; continuing with {new}")

    for chunk, (grads, outputs) in run_with_backoff(records, size, run, device=loaded.device, on_backoff=backoff):
        release_memory()  # the pass's activations and graph are freed: return their pages (memory.py)
        meter.update(len(chunk))
        yield [str(r["sample_id"]) for r in chunk], grads, outputs
    meter.finish()


def _batch_size(loaded: LoadedModel, settings: GradientSettings, max_length: int) -> int:
    if settings.batch_size != "auto":
        return settings.batch_size
    config = getattr(loaded.model, "config", None)
    if config is None:
        return 32
    per_example = activation_bytes_per_example(config, max_length, loaded.dtype, checkpointing=loaded.checkpointing)
    return auto_batch_size(loaded.device, per_example, fallback=32)


def finite_rows(grads: Mapping[str, Tensor]) -> Tensor:
    """(n,) bool: the examples whose gradient is finite in every matrix."""
    return torch.stack([torch.isfinite(g).flatten(1).all(1) for g in grads.values()]).all(0)
