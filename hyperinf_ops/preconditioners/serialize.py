"""A Prepared as an Arrow table, one row per LoRA matrix, and a stable key for its options.

Columns: key (caller's lookup key, e.g. curvature digest + fingerprint + options_key), method, matrix,
r, d (int32), damping (float64), operator (list<float64>, the stored matrix row-major, null where the
method stores none), diagnostics (JSON of MatrixDiagnostics), options (JSON of EstimatorOptions, dtype
by name). Operators round-trip bitwise; JSON floats are written by repr, so they round-trip exactly too
(NaN and Infinity as Python's json writes them).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import torch

from hyperinf_ops.preconditioners.base import MatrixDiagnostics, Prepared
from hyperinf_ops.preconditioners.options import EstimatorOptions

__all__ = ["PREPARED_SCHEMA", "options_key", "prepared_from_table", "prepared_to_table"]

PREPARED_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("matrix", pa.string(), nullable=False),
        pa.field("r", pa.int32(), nullable=False),
        pa.field("d", pa.int32(), nullable=False),
        pa.field("damping", pa.float64(), nullable=False),
        pa.field("operator", pa.list_(pa.float64()), nullable=True),
        pa.field("diagnostics", pa.string(), nullable=False),
        pa.field("options", pa.string(), nullable=False),
    ]
)


def _options_json(options: EstimatorOptions) -> str:
    return json.dumps(options.model_dump(), sort_keys=True, separators=(",", ":"))


def options_key(options: EstimatorOptions) -> str:
    """First 16 hex digits of the sha256 of the options' canonical JSON (method included): stable across
    processes and machines, different whenever any option differs."""
    return hashlib.sha256(_options_json(options).encode()).hexdigest()[:16]


def prepared_to_table(prepared: Prepared, key: str) -> pa.Table:
    """One row per LoRA matrix (sorted), schema PREPARED_SCHEMA."""
    names = list(prepared.shapes)
    operators = [prepared.operators[n] for n in names]
    options = _options_json(prepared.options)
    return pa.table(
        {
            "key": [key] * len(names),
            "method": [prepared.method] * len(names),
            "matrix": names,
            "r": [prepared.shapes[n][0] for n in names],
            "d": [prepared.shapes[n][1] for n in names],
            "damping": [prepared.damping[n] for n in names],
            "operator": [
                None if op is None else op.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
                for op in operators
            ],
            "diagnostics": [json.dumps(prepared.diagnostics[n].to_dict(), sort_keys=True) for n in names],
            "options": [options] * len(names),
        },
        schema=PREPARED_SCHEMA,
    )


def prepared_from_table(table: pa.Table) -> Prepared:
    """The Prepared stored in `table` (the rows of one key; operators on the CPU). ValueError if the rows
    mix keys, methods or options, or an operator is not square."""
    if table.num_rows == 0:
        raise ValueError("prepared table has no rows")
    for column in ("key", "method", "options"):
        values = set(table.column(column).to_pylist())
        if len(values) != 1:
            raise ValueError(f"prepared table mixes {column}s {sorted(values)}: select the rows of one key")
    options = EstimatorOptions.model_validate(json.loads(table.column("options")[0].as_py()))
    names = table.column("matrix").to_pylist()
    rs, ds = table.column("r").to_pylist(), table.column("d").to_pylist()
    damping = table.column("damping").to_pylist()
    diagnostics = table.column("diagnostics").to_pylist()
    column = table.column("operator")
    order = sorted(range(len(names)), key=names.__getitem__)
    operators = {}
    for i in order:
        cell = column[i]
        operators[names[i]] = (
            None if not cell.is_valid else _square(names[i], cell.values.to_numpy(zero_copy_only=False))
        )
    return Prepared(
        method=table.column("method")[0].as_py(),
        options=options,
        shapes={names[i]: (rs[i], ds[i]) for i in order},
        damping={names[i]: damping[i] for i in order},
        operators=operators,
        diagnostics={names[i]: MatrixDiagnostics.from_dict(json.loads(diagnostics[i])) for i in order},
    )


def _square(name: str, flat: np.ndarray) -> torch.Tensor:
    m = math.isqrt(flat.size)
    if m * m != flat.size:
        raise ValueError(f"operator of {name!r} has {flat.size} entries: not a square matrix")
    return torch.from_numpy(flat.astype(np.float64, copy=True)).reshape(m, m)
