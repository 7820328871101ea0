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
    """Values per x as text, with a sparkline PNG of the first three series when both fit inline (the UI puts
    Markdown of INLINE_LIMIT characters or more behind a link, as histogram_markdown says): the series share one
    y range with the reference values `hlines` (drawn grey), x evenly spaced; one x gives the text alone."""
    from PIL import Image, ImageDraw

    drawn = list(series.items())[:len(_LINE_COLOURS)]
    values = [y for _, ys in drawn for y in ys if y is not None and math.isfinite(y)] + list((hlines or {}).values())
    image = len(x) > 1 and bool(values)

    def text(with_colours: bool) -> str:
        lines = [f"**{title}** ({xlabel}: {' / '.join(map(_short, x))})"]
        for i, (name, ys) in enumerate(series.items()):
            colour = f" ({_LINE_COLOUR_NAMES[i]})" if with_colours and i < len(drawn) else ""
            lines.append(f"- {name}{colour}: {' / '.join('-' if y is None else _short(y) for y in ys)}")
        lines += [f"- {name}{' (grey)' if with_colours else ''}: {_short(y)}" for name, y in (hlines or {}).items()]
        return "\n".join(lines)

    if not image:
        return dg.MetadataValue.md(text(False))
    low, span = min(values), (max(values) - min(values)) or 1.0
    width, height, pad = 24 * (len(x) - 1) + 8, 40, 4
    canvas = Image.new("P", (width, height), 0)
    canvas.putpalette([255, 255, 255, *[c for rgb in _LINE_COLOURS for c in rgb], 160, 160, 160])
    draw = ImageDraw.Draw(canvas)

    def at(i: int, y: float) -> tuple[float, float]:
        return pad + i * (width - 2 * pad) / (len(x) - 1), height - pad - (y - low) / span * (height - 2 * pad)

    for y in (hlines or {}).values():
        draw.line([at(0, y), at(len(x) - 1, y)], fill=len(_LINE_COLOURS) + 1)
    for colour, (_, ys) in enumerate(drawn, 1):
        points = [at(i, y) for i, y in enumerate(ys) if y is not None and math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.rectangle((px - 1, py - 1, px + 1, py + 1), fill=colour)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True, bits=4)
    markdown = f"![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})\n\n{text(True)}"
    return dg.MetadataValue.md(markdown if len(markdown) < INLINE_LIMIT else text(False))


INLINE_LIMIT = 1000  # characters of Markdown the UI shows inline
_LINE_COLOURS = [(79, 67, 221), (214, 64, 64), (46, 160, 67)]
_LINE_COLOUR_NAMES = ["blue", "red", "green"]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


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
