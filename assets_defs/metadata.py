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
import numpy as np
import pyarrow as pa

# A table cell stays one line: the UI neither wraps nor cuts a wide table, it scrolls sideways.
_TEXT_CHARS = 80
_ID_CHARS = 12


def summary_metadata(summary: Any, *, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Every scalar, path and small mapping field of a step summary dataclass, as metadata values (floats to 4
    significant digits: what a person reads, and still what the UI plots over runs)."""
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
            out[key] = dg.MetadataValue.float(float(f"{value:.4g}")) if math.isfinite(value) else \
                dg.MetadataValue.text(str(value))
        elif isinstance(value, Path):
            out[key] = dg.MetadataValue.path(str(value))
        elif isinstance(value, str):
            out[key] = dg.MetadataValue.text(value)
        elif isinstance(value, Mapping | list | tuple):
            out[key] = dg.MetadataValue.json(_jsonable(value))
    return out


def table_metadata(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
                   ids: Sequence[str] = ("sample_id",)) -> dg.MetadataValue:
    """A native table (schema + records), which the UI shows inline with every column, for small tables of
    numbers, labels and examples: columns default to every key in order of first appearance, floats are
    rounded to 4 significant digits, texts shortened to one line, and the `ids` columns get `short_id`."""
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    values = [{c: short_id(row.get(c)) if c in ids else _table_value(row.get(c)) for c in columns} for row in rows]
    schema = dg.TableSchema(columns=[dg.TableColumn(c, _column_type([v[c] for v in values])) for c in columns])
    return dg.MetadataValue.table([dg.TableRecord(v) for v in values], schema=schema)


def short_id(value: Any) -> str | None:
    """A sample id fit for a table cell: a hash id (the content-hash fallback) cut to its first 12 hex
    characters, still enough to find the row (`WHERE sample_id LIKE '<short>%'`); a readable id kept."""
    if value is None:
        return None
    text = str(value)
    hashed = len(text) > _ID_CHARS and all(c in "0123456789abcdef" for c in text)
    return text[:_ID_CHARS] if hashed else _cell(text)


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    """The `dagster/column_schema` of a stored table: its columns with their Arrow types."""
    return dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in schema])


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


def histogram_markdown(values: Sequence[float], *, title: str, bins: int = 40) -> dg.MetadataValue:
    """A score histogram short enough to show inline (the UI puts Markdown of 1000 characters or more behind
    a link, and a matplotlib PNG is always longer): bars only, in a 2-bit palette PNG, bins below zero
    (harmful) red, with the range and the negative share as text under it."""
    from PIL import Image, ImageDraw

    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return dg.MetadataValue.md(f"**{title}**: no finite scores")
    counts, edges = np.histogram(finite, bins=bins)
    step, height = 8, 72  # pixels per bin (6 of bar, 2 of gap) and in all
    image = Image.new("P", (step * bins, height), 0)
    image.putpalette([255, 255, 255, 79, 67, 221, 214, 64, 64])  # background, helpful (>= 0), harmful (< 0)
    draw = ImageDraw.Draw(image)
    for i, count in enumerate(counts):
        if count:
            top = height - 1 - round((height - 2) * count / counts.max())
            draw.rectangle((step * i, top, step * i + step - 3, height - 1), fill=2 if edges[i + 1] <= 0 else 1)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True, bits=2)
    encoded = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(
        f"![{title}](data:image/png;base64,{encoded})\n\n**{title}**: {finite.size} scores from "
        f"{finite.min():.3g} to {finite.max():.3g}, {(finite < 0).mean():.0%} below 0 (red: harmful)")


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
    text = " ".join(text.split())
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
