"""How config problems are worded: pydantic's errors as `key.path: message` lines a config author reads,
with a did-you-mean for misspelled keys and choices."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

__all__ = ["RENAMED_KEYS", "did_you_mean", "problem_text", "renamed_key_problems"]

# Keys of earlier versions, with where their meaning went.
RENAMED_KEYS = {
    "projection_dim": "compression.sketch_dim (a sketch width per LoRA matrix, applied before the curvature; "
                      "the old JL projection of whole rows lost HyperINF's ranking)",
    "projection_seed": "compression.seed",
    "projection_dtype": "compression.dtype",
}


def renamed_key_problems(raw: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """(a `key: replaced by ...` line per key of an earlier version in `raw`, `raw` without those keys)."""
    problems = [f"{old}: replaced by {new}" for old, new in RENAMED_KEYS.items() if old in raw]
    return problems, {k: v for k, v in raw.items() if k not in RENAMED_KEYS}


def problem_text(error: Mapping[str, Any], root: type[BaseModel]) -> str:
    """One pydantic error of validating `root` as `key.path: message`, in the words a config author reads."""
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    where = _location(loc)
    ctx = error.get("ctx") or {}
    expected = {"int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
                "float_parsing": "a number", "string_type": "a string", "bool_type": "true or false",
                "tuple_type": "a list", "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
                "model_attributes_type": "a mapping", "path_type": "a path"}
    if kind == "extra_forbidden":
        message = f"unknown key{did_you_mean(str(loc[-1]), _fields_at(root, loc[:-1]))}"
    elif kind == "missing":
        message = "required key is missing"
    elif kind in expected:
        message = f"expected {expected[kind]}, got {_describe(value)}"
    elif kind == "finite_number":
        message = f"must be a finite number, got {value!r}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        message = f"must be {op} {bound}, got {value!r}"
    elif kind == "literal_error":
        options = [o.strip().strip("'") for o in ctx["expected"].replace(" or ", ", ").split(", ")]
        message = f"{value!r} is not one of {options}{did_you_mean(str(value), options)}"
    elif kind == "too_short":
        message = "at least one entry is required" if loc and loc[-1] != "targets" else \
            "at least one target set is required"
    elif kind == "string_pattern_mismatch" and len(loc) >= 2 and loc[0] == "targets":
        message = "a target set name must be letters, digits, '_' or '-', starting with a letter"
        where = _location(loc[:2])
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"


def _location(loc: tuple) -> str:
    """('lora', 'rank') -> lora.rank; ('estimators', 1) -> estimators[1]; a `[key]` marker is dropped."""
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "config"


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a section accepts, found by walking `loc` through the config models (for did-you-mean)."""
    model: Any = root
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = model.model_fields[part].annotation
        elif typing.get_origin(model) is dict:
            model = typing.get_args(model)[1]
        else:
            return []
        args = [a for a in typing.get_args(model) if a is not type(None)]
        if typing.get_origin(model) in (typing.Union, type(int | None)) and len(args) == 1:
            model = args[0]
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _describe(raw: Any) -> str:
    return f"{type(raw).__name__} {raw!r}" if raw is not None else "null"


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest option, or an empty string."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
