"""Adapters as versioned artifacts: every adapter the store ever used, by hash, and which one is current.

    <root>/adapters/<hash[:16]>/     peft files + manifest.json (AdapterManifest), and
                                     checkpoints/epoch-<e>.safetensors: the adapter's tensors after each
                                     earlier warm-up epoch (what `hyperinf_cp` scores under)
    <root>/adapters/current.json     the manifest of the adapter every stored gradient row is taken under

A new adapter is written into a temporary folder and published whole (renamed into place; on S3 uploaded with
its manifest last); `current.json` is replaced atomically only after that, so a crash never leaves half an adapter, and the adapter that made the stored
rows stays on disk until it is no longer current. The manifest records everything the gradient fingerprint
needs (model identity, adapter hash, LoRA matrices and their shapes), so steps that only read stored rows
(curvature, scoring, SQL) never load a model to know what made them.

Reuse: an adapter is identified by its recipe key (for a trained adapter: base model hash, task, pooling,
LoRA and training settings, max length and labels; for a given one: the bytes of its folder), so the same
settings reuse the stored adapter even when the pool grew (gradients are only comparable under one adapter).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from hyperinf_ops.core.stacks import select_matrices
from hyperinf_ops.errors import ModelLoadError
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.location import Location
from hyperinf_ops.settings import BUNDLED_MODELS, CompressionSpec

__all__ = ["AdapterManifest", "AdapterStore", "folder_digest", "recipe_key"]

MANIFEST = "manifest.json"
CURRENT = "current.json"
CHECKPOINTS = "checkpoints"
# The (sample_id, content_hash) pairs the warm-up trained on: how much the pool has changed since (stages/adapter).
TRAINED_EXAMPLES = "trained_examples.parquet"


class AdapterManifest(BaseModel):
    """What an adapter is and what it was made from. `matrix_shapes`: every LoRA matrix's parameter name ->
    (r, d), the per-example gradient shape (lora_B transposed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    adapter_hash: str
    recipe_key: str
    source: str  # "trained" or "given"
    model: str  # the config's model: a bundled name or a folder path
    model_hash: str
    task: str
    labels: tuple[str, ...]
    lora_modules: tuple[str, ...]
    rank: int
    alpha: float
    matrix_shapes: dict[str, tuple[int, int]]
    pooling: str
    trained_on: int  # pool examples the warm-up saw (0 for a given adapter)
    train: dict[str, Any] | None = None  # the warm-up's TrainStats
    given_path: str | None = None
    checkpoints: tuple[int, ...] = ()  # earlier warm-up epochs whose tensors are stored beside the adapter

    @property
    def short_hash(self) -> str:
        return self.adapter_hash[:16]

    def selected_shapes(self, modules: tuple[str, ...] | None) -> dict[str, tuple[int, int]]:
        """(r, d) of the LoRA matrices that `modules` selects (gradients.select_matrices), sorted by name."""
        return {n: tuple(self.matrix_shapes[n]) for n in select_matrices(list(self.matrix_shapes), modules)}

    def fingerprint(self, modules: tuple[str, ...] | None, compression: CompressionSpec,
                    whitening: str = "", model_dtype: str = "float32") -> Fingerprint:
        """The fingerprint of gradient rows taken under this adapter for the selected matrices, compressed so
        (whitened rows: `whitening` is the digest of their whitening, stages/codec.py), with the base weights in
        `model_dtype`."""
        from hyperinf_ops.tasks import get_task

        model_id = self.model if self.model in BUNDLED_MODELS else Path(self.model).name
        return Fingerprint.create(
            model_id=model_id, model_hash=self.model_hash, adapter_hash=self.adapter_hash, task=self.task,
            lora_modules=self.lora_modules, shapes=self.selected_shapes(modules), compression=compression,
            whitening=whitening, loss_reduction=get_task(self.task).loss_reduction, model_dtype=model_dtype)


def recipe_key(recipe: Mapping[str, Any]) -> str:
    """sha256 of a recipe (JSON, sorted keys): equal recipes reuse one adapter."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def folder_digest(folder: Path) -> str:
    """sha256 over a folder's top-level files (names and bytes): the identity of a given adapter folder."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(f"{f.name}|{f.stat().st_size}|".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class AdapterStore:
    """The adapters folder of a storage root (a local folder or an S3 prefix, `location.Location`)."""

    def __init__(self, storage_root: str | os.PathLike[str]) -> None:
        self.dir = Location(storage_root) / "adapters"

    def location(self, manifest: AdapterManifest) -> Location:
        """Where this adapter's peft files are stored."""
        return self.dir / manifest.short_hash

    def path(self, manifest: AdapterManifest) -> Path:
        """A local folder holding this adapter's peft files (for an S3 root: a cached download, since peft
        loads from a folder)."""
        return self.location(manifest).local_copy()

    def current(self) -> AdapterManifest | None:
        """The adapter stored gradient rows are taken under, or None before the first one."""
        file = self.dir / CURRENT
        return AdapterManifest.model_validate_json(file.read_text()) if file.is_file() else None

    def require_current(self) -> AdapterManifest:
        """The current adapter; ModelLoadError before the first one."""
        manifest = self.current()
        if manifest is None:
            raise ModelLoadError(f"no adapter under {self.dir} yet: materialize lora_adapter first")
        return manifest

    def find(self, key: str) -> AdapterManifest | None:
        """A stored adapter made by the recipe `key`, if any (the newest such folder)."""
        found = []
        for folder in self.dir.folders():
            file = folder / MANIFEST
            if not file.is_file():
                continue
            manifest = AdapterManifest.model_validate_json(file.read_text())
            if manifest.recipe_key == key and (folder / "adapter_config.json").is_file():
                found.append((file.mtime_ns(), manifest))
        return max(found, key=lambda item: item[0])[1] if found else None

    def save(self, model: Any, manifest: AdapterManifest,
             checkpoints: Mapping[int, Mapping[str, Any]] | None = None, trained: Any = None) -> Location:
        """Write the peft adapter of `model` (a PeftModel), its earlier-epoch `checkpoints` (epoch -> the adapter's
        tensors, `models.lora.adapter_parameters` names), the examples it was `trained` on (an Arrow table of
        sample_id, content_hash) and its manifest, whole or not at all (the manifest is written last: a folder
        without one is never used).

        An adapter with this hash already stored is kept as it is (same tensors, same folder)."""
        from safetensors.torch import save_file

        target = self.location(manifest)
        if (target / MANIFEST).is_file():
            return target
        try:
            with target.staged_folder(last=MANIFEST) as tmp:
                model.save_pretrained(tmp)
                for epoch, tensors in sorted((checkpoints or {}).items()):
                    (tmp / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
                    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                              str(tmp / CHECKPOINTS / f"epoch-{epoch}.safetensors"))
                if trained is not None:
                    import pyarrow.parquet as pq

                    pq.write_table(trained.select(["sample_id", "content_hash"]), tmp / TRAINED_EXAMPLES)
                (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        except OSError:
            if not (target / MANIFEST).is_file():  # a concurrent writer of the same adapter won: fine
                raise
        return target

    def trained_examples(self, manifest: AdapterManifest) -> Any:
        """The (sample_id, content_hash) pairs the warm-up trained this adapter on (an Arrow table), or None: a
        given adapter, or one saved before they were kept."""
        location = self.location(manifest) / TRAINED_EXAMPLES
        return location.read_parquet(["sample_id", "content_hash"]) if location.is_file() else None

    def checkpoints(self, manifest: AdapterManifest) -> dict[int, dict[str, Any]]:
        """epoch -> the adapter's tensors after that earlier warm-up epoch (empty for a given adapter, or one
        trained for a single epoch or before checkpoints were kept)."""
        from safetensors.torch import load_file

        if not manifest.checkpoints:
            return {}
        folder = self.path(manifest) / CHECKPOINTS
        return {epoch: load_file(str(folder / f"epoch-{epoch}.safetensors")) for epoch in manifest.checkpoints}

    def set_current(self, manifest: AdapterManifest) -> None:
        """Make a saved adapter the current one (atomic replace of current.json). Only a whole one: its manifest
        (written last) and peft's adapter_config.json must be there; the previous current adapter's folder is never
        touched, so the rows taken under it keep their adapter."""
        folder = self.location(manifest)
        if not ((folder / MANIFEST).is_file() and (folder / "adapter_config.json").is_file()):
            raise FileNotFoundError(f"adapter {manifest.short_hash} is not saved whole under {self.dir}")
        (self.dir / CURRENT).write_text(manifest.model_dump_json(indent=2))
