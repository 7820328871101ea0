"""The one YAML configuration file, validated in full before any work starts.

`load_config(path_or_mapping)` validates every key (pydantic models: the sections of `config_sections.py` and
the settings of `settings.py`), then the checks that relate two sections (data columns vs task, curation and
evaluation parameters vs target sets and estimators), and raises one `ConfigError` listing *every* problem as
`key: message`, with a did-you-mean for misspelled keys and choices, so a user fixes the file in one round. Relative paths (data,
targets, storage root, adapter, a model folder) resolve against the config file's folder (or `base_dir` for
a mapping), so a config means the same thing from any cwd. `cfg.to_dict()` gives back a mapping that
`load_config` turns into an equal config.
"""

from __future__ import annotations

import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hyperinf_ops.config_problems import did_you_mean, problem_text, renamed_key_problems
from hyperinf_ops.config_sections import (
    AdapterSection,
    CurationSection,
    DataSection,
    EvaluationSection,
    RetentionSection,
    StorageRoot,
    TargetSection,
    curation_queries,
    resolve_config_path,
)
from hyperinf_ops.errors import ConfigError
from hyperinf_ops.settings import (
    BUNDLED_MODELS,
    DEFAULT_COMPRESSION,
    SELF_INFLUENCE_METHODS,
    SELF_TARGET,
    CompressionSpec,
    Device,
    EstimatorOptions,
    GradientSettings,
    LoraSettings,
    ModelSpec,
    PipelineMethod,
    Settings,
    SolverOptions,
    TaskName,
    TrainSettings,
)

__all__ = [
    "AdapterSection",
    "CurationSection",
    "DataSection",
    "EvaluationSection",
    "HyperinfConfig",
    "RetentionSection",
    "TargetSection",
    "load_config",
]

# Target set names become SQL parameter values, file names and Dagster metadata keys.
_TARGET_NAME = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
# Query parameters that name a target set; `target_set` and `method` get defaults when a query takes them.
TARGET_PARAMS = ("target_set", "set_a", "set_b")
# Types and ranges of the curation queries' numeric and flag parameters (by query, else by name), checked with
# the config: a wrong type would fail in DuckDB after the whole run, and an empty subset (top_fraction's
# fraction 0, drop_harmful's fraction 1) would replace the last good export.
_UNIT = Annotated[float, Field(strict=True)]  # a number, not a string DuckDB would refuse late
_PARAM_TYPES: dict[tuple[str | None, str], Any] = {
    ("top_fraction", "fraction"): Annotated[_UNIT, Field(gt=0, le=1)],
    ("drop_harmful", "fraction"): Annotated[_UNIT, Field(ge=0, lt=1)],
    (None, "k"): Annotated[StrictInt, Field(ge=1)],
    (None, "n"): Annotated[StrictInt, Field(ge=1)],
    (None, "balance"): StrictBool,
}


class HyperinfConfig(Settings):
    """The whole pipeline configuration. Paths are absolute once loaded."""

    data: DataSection
    targets: dict[Annotated[str, Field(pattern=_TARGET_NAME)], TargetSection] = Field(min_length=1)
    storage_root: StorageRoot = Field(Path("hyperinf_data"), validate_default=True)  # a folder or s3://bucket/prefix
    model: str = "minilm"  # a bundled name, or a local Hugging Face folder (absolute once loaded)
    task: TaskName = "classification"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    estimators: tuple[PipelineMethod, ...] = Field(("hyperinf", "datainf", "tracin"), strict=False, min_length=1)
    damping_ratio: float = Field(0.1, gt=0)
    estimator_options: SolverOptions = Field(default_factory=SolverOptions)
    # How gradient rows are stored: half-whitened int4 codes by default (8x smaller than exact float32 rows);
    # docs/compression.md has what each setting costs in quality and bytes.
    compression: CompressionSpec = DEFAULT_COMPRESSION
    max_length: int = Field(128, ge=4)
    gradient_batch_size: int = Field(32, ge=1)
    device: Device = "auto"
    curation: CurationSection = Field(default_factory=CurationSection)
    evaluation: EvaluationSection | None = None
    retention: RetentionSection = Field(default_factory=RetentionSection)  # what each refresh cleans up

    @field_validator("model")
    @classmethod
    def _model_name_or_folder(cls, model: str, info: ValidationInfo) -> str:
        if model in BUNDLED_MODELS:
            return model
        folder = resolve_config_path(model, info)
        if not isinstance(folder, Path) or not folder.is_dir():
            raise ValueError(f"{model!r} is neither a bundled model {list(BUNDLED_MODELS)} nor an existing folder"
                             f"{did_you_mean(model, BUNDLED_MODELS)}")
        return str(folder)

    @field_validator("storage_root")
    @classmethod
    def _not_a_file(cls, root: Any) -> Any:
        if isinstance(root, Path) and root.exists() and not root.is_dir():
            raise ValueError(f"{str(root)!r} is a file; give a folder (created when missing)")
        return root

    @field_validator("estimators")
    @classmethod
    def _no_duplicates(cls, estimators: tuple[str, ...]) -> tuple[str, ...]:
        dupes = sorted({e for e in estimators if estimators.count(e) > 1})
        if dupes:
            raise ValueError(f"listed more than once: {dupes}")
        return estimators

    @field_validator("targets")
    @classmethod
    def _not_reserved(cls, targets: dict[str, TargetSection]) -> dict[str, TargetSection]:
        if SELF_TARGET in targets:
            raise ValueError(f"{SELF_TARGET!r} is reserved for the self-influence scores; name the target set "
                             "otherwise")
        return targets

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, raw: Any) -> Any:
        return with_defaults(raw)

    # ------------------------------------------------------------------ the settings core functions take
    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(name=self.model, task=self.task, max_length=self.max_length, device=self.device)

    @property
    def gradient_settings(self) -> GradientSettings:
        """The gradient pass: matrix selection, batch size, and how rows are compressed."""
        return GradientSettings(modules=self.lora.gradient_modules, batch_size=self.gradient_batch_size,
                                compression=self.compression)

    def estimator(self, method: str) -> EstimatorOptions:
        """The full solver settings of one method: the shared damping ratio and `estimator_options`."""
        return EstimatorOptions(method=method, damping_ratio=self.damping_ratio,
                                **self.estimator_options.model_dump())

    @property
    def evaluation_methods(self) -> tuple[str, ...]:
        """The methods whose curated subsets the evaluation fits (its `methods`, default the estimators)."""
        return (self.evaluation.methods if self.evaluation and self.evaluation.methods else self.estimators)

    @property
    def evaluation_target(self) -> str:
        """The target set whose rankings the evaluation's curated subsets come from."""
        if self.evaluation and self.evaluation.target_set:
            return self.evaluation.target_set
        return str(self.curation.params.get("target_set", next(iter(self.targets))))

    @property
    def self_influence_estimators(self) -> list[EstimatorOptions]:
        """The solver settings of the self-influence rankings every scoring run writes (target set "self")."""
        return [self.estimator(m) for m in SELF_INFLUENCE_METHODS]

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready mapping (paths as strings); `load_config(cfg.to_dict()) == cfg`."""
        return self.model_dump(mode="json")


def load_config(source: str | Path | Mapping[str, Any], *, base_dir: str | Path | None = None) -> HyperinfConfig:
    """Parse and validate a config file (or an already-parsed mapping).

    Relative paths resolve against the file's folder, or `base_dir` (default: cwd) for a mapping.
    Raises ConfigError listing every problem found (also as `err.problems`); nothing else is done before.
    """
    if isinstance(source, Mapping):
        raw, where = source, "config"
        base = Path(base_dir or Path.cwd()).resolve()
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        raw = {} if raw is None else raw
        where, base = str(path), path.resolve().parent
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    problems, raw = renamed_key_problems(raw)
    cfg = None
    try:
        cfg = HyperinfConfig.model_validate(raw, context={"base_dir": base})
    except ValidationError as err:
        problems += [problem_text(e, HyperinfConfig) for e in err.errors()]
    problems += _cross_section_problems(with_defaults(raw))
    if problems:
        error = ConfigError(f"{where}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
        error.problems = problems  # type: ignore[attr-defined]
        raise error
    return cfg


def with_defaults(raw: Any) -> Any:
    """The raw mapping with the defaults that depend on other keys: causal_lm reads `prompt` / `response`
    columns and needs no label; the curation query's `target_set` / `method` default to the first target
    set / estimator; a `compression` mapping overrides DEFAULT_COMPRESSION key by key (`{sketch_dim: 48}`
    keeps the default whitening and int4 codes; `{whiten: 0, dtype: float32}` stores exact rows)."""
    if not isinstance(raw, Mapping):
        return raw
    raw = dict(raw)
    if isinstance(raw.get("compression"), Mapping):
        raw["compression"] = {**DEFAULT_COMPRESSION.model_dump(), **raw["compression"]}
    data = raw.get("data")
    if raw.get("task") == "causal_lm" and isinstance(data, Mapping):
        raw["data"] = {"prompt_column": "prompt", "response_column": "response", "label_column": None, **data}
    if "curation" in raw or "targets" in raw:
        raw["curation"] = _curation_with_defaults(raw)
    return raw


def _curation_with_defaults(raw: Mapping[str, Any]) -> Any:
    """The curation mapping with `target_set` / `method` filled in when its query takes them."""
    curation = raw.get("curation", {})
    targets, estimators = raw.get("targets"), raw.get("estimators", HyperinfConfig.model_fields["estimators"].default)
    if not isinstance(curation, Mapping) or not isinstance(targets, Mapping) or not targets:
        return curation
    params = curation.get("params", {"fraction": 0.8})
    info = curation_queries().get(curation.get("query", "top_fraction"))
    if info is None or not isinstance(params, Mapping) or not isinstance(estimators, list | tuple) or not estimators:
        return curation
    # class-balanced by default: measured better than the plain top fraction (docs/results.md, section 2)
    defaults = {"target_set": next(iter(targets)), "method": estimators[0], "balance": True}
    return {**curation, "params": {**{k: v for k, v in defaults.items() if k in info.params}, **params}}


def _cross_section_problems(raw: Mapping[str, Any]) -> list[str]:
    """Checks that relate two sections, on whatever of them is well-formed (so they are reported together
    with the field errors)."""
    problems = _column_problems(raw.get("data"), raw.get("task", "classification"))
    curation = raw.get("curation")
    if isinstance(curation, Mapping):
        problems += _curation_problems(curation, raw.get("targets"), raw.get("estimators"))
    evaluation = raw.get("evaluation")
    if isinstance(evaluation, Mapping):
        problems += _evaluation_problems(evaluation, raw.get("targets"), raw.get("estimators"))
    return problems


def _evaluation_problems(evaluation: Mapping[str, Any], targets: Any, estimators: Any) -> list[str]:
    problems = []
    target = evaluation.get("target_set")
    if target is not None and isinstance(targets, Mapping) and target not in targets:
        problems.append(_unknown_target("evaluation.target_set", target, targets))
    methods = evaluation.get("methods")
    estimators = HyperinfConfig.model_fields["estimators"].default if estimators is None else estimators
    if isinstance(methods, list | tuple) and isinstance(estimators, list | tuple):
        unknown = [m for m in methods if m not in estimators]
        if unknown:
            problems.append(f"evaluation.methods: {unknown} are not configured estimators {list(estimators)} "
                            "(a curated subset needs the method's scores)")
    return problems


def _column_problems(data: Any, task: Any) -> list[str]:
    if not isinstance(data, Mapping) or task not in typing.get_args(TaskName):
        return []
    problems = []
    get = DataSection.model_fields
    columns = {k: data.get(k, get[k].default) for k in
               ("text_column", "label_column", "id_column", "prompt_column", "response_column")}
    if task == "classification":
        if columns["label_column"] is None:
            problems.append("data.label_column: required for task classification")
        problems += [f"data.{key}: only used with task causal_lm (classification reads text_column)"
                     for key in ("prompt_column", "response_column") if columns[key] is not None]
        roles = ["text_column"]
    else:
        roles = ["prompt_column", "response_column"]
    used = [columns[k] for k in ("id_column", "label_column", *roles) if isinstance(columns[k], str)]
    dupes = sorted({c for c in used if used.count(c) > 1})
    if dupes:
        problems.append(f"data: the same column is used for two roles: {dupes}")
    return problems


def _curation_problems(curation: Mapping[str, Any], targets: Any, estimators: Any) -> list[str]:
    info = curation_queries().get(curation.get("query", "top_fraction"))
    params = curation.get("params", {})
    if info is None or not isinstance(params, Mapping):
        return []  # the field check reports an unknown query or a malformed params mapping
    problems = []
    # Target set SELF_TARGET holds the self-influence rankings, scored with SELF_INFLUENCE_METHODS.
    targets = [*targets, SELF_TARGET] if isinstance(targets, Mapping) else None
    on_self = params.get("target_set") == SELF_TARGET
    for key, value in params.items():
        where = f"curation.params.{key}"
        if key not in info.params:
            problems.append(f"{where}: query {info.name!r} takes no such parameter {list(info.params)}"
                            f"{did_you_mean(key, info.params)}")
        elif key in TARGET_PARAMS and targets is not None and value not in targets:
            problems.append(_unknown_target(where, value, targets))
        elif key == "method" and on_self and value not in SELF_INFLUENCE_METHODS:
            problems.append(f"{where}: target set {SELF_TARGET!r} is scored with {list(SELF_INFLUENCE_METHODS)}, "
                            f"not {value!r}")
        elif key == "method" and not on_self and isinstance(estimators, list | tuple) and value not in estimators:
            problems.append(f"{where}: {value!r} is not one of the configured estimators {list(estimators)}")
        elif (kind := _PARAM_TYPES.get((info.name, key), _PARAM_TYPES.get((None, key)))) is not None:
            try:
                TypeAdapter(kind).validate_python(value)
            except ValidationError as err:
                problems.append(f"{where}: {err.errors()[0]['msg'].lower()}, got {value!r}")
    missing = [k for k in info.params if k not in params]
    if missing:
        problems.append(f"curation.params: query {info.name!r} needs {missing}")
    return problems


def _unknown_target(where: str, value: Any, targets: Collection[str]) -> str:
    return f"{where}: {value!r} is not a configured target set {sorted(targets)}{did_you_mean(str(value), targets)}"
