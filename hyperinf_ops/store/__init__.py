"""hyperinf's Lance tables: schemas (`schemas`), exactly-once writes (`transactions`), fingerprints on rows
(`fingerprints`), and the typed readers and writers the pipeline uses (`tables`)."""

from hyperinf_ops.store.schemas import (
    TABLES,
    curvature_schema,
    gradients_schema,
    json_safe,
    queries_schema,
    scores_schema,
    sql_literal,
)
from hyperinf_ops.store.tables import GradientBatch, LanceStore, Query

__all__ = ["TABLES", "GradientBatch", "LanceStore", "Query", "curvature_schema", "gradients_schema", "json_safe",
           "queries_schema", "scores_schema", "sql_literal"]
