"""The one YAML configuration file, validated in full before any work starts.

`load_config(path_or_mapping)` validates every key (pydantic models: the sections of `sections.py` and the
settings of `settings.py`), then the checks that relate two sections (`cross_section.py`: data columns vs task,
curation and evaluation parameters vs target sets and estimators), and raises one `ConfigError` listing *every*
problem as `key: message`, with a did-you-mean for misspelled keys and choices, so a user fixes the file in one
round. Relative paths (data, targets, storage root, adapter, a model folder) resolve against the config file's
folder (or `base_dir` for a mapping), so a config means the same thing from any cwd. `cfg.to_dict()` gives back
a mapping that `load_config` turns into an equal config.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
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

from hyperinf_ops.config.cross_section import (
    DEFAULT_ESTIMATORS,
    cross_section_problems,
    default_method,
    rankings,
    with_defaults,
)
from hyperinf_ops.config.problems import did_you_mean, problem_text, renamed_key_problems
from hyperinf_ops.config.query_params import HELP_QUERIES, TARGET_PARAMS, query_param_problem
from hyperinf_ops.config.sections import (
    DROP_ISSUES_MAX_FRACTION,
    AdapterSection,
    CurationSection,
    DataSection,
    EvaluationSection,
    RetentionSection,
    StorageRoot,
    TargetSection,
    resolve_config_path,
)
from hyperinf_ops.config.strict_yaml import read_yaml
from hyperinf_ops.errors import ConfigError
from hyperinf_ops.settings import (
    BUNDLED_MODELS,
    COVER_RANKINGS,
    DEFAULT_COMPRESSION,
    SELF_INFLUENCE_METHODS,
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
    "TARGET_PARAMS",
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
    estimators: tuple[PipelineMethod, ...] = Field(DEFAULT_ESTIMATORS, strict=False, min_length=1)
    damping_ratio: float = Field(0.1, gt=0, le=MAX_DAMPING_RATIO)
    estimator_options: SolverOptions = Field(default_factory=SolverOptions)
    # How gradient rows are stored: half-whitened int4 codes by default (8x smaller than exact float32 rows), and for
    # models whose rows would pass `row_budget` (64 KB) rank-2 factors of each whitened block, sketched to the widest
    # width that fits where needed, whitened in the sketch space (the width rule: sketch.row_layout);
    # docs/compression.md has what each setting costs in quality and bytes.
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
        (x class-balance variant for top_fraction; a cover ranking only with the queries that read the most helpful
        end); empty without an `evaluation:` block."""
        from hyperinf_ops.stages.evaluation_plan import WITHOUT_FRACTION, Candidate

        ev = self.evaluation
        if ev is None:
            return ()
        raw = self.to_dict()
        written = rankings(raw)
        # drop_issues candidates are measured with the cap of a drop_issues curation
        own = self.curation.params if self.curation.query == "drop_issues" else {}
        cap = float(own.get("max_fraction", DROP_ISSUES_MAX_FRACTION))
        candidates = (
            Candidate(query=q, method=m, fraction=None if q in WITHOUT_FRACTION else f, balance=b,
                      target_set=SELF_TARGET if written.get(m) == SELF_TARGET else self.evaluation_target,
                      max_fraction=cap)
            for q in ev.queries for m in ev.methods or (default_method(raw, q), "fused")
            if m not in COVER_RANKINGS or q in HELP_QUERIES  # a cover ranking has no harmful end to drop
            for f in ev.fractions for b in (ev.balance_variants if q == "top_fraction" else (False,)))
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
    problems += cross_section_problems(with_defaults(raw))
    if problems:
        error = ConfigError(f"{where}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
        error.problems = problems  # type: ignore[attr-defined]
        raise error
    return cfg
