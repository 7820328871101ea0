"""The config checks and defaults that relate two sections: data columns vs task, curation and evaluation
parameters vs target sets and estimators, the rankings a config's scoring writes. They read the raw mapping (with
`with_defaults` applied), so `load_config` reports them together with the field errors of the pydantic models."""

from __future__ import annotations

import math
import typing
from collections.abc import Collection, Mapping
from typing import Any

from hyperinf_ops.config.problems import did_you_mean
from hyperinf_ops.config.query_params import HELP_QUERIES, LABEL_QUERIES, TARGET_PARAMS, query_param_problem
from hyperinf_ops.config.sections import (
    DROP_ISSUES_MAX_FRACTION,
    DataSection,
    EvaluationSection,
    curation_queries,
    default_curation,
)
from hyperinf_ops.settings import (
    COVER_RANKINGS,
    DEFAULT_COMPRESSION,
    SELF_INFLUENCE_METHODS,
    SELF_SIGNALS,
    SELF_TARGET,
    SignalSettings,
    TaskName,
    cover_on,
)

__all__ = ["DEFAULT_ESTIMATORS", "cross_section_problems", "default_method", "rankings", "with_defaults"]

# The influence estimators a config without `estimators:` scores with (the first one ranks the curation).
DEFAULT_ESTIMATORS = ("hyperinf", "datainf", "tracin")


def with_defaults(raw: Any) -> Any:
    """The raw mapping with the defaults that depend on other keys: causal_lm reads `prompt` / `response`
    columns and needs no label; the curation query's `target_set` / `method` default to the first target
    set / estimator (`default_method`: a causal LM's cover ranking), its `balance` to class-balanced for a
    classifier and unbalanced for a causal LM (so does the evaluation's); a `compression` mapping overrides
    DEFAULT_COMPRESSION key by key (`{sketch_dim: 48}` keeps the default whitening and int4 codes;
    `{whiten: 0, dtype: float32}` stores exact rows)."""
    if not isinstance(raw, Mapping):
        return raw
    raw = dict(raw)
    if isinstance(raw.get("compression"), Mapping):
        raw["compression"] = {**DEFAULT_COMPRESSION.model_dump(), **raw["compression"]}
    data = raw.get("data")
    if raw.get("task") == "causal_lm" and isinstance(data, Mapping):
        raw["data"] = {"prompt_column": "prompt", "response_column": "response", "label_column": None, **data}
    if raw.get("task") == "causal_lm" and isinstance(raw.get("evaluation"), Mapping):
        raw["evaluation"] = {"balance": False, **raw["evaluation"]}  # as the curation's default (_curation_with_defaults)
    if "curation" in raw or "targets" in raw:
        raw["curation"] = _curation_with_defaults(raw)
    return raw


def _curation_with_defaults(raw: Mapping[str, Any]) -> Any:
    """The curation mapping with `target_set` / `method` filled in when its query takes them."""
    curation = raw.get("curation", {})
    targets, estimators = raw.get("targets"), raw.get("estimators", DEFAULT_ESTIMATORS)
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
    causal = raw.get("task") == "causal_lm"
    # Class-balanced by default for a classifier: measured better than the plain top fraction (docs/results.md,
    # section 2). A causal LM's label is metadata (a source or a topic): balancing by it would keep every source's
    # share, i.e. undo the selection; its measured export is unbalanced (section 8).
    defaults = {"target_set": next(iter(targets)), "method": default_method(raw, query), "balance": not causal,
                "max_fraction": DROP_ISSUES_MAX_FRACTION}
    if isinstance(params.get("method"), str) and params["method"] in SELF_SIGNALS:
        defaults["target_set"] = SELF_TARGET  # target-free rankings are stored under target set `self`
    return {**curation, "query": query,
            "params": {**{k: v for k, v in defaults.items() if k in info.params}, **params}}


def default_method(raw: Mapping[str, Any], query: str | None = None) -> str:
    """The ranking a curation or an evaluation reads when none is named: the first estimator, or its cover ranking
    for a causal LM with `signals.cover` (lowest test loss on both LLM tasks measured, docs/results.md section 8)
    when `query` (None: a top fraction) reads only the most helpful end (HELP_QUERIES)."""
    estimators = raw.get("estimators") or DEFAULT_ESTIMATORS
    method = str(estimators[0])
    signals = raw.get("signals") if isinstance(raw.get("signals"), Mapping) else {}
    if (raw.get("task") == "causal_lm" and method in ("hyperinf", "tracin") and (query is None or query in HELP_QUERIES)
            and cover_on(signals.get("cover"), "causal_lm")):
        return f"{method}_cover"
    return method


def cross_section_problems(raw: Mapping[str, Any]) -> list[str]:
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
    estimators = raw.get("estimators") or DEFAULT_ESTIMATORS
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
            if value in COVER_RANKINGS and info.name not in HELP_QUERIES:
                problems.append(f"{where}: {value!r} ranks by a best percentile in (0, 1], with no sign and no harmful "
                                f"end, which query {info.name!r} reads: use method: {value.removesuffix('_cover')} "
                                f"(the cover rankings drive {', '.join(HELP_QUERIES)})")
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
