"""Turn the core's small step summaries into Dagster metadata a person wants to look at."""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

_TEXT_CHARS = 140


def summary_metadata(summary: Any, *, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Every scalar, path and small mapping field of a step summary dataclass, as metadata values."""
    fields = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else dict(summary)
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in skip or value is None:
            continue
        if isinstance(value, bool):
            out[key] = dg.MetadataValue.bool(value)
        elif isinstance(value, int):
            out[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            out[key] = dg.MetadataValue.float(value) if math.isfinite(value) else dg.MetadataValue.text(str(value))
        elif isinstance(value, Path):
            out[key] = dg.MetadataValue.path(str(value))
        elif isinstance(value, str):
            out[key] = dg.MetadataValue.text(value)
        elif isinstance(value, Mapping | list | tuple):
            out[key] = dg.MetadataValue.json(_jsonable(value))
    return out


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> dg.MetadataValue:
    """A Markdown table (long texts shortened, pipes escaped) for rows such as top/bottom examples."""
    if not rows:
        return dg.MetadataValue.md("_no rows_")
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def table_metadata(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> dg.MetadataValue:
    """A native table (schema + records: sortable, every column shown) for small tables of numbers and labels;
    floats rounded to 4 significant digits, long texts shortened."""
    columns = list(columns or (rows[0].keys() if rows else ()))
    values = [{c: _table_value(row.get(c)) for c in columns} for row in rows]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, _column_type([v[c] for v in values])) for c in columns])
    return dg.MetadataValue.table([dg.TableRecord(v) for v in values], schema=schema)


def _table_value(value: Any) -> str | int | float | bool | None:
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int):
        return value
    return _cell(value)


def _column_type(values: Sequence[Any]) -> str:
    present = {type(v) for v in values if v is not None}
    if present <= {bool} and present:
        return "bool"
    if present <= {int}:
        return "int"
    return "float" if present <= {int, float} else "string"


def histogram_markdown(values: Sequence[float], *, title: str, bins: int = 30) -> dg.MetadataValue:
    """A PNG histogram embedded in Markdown (renders in the Dagster UI's metadata panel)."""
    fig, ax = _figure()
    ax.hist([v for v in values if math.isfinite(v)], bins=bins, color="#4f43dd")
    ax.set_xlabel("score (higher = more helpful to the target set)", fontsize=8)
    return _png_markdown(fig, ax, title)


def lines_markdown(x: Sequence[Any], series: Mapping[str, Sequence[float | None]], *, title: str, xlabel: str,
                   hlines: Mapping[str, float] | None = None) -> dg.MetadataValue:
    """A PNG line plot (one line per series, dashed horizontal reference lines) embedded in Markdown."""
    fig, ax = _figure()
    for name, ys in series.items():
        points = [(xi, y) for xi, y in zip(x, ys, strict=True) if y is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="grey", label=name)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.legend(fontsize=7)
    return _png_markdown(fig, ax, title)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 2.6), dpi=90)


def _png_markdown(fig, ax, title: str) -> dg.MetadataValue:
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    encoded = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= _TEXT_CHARS else text[: _TEXT_CHARS - 1] + "…"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, dg.MetadataValue]:
    """Call ``fn`` and return its result with the wall time as metadata (seconds)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, dg.MetadataValue.float(round(time.perf_counter() - start, 3))
