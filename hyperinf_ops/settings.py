"""The small settings objects core functions take, and every set of choices, defined once.

The YAML config (`config.py`) is composed of these; a core function receives only the ones it needs (the
warm-up takes `TrainSettings`, the model loader a `ModelSpec` and `LoraSettings`, the solvers
`EstimatorOptions`), never the whole configuration. All are frozen pydantic models validated strictly:
a string is never silently read as a number, NaN and inf are refused, unknown keys are errors.

This module imports neither torch nor transformers, so light entry points (`hyperinf sql`, config checks)
stay light.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "BUNDLED_MODELS",
    "CompressionSpec",
    "DEFAULT_COMPRESSION",
    "ROW_BUDGET",
    "STATE_BUDGET",
    "UNIT_RANKINGS",
    "COVER_RANKINGS",
    "cover_on",
    "METHODS",
    "PIPELINE_METHODS",
    "SELF_INFLUENCE_METHODS",
    "SELF_SIGNALS",
    "SELF_TARGET",
    "SIGNALS",
    "TASKS",
    "SignalSettings",
    "EstimatorOptions",
    "GradientSettings",
    "LoraSettings",
    "Method",
    "ModelSpec",
    "PipelineMethod",
    "SolverOptions",
    "StorageDtype",
    "TaskName",
    "TrainSettings",
    "default_fusion",
]

TaskName = Literal["classification", "causal_lm"]
# Every influence method the library implements; `exact_full` needs the (rd x rd) full Fisher, which the
# shard pipeline does not accumulate, so the pipeline offers the others.
Method = Literal["hyperinf", "datainf", "lissa", "tracin", "exact", "exact_full"]
PipelineMethod = Literal["hyperinf", "datainf", "lissa", "tracin", "exact"]
SolverDtype = Literal["float64", "float32"]
StorageDtype = Literal["float32", "float16", "int8", "int4"]
Schedule = Literal["linear", "constant"]
InverseInit = Literal["scaled", "paper"]
# The base model's weights: `auto` = bfloat16 on a CUDA device that supports it, float32 elsewhere (devices.py).
Precision = Literal["auto", "float32", "bfloat16"]
BaseDtype = Literal["float32", "bfloat16"]
# Recompute activations in the backward: `auto` = on from 1024 tokens per example (devices.use_checkpointing).
Checkpointing = bool | Literal["auto"]

TASKS: tuple[str, ...] = get_args(TaskName)
METHODS: tuple[str, ...] = get_args(Method)
PIPELINE_METHODS: tuple[str, ...] = get_args(PipelineMethod)
BUNDLED_MODELS = ("minilm", "smollm2")
# The target set of self-influence scores (score = -sum_l <g_l M_l, g_l>_F of the row itself): reserved, no
# configured target set may take the name.
SELF_TARGET = "self"
# Self-influence rankings every scoring run writes, from the stored preconditioners the preconditioner stage
# always prepares: the GFIM inverse (HyperINF's curvature) and the identity (tracin: the squared gradient norm).
SELF_INFLUENCE_METHODS = ("hyperinf", "tracin")
# Rankings beside influence (signals/, stages/rankings.py): target-free ones are stored under SELF_TARGET,
# `hyperinf_cp` and `fused` under every configured target set.
# `<estimator>_unit`: the estimator's score over the example's gradient norm (signals.unit; LESS's normalisation).
UNIT_RANKINGS = ("hyperinf_unit", "tracin_unit")
# `<estimator>_cover`: each target example's most influential pool examples first (signals.cover; signals/cover.py).
# Written by the influence scan itself (one query per target example), so not among SIGNALS.
COVER_RANKINGS = ("hyperinf_cover", "tracin_cover")
SIGNALS = ("loss", "margin", "aum", "probe", "confident", "hyperinf_cp", "similarity", *UNIT_RANKINGS, "fused")
# The target-free signals, stored under target set SELF_TARGET.
SELF_SIGNALS = ("loss", "margin", "aum", "probe", "confident")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _known_device(value: str) -> str:
    if not DEVICE_PATTERN.match(value):
        raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return value


# `auto` = CUDA when available, else CPU; or a torch device name.
Device = Annotated[str, AfterValidator(_known_device)]


class Settings(BaseModel):
    """Base of every settings model: frozen, strict types, no unknown keys, finite numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelSpec(Settings):
    """Which model, for which loss, how texts are cut, where it runs.

    name: a bundled model (`minilm`, `smollm2`) or an absolute path to a local Hugging Face folder.
    device: `auto` = CUDA when available, else CPU.
    precision: the base weights' dtype, `auto` = bfloat16 on a CUDA device that supports it, float32 elsewhere;
    LoRA weights, the classifier head and per-example gradients stay float32 (a bf16 pass gives other rows:
    it is part of their fingerprint). gradient_checkpointing: recompute each layer's activations in the
    backward (the same gradients, ~1/3 more compute, a fraction of the memory); `auto` = from 1024 tokens.
    """

    name: str = "minilm"
    task: TaskName = "classification"
    max_length: int = Field(128, ge=4)
    device: Device = "auto"
    precision: Precision = "auto"
    gradient_checkpointing: Checkpointing = "auto"


def _no_empty_list(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if value == ():
        raise ValueError("empty list; leave it out (or null) for the default")
    return value


# Bounds past which a value is a typo, not a setting (epochs: 1e23 would train forever; a rank above a model's
# width adds nothing and a rank of 1e9 asks for terabytes).
MAX_EPOCHS = 1000
MAX_BATCH = 65_536
MAX_LORA_RANK = 4096


class LoraSettings(Settings):
    """The LoRA adapter's shape. `modules=None` picks the model's attention query/value projections;
    `gradient_modules` (substrings of parameter names, e.g. ["layer.5."]) selects which LoRA matrices enter
    influence, None = all."""

    rank: int = Field(8, ge=1, le=MAX_LORA_RANK)
    alpha: float = Field(16.0, gt=0)
    modules: tuple[str, ...] | None = Field(None, strict=False)
    dropout: float = Field(0.05, ge=0, lt=1)
    gradient_modules: tuple[str, ...] | None = Field(None, strict=False)

    _check_lists = field_validator("modules", "gradient_modules")(_no_empty_list)


class TrainSettings(Settings):
    """Warm-up fine-tune of the LoRA adapter (and the classifier head, which trains with it). `schedule`: linear
    decay to 0, or constant; a progress line every `log_every` optimizer steps.

    Defaults measured on the bundled tasks (benchmarks/bench_warmup.py, docs/results.md): lr 2e-3, batch 16,
    2 epochs reach 0.84 held-out accuracy on a 200-article BBC News pool where the earlier 3e-4 / 32 reached 0.48
    (majority class 0.20), and on the demo they fit the clean labels without memorising the flipped ones."""

    epochs: int = Field(2, ge=1, le=MAX_EPOCHS)
    lr: float = Field(2.0e-3, gt=0)
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)
    seed: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    schedule: Schedule = "linear"
    log_every: int = Field(20, ge=1)
    # The warm-up is trained again once this share of the examples differs between the pool and what it trained
    # on (new, edited or removed over both): below it, incremental runs keep the adapter and its row codec, and
    # their scores are those of that adapter (equal to a from-scratch run under it), not of a fresh warm-up.
    retrain_share: float = Field(0.5, gt=0, le=1)


class SignalSettings(Settings):
    """The rankings computed beside influence (the YAML `signals`; stages/rankings.py, stages/cross_fit.py).

    probe: `probe` = cleanlab's label quality of 5-fold out-of-fold probabilities of a logistic regression on the
    base model's frozen embeddings (one forward pass of the pool; classification only). folds: `confident` =
    the same from `folds` warm-ups on `folds` folds of the pool (0 = not computed; `folds` warm-ups of cost).
    checkpoints: `hyperinf_cp` = HyperINF summed over the warm-up's epoch checkpoints (one more gradient pass per
    earlier epoch; false = not computed). fuse: the rankings `fused` combines: influence estimators and
    `hyperinf_cp` (per target set), `loss`, `margin`, `aum`, `probe`, `confident`, `self_influence`
    (target-free); None = `default_fusion`. similarity: `similarity` = the cosine of each example's frozen
    base-model embedding to each target set's mean embedding (signals/similarity.py: the baseline a user tries
    before gradients; one forward pass of the pool and the target sets; any task). unit: `hyperinf_unit` and
    `tracin_unit` = the estimator's score divided by the example's stored gradient norm, i.e. the cosine of the
    example's gradient to the preconditioned query, up to the query's norm (LESS's normalisation: raw inner
    products favour examples with large gradients, such as wrong answers and rarely predicted ones; no extra
    pass: the rows store their blocks' squared norms). cover: `hyperinf_cover` and `tracin_cover` = every target
    example's most influential pool examples first, a round robin over the target examples of the unit-normalised
    influence on each (signals/cover.py: LESS's max over subtasks, each target example a subtask; the influence
    scan gets one query per target example, and `target_gradients` keeps every target example's gradient);
    None = on for a causal LM (`cover_on`), off otherwise."""

    probe: bool = True
    similarity: bool = False
    unit: bool = False
    cover: bool | None = None
    folds: int = Field(0, ge=0)
    checkpoints: bool = True
    fuse: tuple[str, ...] | None = Field(None, strict=False, min_length=1)

    @field_validator("folds")
    @classmethod
    def _not_one(cls, folds: int) -> int:
        if folds == 1:
            raise ValueError("one fold leaves nothing out; use 0 (off) or >= 2")
        return folds


def cover_on(cover: bool | None, task: Any) -> bool:
    """`signals.cover` resolved: None = on for a causal LM, where the cover ranking had the lowest test loss of the
    rankings on both tasks measured (docs/results.md, section 8), off for classification (not measured there)."""
    return task == "causal_lm" if cover is None else cover


def default_fusion(estimators: tuple[str, ...] | list[str], checkpoints: bool, probe: bool,
                   classes: bool = True) -> tuple[str, ...]:
    """The members of `fused` when `signals.fuse` is not given: the warm-up's loss, the influence ranking
    (HyperINF over the checkpoints when they are scored, else HyperINF, else the first estimator) and, for tasks
    with classes, the frozen-embedding probe; measured best across datasets in docs/results.md, section 7."""
    influence = ("hyperinf_cp" if checkpoints else "hyperinf") if "hyperinf" in estimators else estimators[0]
    return ("loss", influence, *(("probe",) if probe and classes else ()))


class CompressionSpec(Settings):
    """How a gradient row is stored (the YAML `compression`; docs/compression.md measures each setting).

    sketch_dim: each LoRA matrix's gradient g (r, d) is sketched on its wide side to g P (r, sketch_dim) before
    anything else uses it (0 = raw: the exact gradients); `seed` seeds the sketch and the pilot sample.
    whiten: p > 0 stores each block b as b W, W = U (S + lambda)^-p from the GFIM U S U^T of a pilot sample of
    `pilot_examples` pool examples (a rotation and a scale per direction: lossless by itself, it makes a
    coordinate-wise quantizer equally precise in every direction). dtype: float32, float16 (per-row scale),
    int8 / int4 (per-block scale). row_budget: bytes a stored row may take (0 = no budget); with whitened rows
    (`whiten > 0`) and `sketch_dim = 0`, a model whose unsketched rows would take more gets the widest sketch
    (a multiple of 8) whose rows fit, whitened in the sketch space (`sketch.row_layout`: the width rule, so
    MiniLM keeps unsketched rows and a 4096-wide model is sketched; docs/compression.md, issue 20). row_rank: under
    that rule, rows whose dense unsketched form exceeds the budget are stored as rank-`row_rank` factors of each
    whitened block (row_format.py; 0 = dense rows, as is a rank >= the LoRA rank, which would not shrink them),
    unsketched when they fit, else at the widest sketch that fits.
    state_budget: bytes the codec and curvature state may take under the rule (`sketch.state_bytes`; 0 = none).
    An explicit `sketch_dim`, or `whiten = 0`, is never changed by it: `{whiten: 0, dtype: float32}` is exact raw
    float32.
    The library default is exact (raw float32); the pipeline's default is `DEFAULT_COMPRESSION`."""

    sketch_dim: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    dtype: StorageDtype = "float32"
    whiten: float = Field(0.0, ge=0, le=1)
    pilot_examples: int = Field(512, ge=2)
    row_budget: int = Field(0, ge=0)
    row_rank: int = Field(0, ge=0)
    state_budget: int = Field(0, ge=0)

    @property
    def raw(self) -> bool:
        """No sketch: the blocks are the gradients themselves."""
        return self.sketch_dim == 0

    @property
    def whitened(self) -> bool:
        return self.whiten > 0


# The pipeline's default: half-whitened int4 rows, 8x smaller than raw float32 with every measured ranking's
# mislabel AUROC within 0.002 of raw (docs/compression.md: demo 3 seeds, BBC News).
# Wider models get rank-2 factor rows of at most ROW_BUDGET bytes, sketched where that is needed to fit, with at
# most STATE_BUDGET bytes of codec and curvature state (issue 20: SmolLM2 unsketched, hyperinf Spearman 0.96 against
# raw on the LLM demo where dense rows at k = 128 kept 0.86; Llama-3-8B at k = 424 of 4096); MiniLM's 36,960-byte
# dense rows stay as they are.
ROW_BUDGET = 65536
STATE_BUDGET = 10**9
DEFAULT_COMPRESSION = CompressionSpec(whiten=0.25, dtype="int4", row_budget=ROW_BUDGET, row_rank=2,
                                      state_budget=STATE_BUDGET)


class GradientSettings(Settings):
    """The gradient pass: which LoRA matrices enter influence (substrings of parameter names, None = all),
    examples per forward/backward (`auto`: from the free device memory on CUDA, 32 elsewhere; a batch that runs
    out of device memory is halved and retried), how rows are stored, and the dtype the base weights run in
    (resolved, not `auto`: part of the rows' fingerprint)."""

    modules: tuple[str, ...] | None = Field(None, strict=False)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 32
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    model_dtype: BaseDtype = "float32"


class SolverOptions(Settings):
    """How the preconditioners solve (the YAML `estimator_options`).

    schulz_*: order (2 = Schulz), residual tolerance and step cap of the hyperpower inverse (None = per-dtype
    defaults); init="paper" is reference-code parity (X_0 = paper_alpha I, fixed steps, paper_extra_damping
    added) and usually does not converge. allow_unconverged: keep a non-converged inverse instead of failing
    (paper-parity comparisons only). lissa_iterations: Neumann terms; lissa_scale: s for every matrix (None =
    per matrix ||G + lambda I||_F, which always exceeds lambda_max).
    """

    schulz_order: int = Field(2, ge=2)
    schulz_tol: float | None = Field(None, gt=0)
    schulz_max_iter: int | None = Field(None, ge=1)
    init: InverseInit = "scaled"
    paper_alpha: float = Field(5e-5, gt=0)
    paper_extra_damping: float = Field(0.0, ge=0)
    allow_unconverged: bool = False
    lissa_iterations: int = Field(1000, ge=1)
    lissa_scale: float | None = Field(None, gt=0)


class EstimatorOptions(SolverOptions):
    """One method's complete solver settings: the method, the damping rule and the working dtype.

    damping_ratio: lambda_l = damping_ratio * mean(g_l^2), the one damping rule of every method.
    dtype: working dtype of the hyperinf, lissa and datainf solves (exact and exact_full are always fp64);
    a torch dtype is accepted too.
    """

    method: Method = "hyperinf"
    damping_ratio: float = Field(0.1, gt=0)
    dtype: SolverDtype = "float64"

    def __init__(self, method: str = "hyperinf", damping_ratio: float = 0.1, **options: Any) -> None:
        # The library's positional form EstimatorOptions("exact", 0.1) beside pydantic's keywords.
        super().__init__(method=method, damping_ratio=damping_ratio, **options)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:
        # torch.float64 -> "float64" without importing torch here.
        return str(value).removeprefix("torch.") if type(value).__name__ == "dtype" else value

    @property
    def torch_dtype(self):
        """The working dtype as a torch dtype."""
        import torch

        return getattr(torch, self.dtype)
