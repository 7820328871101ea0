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

import math
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hyperinf_ops.config.problems import did_you_mean, problem_text, renamed_key_problems
from hyperinf_ops.config.query_params import LABEL_QUERIES, TARGET_PARAMS, query_param_problem
from hyperinf_ops.config.sections import (
    AdapterSection,
    CurationSection,
    DataSection,
    EvaluationSection,
    RetentionSection,
    StorageRoot,
    TargetSection,
    curation_queries,
    default_curation,
    resolve_config_path,
)
from hyperinf_ops.config.strict_yaml import read_yaml
from hyperinf_ops.errors import ConfigError
from hyperinf_ops.settings import (
    BUNDLED_MODELS,
    DEFAULT_COMPRESSION,
    SELF_INFLUENCE_METHODS,
    SELF_SIGNALS,
    SELF_TARGET,
    Checkpointing,
    CompressionSpec,
    Device,
    EstimatorOptions,
    GradientSettings,
    LoraSettings,
    ModelSpec,
    PipelineMethod,
    Precision,
    Settings,
    SignalSettings,
    SolverOptions,
    TaskName,
    TrainSettings,
    cover_on,
    default_fusion,
)

__all__ = [
    "query_param_problem",
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
# lambda = damping_ratio x mean(g^2): at 1e30 the damping swamps the curvature and every score collapses toward
# zero (Spearman 0.62 against the default in the audit); past 100 the inverse is the identity in all but name.
MAX_DAMPING_RATIO = 100.0


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
    damping_ratio: float = Field(0.1, gt=0, le=MAX_DAMPING_RATIO)
    estimator_options: SolverOptions = Field(default_factory=SolverOptions)
    # How gradient rows are stored: half-whitened int4 codes by default (8x smaller than exact float32 rows), and for
    # models whose rows would pass `row_budget` (64 KB) sketched to the widest width that fits, whitened in the sketch
    # space (the width rule: sketch.sketch_width); docs/compression.md has what each setting costs in quality and bytes.
    compression: CompressionSpec = DEFAULT_COMPRESSION
    max_length: int = Field(128, ge=4)
    # examples per forward/backward of the gradient pass; `auto` = from the free memory on CUDA (32 elsewhere), and
    # a batch that runs out of device memory is halved and retried (no example lost or scored twice)
    gradient_batch_size: Annotated[int, Field(ge=1)] | typing.Literal["auto"] = 32
    device: Device = "auto"
    # the base weights' dtype: `auto` = bfloat16 on a CUDA device with bf16 support, float32 elsewhere (LoRA weights,
    # the classifier head and per-example gradients stay float32); part of the gradient rows' fingerprint
    precision: Precision = "auto"
    # recompute activations in the backward of the warm-up and the gradient pass (identical gradients, a fraction
    # of the memory, ~1/3 more compute); `auto` = on from max_length 1024
    gradient_checkpointing: Checkpointing = "auto"
    signals: SignalSettings = Field(default_factory=SignalSettings)  # rankings beside influence (stages/rankings.py)
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
        if not (folder / "config.json").is_file():
            raise ValueError(f"{str(folder)!r} has no config.json: give a Hugging Face model folder (the one "
                             "save_pretrained writes: config.json, the weights and the tokenizer)")
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
        return ModelSpec(name=self.model, task=self.task, max_length=self.max_length, device=self.device,
                         precision=self.precision, gradient_checkpointing=self.gradient_checkpointing)

    @property
    def gradient_settings(self) -> GradientSettings:
        """The gradient pass: matrix selection, batch size, and how rows are compressed."""
        from hyperinf_ops.devices import resolve_dtype_name  # torch: only when a pass is about to run

        return GradientSettings(modules=self.lora.gradient_modules, batch_size=self.gradient_batch_size,
                                model_dtype=resolve_dtype_name(self.precision, self.device),
                                compression=self.compression)

    def estimator(self, method: str) -> EstimatorOptions:
        """The full solver settings of one method: the shared damping ratio and `estimator_options`."""
        return EstimatorOptions(method=method, damping_ratio=self.damping_ratio,
                                **self.estimator_options.model_dump())

    @property
    def evaluation_target(self) -> str:
        """The target set whose rankings the evaluation's candidates read (target-free rankings: `self`)."""
        if self.evaluation and self.evaluation.target_set:
            return self.evaluation.target_set
        target = self.curation.params.get("target_set", next(iter(self.targets)))
        return next(iter(self.targets)) if target == SELF_TARGET else str(target)

    @property
    def evaluation_candidates(self) -> tuple[Any, ...]:
        """The evaluation's candidate curations (stages/evaluation_plan.Candidate): every query x ranking x fraction
        (x class-balance variant for top_fraction); empty without an `evaluation:` block."""
        from hyperinf_ops.stages.evaluation_plan import WITHOUT_FRACTION, Candidate

        ev = self.evaluation
        if ev is None:
            return ()
        written = rankings(self.to_dict())
        candidates = (
            Candidate(query=q, method=m, fraction=None if q in WITHOUT_FRACTION else f, balance=b,
                      target_set=SELF_TARGET if written.get(m) == SELF_TARGET else self.evaluation_target)
            for q in ev.queries for m in ev.methods or (self.estimators[0], "fused") for f in ev.fractions
            for b in (ev.balance_variants if q == "top_fraction" else (False,)))
        return tuple(dict.fromkeys(candidates))  # drop_issues takes no fraction: one candidate per ranking

    @property
    def fusion_members(self) -> tuple[str, ...]:
        """The rankings `fused` combines: `signals.fuse`, or `default_fusion` of the estimators."""
        return self.signals.fuse or default_fusion(self.estimators, self.signals.checkpoints, self.signals.probe,
                                                   self.task == "classification")

    @property
    def curation_auto(self) -> bool:
        """Whether the export is the evaluation's choice (`curation.method: auto`, the default with an
        `evaluation:` block) rather than the configured query."""
        return self.curation.method == "auto" or (self.curation.method is None and self.evaluation is not None)

    @property
    def export_name(self) -> str:
        """The export's folder under `<storage_root>/exports/`: `auto` for the evaluation's choice, else the query."""
        return "auto" if self.curation_auto else self.curation.query

    @property
    def cover_estimators(self) -> list[EstimatorOptions]:
        """The estimators whose cover ranking (`<method>_cover`) the scoring writes: hyperinf and tracin when
        configured, with `signals.cover` (by default for a causal LM)."""
        return [self.estimator(m) for m in ("hyperinf", "tracin")
                if cover_on(self.signals.cover, self.task) and m in self.estimators]

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
        if path.is_dir():
            raise ConfigError(f"config {str(path)!r} is a folder: give the config file in it (e.g. "
                              f"{str(path / 'hyperinf.yaml')!r})")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = read_yaml(path.read_text(encoding="utf-8"))
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
    if "params" in curation and "query" not in curation:
        return curation  # _curation_problems: params without the query they are for
    default = default_curation(raw.get("task"))
    query = curation.get("query", default["query"])
    params = curation.get("params", default["params"] if query == default["query"] else {})
    info = curation_queries().get(query)
    if info is None or not isinstance(params, Mapping) or not isinstance(estimators, list | tuple) or not estimators:
        return curation
    method = estimators[0]
    signals = raw.get("signals") if isinstance(raw.get("signals"), Mapping) else {}
    if raw.get("task") == "causal_lm" and method in ("hyperinf", "tracin") and cover_on(signals.get("cover"), "causal_lm"):
        method = f"{method}_cover"  # lowest test loss on both LLM tasks measured (docs/results.md, section 8)
    # class-balanced by default: measured better than the plain top fraction (docs/results.md, section 2)
    defaults = {"target_set": next(iter(targets)), "method": method, "balance": True}
    if isinstance(params.get("method"), str) and params["method"] in SELF_SIGNALS:
        defaults["target_set"] = SELF_TARGET  # target-free rankings are stored under target set `self`
    return {**curation, "query": query,
            "params": {**{k: v for k, v in defaults.items() if k in info.params}, **params}}


def _cross_section_problems(raw: Mapping[str, Any]) -> list[str]:
    """Checks that relate two sections, on whatever of them is well-formed (so they are reported together
    with the field errors)."""
    problems = _column_problems(raw.get("data"), raw.get("task", "classification"))
    signals = raw.get("signals", {})
    if isinstance(signals, Mapping):
        problems += _signal_problems(signals, raw.get("task", "classification"), raw.get("estimators"))
    if isinstance(raw.get("curation"), Mapping):
        problems += _curation_problems(raw)
    evaluation = raw.get("evaluation")
    if isinstance(evaluation, Mapping):
        problems += _evaluation_problems(raw)
    curation = raw.get("curation")
    if isinstance(curation, Mapping) and curation.get("method") == "auto" and not isinstance(evaluation, Mapping):
        problems.append("curation.method: auto chooses by the evaluation: add an `evaluation:` block (a labelled "
                        "test file), or use method: fixed")
    return problems


def rankings(raw: Mapping[str, Any]) -> dict[str, str]:
    """Every ranking a config's scoring writes: method -> the target set it is stored under (`self` for the
    target-free ones, `*` for every configured target set); from the raw mapping with defaults."""
    estimators = raw.get("estimators") or HyperinfConfig.model_fields["estimators"].default
    signals = raw.get("signals", {})
    signals = signals if isinstance(signals, Mapping) else {}
    classes = raw.get("task", "classification") == "classification"
    out = dict.fromkeys(estimators if isinstance(estimators, list | tuple) else [], "*")
    out["loss"] = SELF_TARGET
    if classes:
        out.update(margin=SELF_TARGET, aum=SELF_TARGET)
        if signals.get("probe", SignalSettings().probe):
            out["probe"] = SELF_TARGET
        if signals.get("folds", SignalSettings().folds):
            out["confident"] = SELF_TARGET
    if signals.get("checkpoints", SignalSettings().checkpoints) and "hyperinf" in out:
        out["hyperinf_cp"] = "*"
    if signals.get("similarity", SignalSettings().similarity):
        out["similarity"] = "*"
    if signals.get("unit", SignalSettings().unit):
        out.update({f"{m}_unit": "*" for m in ("hyperinf", "tracin") if m in out})
    if cover_on(signals.get("cover"), raw.get("task", "classification")):
        out.update({f"{m}_cover": "*" for m in ("hyperinf", "tracin") if m in out})
    out["fused"] = "*"
    return out


def _signal_problems(signals: Mapping[str, Any], task: Any, estimators: Any) -> list[str]:
    """`signals.fuse` members the scoring will write."""
    fuse = signals.get("fuse")
    if not isinstance(fuse, list | tuple):
        return []  # None: default_fusion, always available
    available = {m for m in rankings({"signals": signals, "task": task, "estimators": estimators}) if m != "fused"}
    available.add("self_influence")
    unknown = [m for m in fuse if m not in available]
    if not unknown:
        return []
    why = {"confident": "needs signals.folds >= 2", "hyperinf_cp": "needs signals.checkpoints: true and hyperinf",
           "probe": "needs signals.probe: true and classes", "margin": "needs classes", "aum": "needs classes",
           "similarity": "needs signals.similarity: true", "hyperinf_unit": "needs signals.unit: true and hyperinf",
           "tracin_unit": "needs signals.unit: true and tracin",
           "hyperinf_cover": "needs signals.cover: true and hyperinf",
           "tracin_cover": "needs signals.cover: true and tracin"}
    return [f"signals.fuse: {m!r} is not a ranking this config writes"
            + (f" ({why[m]})" if m in why else f"{did_you_mean(str(m), available)}; available: {sorted(available)}")
            for m in unknown]


def _evaluation_problems(raw: Mapping[str, Any]) -> list[str]:
    evaluation, targets = raw["evaluation"], raw.get("targets")
    problems = []
    target = evaluation.get("target_set")
    if target is not None and isinstance(targets, Mapping) and target not in targets:
        problems.append(_unknown_target("evaluation.target_set", target, targets))
    queries = evaluation.get("queries", EvaluationSection.model_fields["queries"].default)
    if raw.get("task") == "causal_lm" and isinstance(queries, list | tuple):
        needs = [q for q in queries if q in LABEL_QUERIES]
        if needs:
            problems.append(f"evaluation.queries: {needs} read label suggestions, which need classes (task "
                            "causal_lm has none): use drop_harmful or top_fraction")
    methods = evaluation.get("methods")
    if isinstance(methods, list | tuple):
        written = rankings(raw)
        unknown = [m for m in methods if m not in written]
        if unknown:
            problems.append(f"evaluation.methods: {unknown} are not rankings this config writes {sorted(written)} "
                            "(a candidate needs the ranking's scores)")
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


def _curation_problems(raw: Mapping[str, Any]) -> list[str]:
    curation = raw["curation"]
    default = default_curation(raw.get("task"))
    if "params" in curation and "query" not in curation:
        return [f"curation.query: required with curation.params (the default curation is {default['query']} "
                f"with {default['params'] or 'the default target set and method'}): name the query the params "
                "are for"]
    info = curation_queries().get(curation.get("query", default["query"]))
    params = curation.get("params", {})
    if info is None or not isinstance(params, Mapping):
        return []  # the field check reports an unknown query or a malformed params mapping
    problems = []
    if raw.get("task") == "causal_lm" and info.name in LABEL_QUERIES:
        problems.append(f"curation.query: {info.name!r} reads label suggestions, which need classes (task causal_lm "
                        "has none): use drop_harmful or top_fraction")
    targets = raw.get("targets")
    # Target set SELF_TARGET holds the target-free rankings: self-influence and the signals.
    targets = [*targets, SELF_TARGET] if isinstance(targets, Mapping) else None
    written = rankings(raw)
    on_self = params.get("target_set") == SELF_TARGET
    for key, value in params.items():
        where = f"curation.params.{key}"
        if isinstance(value, float) and not math.isfinite(value):
            continue  # CurationSection reports it, once
        if key not in info.params:
            problems.append(f"{where}: query {info.name!r} takes no such parameter {list(info.params)}"
                            f"{did_you_mean(key, info.params)}")
        elif key in TARGET_PARAMS and targets is not None and value not in targets:
            problems.append(_unknown_target(where, value, targets))
        elif key == "method":
            problems += _method_problems(where, value, on_self, written)
        elif (problem := query_param_problem(info.name, key, value)) is not None:
            problems.append(f"{where}: {problem}")
    missing = [k for k in info.params if k not in params]
    if missing:
        problems.append(f"curation.params: query {info.name!r} needs {missing}")
    return problems


def _method_problems(where: str, method: Any, on_self: bool, written: Mapping[str, str]) -> list[str]:
    """Whether the ranking `method` exists for the chosen target set (`self`, or a configured one)."""
    if on_self:
        choices = [*SELF_INFLUENCE_METHODS, *(m for m, t in written.items() if t == SELF_TARGET)]
        if method not in choices:
            return [f"{where}: target set {SELF_TARGET!r} holds {choices}, not {method!r}"]
        return []
    if written.get(method) == SELF_TARGET:
        return [f"{where}: {method!r} ranks without a target set: it is stored under target set {SELF_TARGET!r} "
                f"(set curation.params.target_set: {SELF_TARGET})"]
    if method not in written:
        choices = [m for m, t in written.items() if t == "*"]
        return [f"{where}: {method!r} is not a ranking this config writes for a target set {choices}"
                f"{did_you_mean(str(method), choices)}"]
    return []


def _unknown_target(where: str, value: Any, targets: Collection[str]) -> str:
    return f"{where}: {value!r} is not a configured target set {sorted(targets)}{did_you_mean(str(value), targets)}"
