"""The hyperinf Dagster code location (``pipelines.definitions``) and the ``hyperinf`` command line."""
