"""The curation queries (DuckDB, named $parameters), shipped inside the package as `hyperinf_ops.sql`."""
