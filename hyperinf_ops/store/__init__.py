"""hyperinf's Lance tables: schemas (`schemas`), exactly-once writes (`transactions`), fingerprints on rows
(`fingerprints`), and the typed readers and writers the pipeline uses (`tables`).

`GradientBatch`, `LanceStore` and `Query` are imported on first use: `tables` needs torch, and a reader of the
tables that only needs `transactions.LanceTables` (`hyperinf sql`, `hyperinf shell`) must not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hyperinf_ops.store.schemas import (
    TABLES,
    curvature_schema,
    example_outputs_schema,
    gradients_schema,
    json_safe,
    label_signals_schema,
    label_suggestions_schema,
    queries_schema,
    scores_schema,
    sql_literal,
)

if TYPE_CHECKING:
    from hyperinf_ops.store.tables import GradientBatch, LanceStore, Query

_LAZY = ("GradientBatch", "LanceStore", "Query")

__all__ = ["TABLES", "GradientBatch", "LanceStore", "Query", "curvature_schema", "example_outputs_schema",
           "gradients_schema", "json_safe", "label_signals_schema", "label_suggestions_schema", "queries_schema",
           "scores_schema", "sql_literal"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("hyperinf_ops.store.tables"), name)
    raise AttributeError(f"module 'hyperinf_ops.store' has no attribute {name!r}")
