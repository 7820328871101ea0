"""The curation queries' parameters a config or `hyperinf sql --param` may give: which name a target set, which read
label suggestions, and the types and ranges of the numeric and flag ones (checked before any work)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, StrictBool, StrictInt, TypeAdapter, ValidationError

__all__ = ["HELP_QUERIES", "LABEL_QUERIES", "TARGET_PARAMS", "query_param_problem"]

# Curation queries that read `label_suggestions` (tasks with classes only).
LABEL_QUERIES = ("relabel", "drop_issues")
# Curation queries that read only the order of the most helpful examples: the ones a cover ranking can drive. The
# others read the sign or the harmful end (conflicts: score > 0 for one set and < 0 for another; drop_harmful,
# relabel, mislabel_candidates: the lowest scores), which a cover ranking, a best percentile in (0, 1], does not have.
HELP_QUERIES = ("top_fraction", "top_k", "class_balanced_top_k")
# Query parameters that name a target set; `target_set` and `method` get defaults when a query takes them.
TARGET_PARAMS = ("target_set", "set_a", "set_b")
# Types and ranges of the curation queries' numeric and flag parameters (by query, else by name), checked with
# the config: a wrong type would fail in DuckDB after the whole run, and an empty subset (top_fraction's
# fraction 0, drop_harmful's fraction 1) would replace the last good export.
_UNIT = Annotated[float, Field(strict=True)]  # a number, not a string DuckDB would refuse late
_PARAM_TYPES: dict[tuple[str | None, str], Any] = {
    ("top_fraction", "fraction"): Annotated[_UNIT, Field(gt=0, le=1)],
    ("drop_harmful", "fraction"): Annotated[_UNIT, Field(ge=0, lt=1)],
    ("relabel", "fraction"): Annotated[_UNIT, Field(gt=0, le=1)],
    ("drop_issues", "max_fraction"): Annotated[_UNIT, Field(gt=0, le=1)],
    (None, "k"): Annotated[StrictInt, Field(ge=1)],
    (None, "n"): Annotated[StrictInt, Field(ge=1)],
    (None, "balance"): StrictBool,
}


def query_param_problem(query: str, key: str, value: Any) -> str | None:
    """Why `value` is not a valid `$key` of `sql/<query>.sql` (type and range: `_PARAM_TYPES`), or None. The config
    checks its curation params with it, and `hyperinf sql --param` too (`n=null` would return every row)."""
    kind = _PARAM_TYPES.get((query, key), _PARAM_TYPES.get((None, key)))
    if kind is None:
        return None
    try:
        TypeAdapter(kind).validate_python(value)
    except ValidationError as err:
        return f"{err.errors()[0]['msg'].lower()}, got {value!r}"
    return None
