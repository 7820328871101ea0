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


def histogram_markdown(values: Sequence[float], *, title: str, bins: int = 30) -> dg.MetadataValue:
    """A PNG histogram embedded in Markdown (renders in the Dagster UI's metadata panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [v for v in values if math.isfinite(v)]
    fig, ax = plt.subplots(figsize=(6, 2.6), dpi=90)
    ax.hist(finite, bins=bins, color="#4f43dd")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("score (higher = more helpful to the target set)", fontsize=8)
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
