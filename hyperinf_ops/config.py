"""The one YAML configuration file: frozen dataclasses, validated in full before any work starts.

`load_config(path_or_mapping)` checks every key against the dataclasses below (unknown keys with a
did-you-mean, wrong types, impossible values, missing required keys) and raises one `ConfigError`
listing *every* problem, so a user fixes the file in one round. Relative paths resolve against the
config file's folder (or `base_dir` for a mapping), so a config means the same thing from any cwd.
`HyperinfConfig.to_dict()` gives back a mapping that `load_config` turns into an equal config.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import yaml

from hyperinf_ops.errors import ConfigError
from hyperinf_ops.estimators import EstimatorOptions
from hyperinf_ops.export import EXPORT_QUERY
from hyperinf_ops.query import list_queries

__all__ = [
    "AdapterConfig",
    "BUNDLED_MODELS",
    "CurationConfig",
    "DataConfig",
    "HyperinfConfig",
    "LoraSettings",
    "TargetConfig",
    "TrainConfig",
    "load_config",
]

BUNDLED_MODELS = ("minilm", "smollm2")
TASKS = ("classification", "causal_lm")
# Estimators the pipeline can run over stored rows. `exact_full` needs the (rd x rd) full Fisher of
# every LoRA matrix, which the shard pipeline does not accumulate: it stays a library-level check.
PIPELINE_ESTIMATORS = ("hyperinf", "datainf", "lissa", "tracin", "exact")
PROJECTION_DTYPES = ("float16", "float32")
SCHEDULES = ("linear", "constant")
# Target set names become SQL parameter values, file names and Dagster metadata keys.
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class DataConfig:
    """The candidate pool: one file, or a folder whose .parquet/.csv/.jsonl files are the shards."""

    path: Path
    text_column: str = "text"
    label_column: str | None = "label"  # causal_lm: optional (None = no label)
    id_column: str | None = None  # None = sample ids are content hashes
    prompt_column: str | None = None  # causal_lm only; defaults to "prompt"
    response_column: str | None = None  # causal_lm only; defaults to "response"


@dataclass(frozen=True)
class TargetConfig:
    """One target set: a file with the pool's columns, or a DuckDB predicate selecting pool rows.

    `where` is evaluated over the `examples` table (columns sample_id, text / prompt, response, label,
    shard and every extra pool column); the selected rows stay in the pool, e.g. `label = 'sport'`.
    """

    path: Path | None = None
    where: str | None = None


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape. `modules=None` picks the model's attention query/value projections."""

    rank: int = 8
    alpha: float = 16.0
    modules: tuple[str, ...] | None = None
    dropout: float = 0.05
    # Substrings selecting which LoRA matrices enter influence (e.g. ["layer.5."]); None = all.
    gradient_modules: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Warm-up fine-tune of the LoRA adapter (and classifier head) on the pool."""

    epochs: int = 2
    lr: float = 3.0e-4
    batch_size: int = 32
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: str = "linear"  # "linear": lr decays linearly to 0 over the run; "constant"
    log_every: int = 20  # progress line every this many optimizer steps


@dataclass(frozen=True)
class AdapterConfig:
    """`path`: a saved peft adapter folder to use instead of warm-up training."""

    path: Path | None = None


@dataclass(frozen=True)
class CurationConfig:
    """Which `sql/<query>.sql` selects the curated subset, and its DuckDB parameters.

    `target_set` and `method` default to the first target set and the first estimator."""

    query: str = "top_fraction"
    params: dict[str, Any] = field(default_factory=lambda: {"fraction": 0.8})


@dataclass(frozen=True)
class HyperinfConfig:
    """The whole pipeline configuration. Paths are absolute once loaded."""

    data: DataConfig
    targets: dict[str, TargetConfig]
    storage_root: Path = Path("hyperinf_data")
    model: str = "minilm"  # a bundled name, or an absolute path to a local Hugging Face folder
    task: str = "classification"
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    estimators: tuple[str, ...] = ("hyperinf", "datainf", "tracin")
    damping_ratio: float = 0.1
    # Extra EstimatorOptions fields (schulz_order, schulz_tol, schulz_max_iter, lissa_iterations, ...).
    estimator_options: dict[str, Any] = field(default_factory=dict)
    # 0 = store raw gradients: exact scores. A JL projection (e.g. 8192) shrinks rows ~9x for MiniLM but a
    # GFIM-preconditioned query is nearly orthogonal to the rows, so projected HyperINF scores are noisy
    # (docs/tables.md); keep it for tracin / datainf or for pools too large to store raw.
    projection_dim: int = 0
    projection_seed: int = 0
    projection_dtype: str = "float16"
    max_length: int = 128
    gradient_batch_size: int = 32
    device: str = "auto"
    curation: CurationConfig = field(default_factory=CurationConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready mapping (paths as strings); `load_config(cfg.to_dict()) == cfg`."""
        return _plain(self)


def load_config(source: str | Path | Mapping[str, Any], *, base_dir: str | Path | None = None) -> HyperinfConfig:
    """Parse and validate a config file (or an already-parsed mapping).

    Relative paths resolve against the file's folder, or `base_dir` (default: cwd) for a mapping.
    Raises ConfigError listing every problem found; nothing else is done before validation passes.
    """
    if isinstance(source, Mapping):
        raw, where = source, "config"
        base = Path(base_dir or Path.cwd()).resolve()
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        raw = {} if raw is None else raw
        where, base = str(path), path.resolve().parent
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    problems: list[str] = []
    cfg = _Builder(base, problems).build(HyperinfConfig, _with_task_defaults(raw), "")
    if problems:
        err = ConfigError(f"{where}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
        err.problems = problems  # type: ignore[attr-defined]
        raise err
    return cfg


def _with_task_defaults(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """causal_lm: prompt/response columns default to "prompt"/"response" and the label is optional."""
    data = raw.get("data")
    if raw.get("task") != "causal_lm" or not isinstance(data, Mapping):
        return raw
    data = {"prompt_column": "prompt", "response_column": "response", "label_column": None, **data}
    return {**raw, "data": data}


class _Invalid:
    """Marker for a value that failed validation (its problem is already recorded)."""

    def __repr__(self) -> str:
        return "<invalid>"


_INVALID: Any = _Invalid()


@dataclass
class _Builder:
    """Turns raw YAML values into the typed dataclasses, recording every problem instead of stopping.

    Each dataclass's value checks (`_CHECKS`) run on whatever fields typed correctly, so one pass
    reports type errors and impossible values together.
    """

    base: Path
    problems: list[str]

    def build(self, cls: type, raw: Any, where: str) -> Any:
        if not isinstance(raw, Mapping):
            self.problems.append(f"{where or 'config'}: expected a mapping, got {_describe(raw)}")
            return _INVALID
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                self.problems.append(f"{_join(where, str(key))}: unknown key{_did_you_mean(str(key), fields)}")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            if name in raw:
                values[name] = self.value(hints[name], raw[name], _join(where, name))
            elif isinstance(f.default, Path):  # a default path is relative to the config too
                values[name] = self.value(hints[name], str(f.default), _join(where, name))
            elif f.default is not dataclasses.MISSING:
                values[name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[name] = f.default_factory()
            else:
                self.problems.append(f"{_join(where, name)}: required key is missing")
                values[name] = _INVALID
        check = _CHECKS.get(cls)
        if check is not None:
            check(values, _Report(where, self.problems))
        if any(v is _INVALID for v in values.values()):
            return _INVALID
        return cls(**values)

    def value(self, hint: Any, raw: Any, where: str) -> Any:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (types.UnionType, typing.Union):  # only `X | None` is used
            if raw is None:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self.value(inner, raw, where)
        if dataclasses.is_dataclass(hint):
            return self.build(hint, raw, where)
        if origin is tuple:
            if not isinstance(raw, list | tuple):
                return self._bad(where, "a list", raw)
            items = [self.value(args[0], item, f"{where}[{i}]") for i, item in enumerate(raw)]
            return _INVALID if any(i is _INVALID for i in items) else tuple(items)
        if origin is dict:
            if not isinstance(raw, Mapping):
                return self._bad(where, "a mapping", raw)
            out = {str(k): self.value(args[1], v, _join(where, str(k))) for k, v in raw.items()}
            return _INVALID if any(v is _INVALID for v in out.values()) else out
        return self._scalar(hint, raw, where)

    def _scalar(self, hint: Any, raw: Any, where: str) -> Any:
        if hint is Any:
            return raw
        if hint is int:  # bool is an int subclass in Python; `true` is never a count
            return raw if isinstance(raw, int) and not isinstance(raw, bool) else self._bad(where, "an integer", raw)
        if hint is float:
            ok = isinstance(raw, int | float) and not isinstance(raw, bool)
            return float(raw) if ok else self._bad(where, "a number", raw)
        if hint is str:
            return raw if isinstance(raw, str) else self._bad(where, "a string", raw)
        if hint is Path:
            if not isinstance(raw, str) or not raw:
                return self._bad(where, "a path", raw)
            if "://" in raw:
                self.problems.append(f"{where}: object-store URIs are not supported yet; use a local path")
                return _INVALID
            return (self.base / Path(raw).expanduser()).resolve()
        raise TypeError(f"config field {where} has an unsupported type {hint!r}")  # a bug here, not user input

    def _bad(self, where: str, expected: str, raw: Any) -> Any:
        self.problems.append(f"{where}: expected {expected}, got {_describe(raw)}")
        return _INVALID


@dataclass
class _Report:
    """Value checks of one dataclass; every check skips a field that already failed its type check."""

    where: str
    problems: list[str]

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{_join(self.where, key)}: {message}")

    def at_least(self, values: Mapping[str, Any], key: str, low: float, *, strict: bool = False) -> None:
        value = values[key]
        if value is not _INVALID and value is not None and (value < low or (strict and value == low)):
            self.add(key, f"must be {'>' if strict else '>='} {low}, got {value}")

    def choice(self, key: str, value: Any, options: Iterable[str]) -> None:
        options = list(options)
        if value is not _INVALID and value not in options:
            self.add(key, f"{value!r} is not one of {options}{_did_you_mean(str(value), options)}")


def _check_data(v: dict[str, Any], r: _Report) -> None:
    if v["path"] is not _INVALID and not v["path"].exists():
        r.add("path", f"{str(v['path'])!r} does not exist")


def _check_target(v: dict[str, Any], r: _Report) -> None:
    path, where = v["path"], v["where"]
    if path is _INVALID or where is _INVALID:
        return
    if (path is None) == (where is None):
        r.add("", "give exactly one of `path` (a file) or `where` (a SQL predicate over the pool)")
    elif path is not None and not path.is_file():
        r.add("path", f"{str(path)!r} is not a file")
    elif where is not None:
        problem = where_predicate_problem(where)
        if problem:
            r.add("where", problem)


def _check_lora(v: dict[str, Any], r: _Report) -> None:
    r.at_least(v, "rank", 1)
    r.at_least(v, "alpha", 0, strict=True)
    if v["dropout"] is not _INVALID and not 0 <= v["dropout"] < 1:
        r.add("dropout", f"must be in [0, 1), got {v['dropout']}")
    for key in ("modules", "gradient_modules"):
        if v[key] == ():
            r.add(key, "empty list; leave it out (or null) for the default")


def _check_train(v: dict[str, Any], r: _Report) -> None:
    for key, low, strict in (("epochs", 1, False), ("lr", 0, True), ("batch_size", 1, False), ("seed", 0, False),
                             ("weight_decay", 0, False), ("max_grad_norm", 0, True), ("log_every", 1, False)):
        r.at_least(v, key, low, strict=strict)
    r.choice("schedule", v["schedule"], SCHEDULES)


def _check_adapter(v: dict[str, Any], r: _Report) -> None:
    path = v["path"]
    if path not in (None, _INVALID) and not (path / "adapter_config.json").is_file():
        r.add("path", f"{str(path)!r} is not a saved peft adapter (no adapter_config.json)")


def _check_config(v: dict[str, Any], r: _Report) -> None:
    """Top-level values and everything that relates two sections."""
    r.choice("task", v["task"], TASKS)
    model = v["model"]
    if model is not _INVALID and model not in BUNDLED_MODELS and not Path(model).is_dir():
        r.add("model", f"{model!r} is neither a bundled model {list(BUNDLED_MODELS)} nor an existing folder"
                       f"{_did_you_mean(model, BUNDLED_MODELS)}")
    if v["targets"] == {}:
        r.add("targets", "at least one target set is required")
    for name in v["targets"] if v["targets"] is not _INVALID else ():
        if not _NAME_RE.match(name):
            r.add(f"targets.{name}", "a target set name must be letters, digits, '_' or '-', starting with a letter")
    estimators = v["estimators"]
    if estimators is not _INVALID:
        if not estimators:
            r.add("estimators", "at least one estimator is required")
        for i, name in enumerate(estimators):
            r.choice(f"estimators[{i}]", name, PIPELINE_ESTIMATORS)
        dupes = sorted({e for e in estimators if estimators.count(e) > 1})
        if dupes:
            r.add("estimators", f"listed more than once: {dupes}")
    r.at_least(v, "damping_ratio", 0, strict=True)
    if v["estimator_options"] is not _INVALID:
        for key, message in _estimator_option_problems(v["estimator_options"]):
            r.add(key, message)
    for key in ("projection_dim", "projection_seed"):
        r.at_least(v, key, 0)
    r.choice("projection_dtype", v["projection_dtype"], PROJECTION_DTYPES)
    r.at_least(v, "max_length", 4)
    r.at_least(v, "gradient_batch_size", 1)
    if v["device"] is not _INVALID and not _DEVICE_RE.match(v["device"]):
        r.add("device", f"{v['device']!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if v["data"] is not _INVALID and v["task"] is not _INVALID:
        _check_columns(v["data"], v["task"], r)
    if all(v[k] is not _INVALID for k in ("curation", "targets", "estimators")):
        v["curation"] = _curation_defaults(v["curation"], v["targets"], v["estimators"])
        _check_curation(v["curation"], v["targets"], v["estimators"], r)


def _check_columns(data: DataConfig, task: str, r: _Report) -> None:
    if task == "classification":
        if data.label_column is None:
            r.add("data.label_column", "required for task classification")
        for key in ("prompt_column", "response_column"):
            if getattr(data, key) is not None:
                r.add(f"data.{key}", "only used with task causal_lm (classification reads text_column)")
    used = [c for c in (data.id_column, data.label_column) if c is not None]
    used += [data.prompt_column, data.response_column] if task == "causal_lm" else [data.text_column]
    dupes = sorted({c for c in used if used.count(c) > 1})
    if dupes:
        r.add("data", f"the same column is used for two roles: {dupes}")


def where_predicate_problem(predicate: str) -> str | None:
    """Why `predicate` is not a single SQL boolean expression (parsed by DuckDB, not executed), or None."""
    if not predicate.strip():
        return "empty predicate"
    try:
        statements = duckdb.connect().extract_statements(f"SELECT * FROM examples WHERE ({predicate})")
    except duckdb.Error as err:
        return f"does not parse as a SQL predicate: {str(err).splitlines()[0]}"
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        return "must be one boolean expression, not several statements"
    return None


def _estimator_option_problems(options: Mapping[str, Any]) -> list[tuple[str, str]]:
    # method and damping_ratio have their own top-level keys; dtype is not a YAML value.
    allowed = [f.name for f in dataclasses.fields(EstimatorOptions) if f.name not in ("method", "damping_ratio", "dtype")]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        return [(f"estimator_options.{k}", f"unknown option{_did_you_mean(k, allowed)}; known: {allowed}")
                for k in unknown]
    try:
        EstimatorOptions(**options)
    except (TypeError, ValueError) as err:
        return [("estimator_options", str(err))]
    return []


# Query parameters that name a target set; `target_set` and `method` get defaults when a query takes them.
_TARGET_PARAMS = ("target_set", "set_a", "set_b")


def _curation_defaults(cur: CurationConfig, targets: Mapping[str, Any], estimators: tuple[str, ...]
                       ) -> CurationConfig:
    """Fill `target_set` (the first target set) and `method` (the first estimator) if the query takes them."""
    info = list_queries().get(cur.query)
    if info is None or not targets or not estimators:
        return cur
    defaults = {"target_set": next(iter(targets)), "method": estimators[0]}
    return dataclasses.replace(cur, params={**{k: v for k, v in defaults.items() if k in info.params},
                                            **cur.params})


def _check_curation(cur: CurationConfig, targets: Mapping[str, Any], estimators: tuple[str, ...],
                    r: _Report) -> None:
    queries = {name: q for name, q in list_queries().items() if name != EXPORT_QUERY}
    if cur.query not in queries:
        r.add("curation.query", f"no query {cur.query!r}{_did_you_mean(cur.query, queries)}; "
                                f"available: {sorted(queries)}")
        return
    takes = queries[cur.query].params
    for key, value in cur.params.items():
        where = f"curation.params.{key}"
        if key not in takes:
            r.add(where, f"query {cur.query!r} takes no such parameter {list(takes)}{_did_you_mean(key, takes)}")
        elif not isinstance(value, str | int | float | bool):
            r.add(where, f"expected a scalar, got {_describe(value)}")
        elif key in _TARGET_PARAMS and value not in targets:
            r.add(where, f"{value!r} is not a configured target set {sorted(targets)}"
                         f"{_did_you_mean(str(value), targets)}")
        elif key == "method" and value not in estimators:
            r.add(where, f"{value!r} is not one of the configured estimators {list(estimators)}")
    missing = [k for k in takes if k not in cur.params]
    if missing:
        r.add("curation.params", f"query {cur.query!r} needs {missing}")


_CHECKS = {
    DataConfig: _check_data,
    TargetConfig: _check_target,
    LoraSettings: _check_lora,
    TrainConfig: _check_train,
    AdapterConfig: _check_adapter,
    HyperinfConfig: _check_config,
}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _join(where: str, key: str) -> str:
    if not key:
        return where or "config"
    return f"{where}.{key}" if where else key


def _describe(raw: Any) -> str:
    return f"{type(raw).__name__} {raw!r}" if raw is not None else "null"


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
