"""The sections of the YAML configuration (`config.py` composes them into `HyperinfConfig`) and the checks a
section makes on its own: paths resolved against the config file's folder and checked to exist, `where:`
predicates parsed by DuckDB, curation queries known to `sql/`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StrictBool, ValidationInfo, field_validator, model_validator

from hyperinf_ops.config.problems import did_you_mean
from hyperinf_ops.location import Location, is_object_store
from hyperinf_ops.settings import Settings

__all__ = [
    "DEFAULT_CAUSAL_CURATION",
    "DEFAULT_CURATION",
    "DROP_ISSUES_MAX_FRACTION",
    "AdapterSection",
    "ConfigPath",
    "CurationSection",
    "DataSection",
    "EvaluationSection",
    "RetentionSection",
    "StorageRoot",
    "TargetSection",
    "TestFile",
    "curation_queries",
    "default_curation",
    "resolve_config_path",
    "resolve_storage_root",
    "where_predicate_problem",
]


def resolve_config_path(value: Any, info: ValidationInfo) -> Any:
    """A config path relative to the config file's folder (validation context `base_dir`)."""
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        return value  # the Path type check reports it
    if not value.strip():
        # '' would resolve to the config's folder (or, for storage_root, write tables under the filesystem root)
        raise ValueError("must not be empty: give a path relative to the config file's folder, or an absolute one")
    if is_object_store(value):
        raise ValueError("object-store URIs are only supported for storage_root; use a local path")
    base = Path((info.context or {}).get("base_dir") or Path.cwd())
    return (base / Path(value).expanduser()).resolve()


ConfigPath = Annotated[Path, BeforeValidator(resolve_config_path)]


def resolve_storage_root(value: Any, info: ValidationInfo) -> Any:
    """`storage_root`: an `s3://bucket/prefix` URI is kept as given (never resolved as a relative path), anything
    else is a config path (`resolve_config_path`)."""
    if isinstance(value, str) and is_object_store(value):
        return Location(value).uri  # ValueError for another scheme or a URI without a bucket
    return resolve_config_path(value, info)


# A local folder (absolute once loaded) or an `s3://bucket/prefix` string.
StorageRoot = Annotated[Path | str, BeforeValidator(resolve_storage_root)]


def _require_file(path: Path | None) -> Path | None:
    if path is not None and not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file")
    return path


class DataSection(Settings):
    """The candidate pool: one file, or a folder whose .parquet/.csv/.jsonl files are the shards."""

    path: ConfigPath
    text_column: str = "text"
    label_column: str | None = "label"  # causal_lm: optional (None = no label)
    id_column: str | None = None  # None = sample ids are content hashes
    prompt_column: str | None = None  # causal_lm only; defaults to "prompt"
    response_column: str | None = None  # causal_lm only; defaults to "response"

    @property
    def verbatim_columns(self) -> tuple[str, ...]:
        """The columns read as text exactly as written (a CSV id `007` stays `007`, a text `1e3` stays `1e3`)."""
        return tuple(c for c in (self.id_column, self.text_column, self.prompt_column or "prompt",
                                 self.response_column or "response") if c)

    @property
    def integer_columns(self) -> tuple[str, ...]:
        """The columns a CSV gives as integers when every value is written as one (the id and the label)."""
        return tuple(c for c in (self.id_column, self.label_column) if c)

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not path.exists():
            raise ValueError(f"{str(path)!r} does not exist")
        return path


class TargetSection(Settings):
    """One target set: a file with the pool's columns, or a DuckDB predicate selecting pool rows.

    `where` is evaluated over the `examples` table (columns sample_id, text / prompt, response, label, shard
    and every extra pool column); the selected rows stay in the pool, e.g. `label = 'sport'`. It runs in the
    user-SQL sandbox (`query.sandbox`): it cannot read files or load extensions.
    """

    path: ConfigPath | None = None
    where: str | None = None

    _is_file = field_validator("path")(_require_file)

    @field_validator("where")
    @classmethod
    def _parses(cls, where: str | None) -> str | None:
        problem = None if where is None else where_predicate_problem(where)
        if problem:
            raise ValueError(problem)
        return where

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetSection:
        if (self.path is None) == (self.where is None):
            raise ValueError("give exactly one of `path` (a file) or `where` (a SQL predicate over the pool)")
        return self


class AdapterSection(Settings):
    """`path`: a saved peft adapter folder to use instead of warm-up training."""

    path: ConfigPath | None = None

    @field_validator("path")
    @classmethod
    def _is_adapter(cls, path: Path | None) -> Path | None:
        if path is not None and not (path / "adapter_config.json").is_file():
            raise ValueError(f"{str(path)!r} is not a saved peft adapter (no adapter_config.json)")
        return path


Scalar = str | bool | int | float


# The curation a config without a `curation:` block exports (docs/results.md, section 7: of the candidates measured
# by benchmarks/bench_curation.py on three datasets, the one an independent downstream model scored above the full
# pool on every one): drop as many examples as cleanlab counts label issues (at most DROP_ISSUES_MAX_FRACTION of
# the pool), the most harmful by the first estimator's influence on the first target set (HyperINF by default).
# A causal LM has no label to judge: the
# top 20% by the first estimator's cover ranking (`hyperinf_cover`; section 8: the cover ranking had the lowest test
# loss of the rankings on both LLM tasks measured, below the full pool, random subsets and the embedding-similarity
# baseline). 20%, not LESS's 5%, because the user's training recipe is unknown (section 8 (f)): the cover 20% beat
# the full pool in every seed of every (task, recipe) run, one epoch and LESS's four; the 5% lost to it under one
# epoch on the BBC task.
DEFAULT_CURATION: dict[str, Any] = {"query": "drop_issues", "params": {}}
# drop_issues drops at most this share of the pool (`max_fraction`, filled in when the query takes it). cleanlab
# counts on the warm-up's own probabilities: on the measured pools (20% flips) it found 12-22% (docs/results.md,
# section 7), but a weak warm-up's mistakes on a clean pool count as issues too (simulated in-sample probabilities
# of a 2-class warm-up at 58-70% accuracy: 26-41% of clean labels flagged), and the export would lose that share.
DROP_ISSUES_MAX_FRACTION = 0.25
DEFAULT_CAUSAL_CURATION = {"query": "top_fraction", "params": {"fraction": 0.2}}


def default_curation(task: Any) -> dict[str, Any]:
    """The curation of a config without a `curation:` block, for its task."""
    return DEFAULT_CAUSAL_CURATION if task == "causal_lm" else DEFAULT_CURATION


class CurationSection(Settings):
    """Which `sql/<query>.sql` selects the curated subset, and its DuckDB parameters; or, with `method: auto`,
    the candidate the evaluation measured best on its validation half (stages/evaluation.py).

    `method`: `auto` or `fixed` (the query and params as given); None = `auto` when the config has an
    `evaluation:` block, else `fixed`. `target_set` and `method` params default to the first target set and the
    first estimator (`self` for a target-free ranking; a causal LM with `signals.cover`: the estimator's cover
    ranking). `require_warmup`: export only when the warm-up adapter
    learned (its `warmup_learns` check); otherwise the run fails with the reason and the previous export stays."""

    method: Literal["auto", "fixed"] | None = None
    query: str = DEFAULT_CURATION["query"]
    params: dict[str, Scalar] = Field(default_factory=lambda: dict(DEFAULT_CURATION["params"]))
    require_warmup: bool = True

    @field_validator("params", mode="before")
    @classmethod
    def _finite_numbers(cls, params: Any) -> Any:
        # one problem for `fraction: .nan`, not one per member of the Scalar union
        if isinstance(params, Mapping):
            for key, value in params.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{key}: must be a finite number, got {value}")
        return params

    @field_validator("query")
    @classmethod
    def _known_query(cls, query: str) -> str:
        queries = curation_queries()
        if query not in queries:
            raise ValueError(f"no query {query!r}{did_you_mean(query, queries)}; available: {sorted(queries)}")
        return query


class RetentionSection(Settings):
    """What the end of each refresh keeps (hyperinf_ops/retention.py; docs/tables.md, "Retention").

    keep_hours: Lance versions younger than this survive cleanup (the latest version, and every version an export
    manifest under `<storage_root>/exports/` names, always do). keep_exports: replaced exports kept under
    `exports/<query>.history/` (0: the latest only)."""

    keep_hours: float = Field(24.0, ge=0)
    keep_exports: int = Field(5, ge=0)


class TestFile(Settings):
    """A labelled file with the pool's columns, never trained on nor scored."""

    path: ConfigPath

    _is_file = field_validator("path")(_require_file)


class EvaluationSection(Settings):
    """Does curation help, and which? Fresh adapters fine-tuned with the warm-up recipe (`train`, `lora`) on every
    candidate curation, on random subsets of the same sizes (one per seed), on the whole pool and on the pool
    without its planted flips (the oracle, when it has a `flipped` column), each evaluated on both halves of
    `test`: `validation` of it to choose on (`curation.method: auto`), the rest to report. Candidates: every
    query of `queries` over every ranking of `methods` with every `fractions` value as its `$fraction`
    (drop_harmful: the share dropped; relabel: the share of the most harmful considered, 1 = every example whose
    suggested label differs; top_fraction: the share kept, class-balanced with `balance: true`, both with
    `[false, true]`; drop_issues takes none: it drops as many as cleanlab finds label issues, at most
    DROP_ISSUES_MAX_FRACTION of the pool).
    Every fit is repeated for `seeds` training seeds (train.seed, train.seed + 1, ...). `methods` default to
    the curation's default ranking (the first estimator; a causal LM's cover ranking) and `fused`,
    `target_set` to the curation's; `balance` to true for a classifier, false for a causal LM. `subset_epochs`:
    the epochs of the curated and random subsets' fits (None: the warm-up's `train.epochs`); the full pool and
    the oracle keep the warm-up's. LESS trains its selected 5% for 4 epochs: under a one-epoch warm-up recipe a
    5% subset gets a twentieth of the full pool's optimizer steps, and its fits differ more by training seed than
    by ranking."""

    test: TestFile
    queries: tuple[Literal["drop_harmful", "drop_issues", "relabel", "top_fraction"], ...] = Field(
        ("drop_issues", "relabel"), strict=False, min_length=1)
    fractions: tuple[Annotated[float, Field(gt=0, le=1)], ...] = Field((0.2,), strict=False, min_length=1)
    seeds: int = Field(2, ge=1)
    methods: tuple[str, ...] | None = Field(None, strict=False, min_length=1)
    target_set: str | None = None
    balance: bool | Annotated[tuple[StrictBool, ...], Field(strict=False, min_length=1)] = True
    full: bool = True
    validation: float = Field(0.5, gt=0, lt=1)
    subset_epochs: int | None = Field(None, ge=1)

    @property
    def balance_variants(self) -> tuple[bool, ...]:
        """The top_fraction variants to fit: `balance: [false, true]` compares both."""
        return tuple(dict.fromkeys(self.balance)) if isinstance(self.balance, tuple) else (self.balance,)


def curation_queries() -> dict[str, Any]:
    """The curation queries of sql/ (name -> QueryInfo), without the internal export join."""
    from hyperinf_ops.sql_files import EXPORT_QUERY, list_queries

    return {name: q for name, q in list_queries().items() if name != EXPORT_QUERY}


def where_predicate_problem(predicate: str) -> str | None:
    """Why `predicate` is not a single SQL boolean expression (parsed by DuckDB, not executed), or None."""
    import duckdb

    if not predicate.strip():
        return "empty predicate"
    try:
        statements = duckdb.connect().extract_statements(f"SELECT * FROM examples WHERE ({predicate})")
    except duckdb.Error as err:
        return f"does not parse as a SQL predicate: {str(err).splitlines()[0]}"
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        return "must be one boolean expression, not several statements"
    return None
