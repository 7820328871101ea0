"""Schemas of hyperinf's Lance tables, and how values are encoded in rows and filters.

Table layouts and meanings are documented in docs/tables.md.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # an annotation only: row_format needs torch, and the table readers must not
    from hyperinf_ops.core.row_format import RowFormat

__all__ = ["INPUT_COLUMNS_KEY", "TABLES", "curvature_schema", "example_outputs_schema", "gradients_schema",
           "input_columns", "json_safe", "label_signals_schema", "label_suggestions_schema", "queries_schema",
           "scores_schema", "sql_literal", "stored_texts", "target_gradients_schema", "value_text"]

# Schema metadata of a prepared pool table and of `examples` (data/prepare.py): the input's name and Arrow type of
# each role's column. The label is stored as text; the export gives it its input type back.
INPUT_COLUMNS_KEY = "hyperinf.input_columns"

TABLES = ("examples", "targets", "gradients", "example_outputs", "curvature", "preconditioners", "target_gradients",
          "queries", "label_signals", "scores", "label_suggestions", "evaluation")


def input_columns(schema: pa.Schema) -> dict[str, dict[str, str]]:
    """The input columns a prepared table (or `examples`) was made from, per role (`sample_id`, `text` or
    `prompt` / `response`, `label`): {"name": the input's column name}, with "type" (its Arrow type) for
    `sample_id` and `label`; {} when not recorded (a store written before it was)."""
    recorded = (schema.metadata or {}).get(INPUT_COLUMNS_KEY.encode())
    return json.loads(recorded) if recorded else {}


def value_text(value: Any) -> str:
    """A label or id as the text it is stored as; 3.0 (read from a CSV with gaps, or a float column) is `3`."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def stored_texts(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`values` (labels or ids in any type) as the text the tables store them as (`value_text`), nulls kept."""
    return pa.array([None if v is None else value_text(v) for v in values.to_pylist()], pa.string())


def sql_literal(value: str) -> str:
    """A string as a SQL literal for Lance filters (quotes doubled). Only for keys this module writes."""
    return "'" + str(value).replace("'", "''") + "'"


def json_safe(value: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has no NaN; DuckDB and fine-tuning scripts reject it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def gradients_schema(fmt: RowFormat) -> pa.Schema:
    """grad: fixed_size_list<value type>[stored width] (row_format.py), grad_scale: float32 per row,
    block_scales: float32[G] per quantization group (integer codes only: a block each, or factor groups), sq_norms: float32[L] of the blocks.
    content_hash: the example's content (text + label) the row was computed from; null when the writer did not
    say, and such a row is never reused by content."""
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=True),
        pa.field("grad", pa.list_(fmt.value_type, fmt.stored_width), nullable=False),
        pa.field("grad_scale", pa.float32(), nullable=False),
    ]
    if fmt.integer:
        fields.append(pa.field("block_scales", pa.list_(pa.float32(), len(fmt.groups)), nullable=False))
    return pa.schema([
        *fields,
        pa.field("sq_norms", pa.list_(pa.float32(), len(fmt.blocks)), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
    ])


def curvature_schema() -> pa.Schema:
    """One row per (shard, LoRA matrix): the mergeable GFIM sums of curvature.CurvaturePartial, the
    `content_digest` of the shard's examples the pass covered (what makes the shard current) and `rows_digest`,
    the `content_digest` of the gradient rows summed (null: unknown, the sums are never updated in place)."""
    return pa.schema(
        [
            pa.field("shard", pa.string(), nullable=False),
            pa.field("matrix", pa.string(), nullable=False),
            pa.field("gfim_sum", pa.list_(pa.float64()), nullable=False),
            pa.field("sq_sum", pa.float64(), nullable=False),
            pa.field("count", pa.int64(), nullable=False),
            pa.field("numel", pa.int64(), nullable=False),
            pa.field("d", pa.int32(), nullable=False),
            pa.field("full_sum", pa.list_(pa.float64()), nullable=True),
            pa.field("examples_digest", pa.string(), nullable=False),
            pa.field("rows_digest", pa.string(), nullable=True),
            pa.field("fingerprint", pa.string(), nullable=False),
        ]
    )


def target_gradients_schema() -> pa.Schema:
    """One row per target set: its mean raw gradient v (float64, the matrices' (r, d) blocks flattened in
    sorted name order), the examples averaged, and the `content_digest` of the target rows it was taken over."""
    return pa.schema(
        [
            pa.field("target_set", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float64()), nullable=False),
            pa.field("count", pa.int64(), nullable=False),
            pa.field("content_digest", pa.string(), nullable=False),
            pa.field("fingerprint", pa.string(), nullable=False),
        ]
    )


def queries_schema(dim: int) -> pa.Schema:
    """Preconditioned target vectors laid out like the gradient rows: one per (target_set, method)."""
    return pa.schema(
        [
            pa.field("target_set", pa.string(), nullable=False),
            pa.field("method", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("fingerprint", pa.string(), nullable=False),
            pa.field("diagnostics", pa.string(), nullable=False),
        ]
    )


def scores_schema() -> pa.Schema:
    """score = -I(k): higher = more helpful; rank 1 and percentile 1.0 = most helpful."""
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("target_set", pa.string(), nullable=False),
            pa.field("method", pa.string(), nullable=False),
            pa.field("score", pa.float64(), nullable=False),
            pa.field("rank", pa.int64(), nullable=False),
            pa.field("percentile", pa.float64(), nullable=False),
            pa.field("fingerprint", pa.string(), nullable=False),
            pa.field("gradients_version", pa.int64(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )


def example_outputs_schema() -> pa.Schema:
    """What the gradient pass's forward said about each pool example, one row beside each gradient row (same
    sample_id, shard, content_hash, fingerprint): the task's loss, and for tasks with classes the margin
    z_y - max_{c != y} z_c and the class probabilities (in the adapter's label order; null otherwise)."""
    return pa.schema([
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("loss", pa.float64(), nullable=False),
        pa.field("margin", pa.float64(), nullable=True),
        pa.field("probs", pa.list_(pa.float32()), nullable=True),
        pa.field("fingerprint", pa.string(), nullable=False),
    ])


def label_signals_schema() -> pa.Schema:
    """Pool-wide signals computed beside the gradient pass, one row per (signal, target_set, example): `aum` (the
    warm-up's mean margin), `confident` (cleanlab's label quality of out-of-fold probabilities `probs`, with its
    label-issue flag) and `hyperinf_cp` (HyperINF over the warm-up's earlier checkpoints, per target set; the
    others use target set `self`). value: higher = keep. source: the digest of what made the rows."""
    return pa.schema([
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("signal", pa.string(), nullable=False),
        pa.field("target_set", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("probs", pa.list_(pa.float32()), nullable=True),
        pa.field("issue", pa.bool_(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ])


def label_suggestions_schema() -> pa.Schema:
    """One row per pool example of a task with classes: its given label, the label the evidence suggests and
    that label's probability, and whether the evidence marks the given label as wrong (`issue`). source:
    `cross_fit` (cleanlab on out-of-fold probabilities) or `warmup` (the warm-up adapter's own probabilities
    when no cross-fit ran: an issue there is a confidently predicted other label)."""
    return pa.schema([
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("suggested_label", pa.string(), nullable=False),
        pa.field("suggested_probability", pa.float64(), nullable=False),
        pa.field("issue", pa.bool_(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ])
