"""Nightly refresh: re-ingest the target sets, re-prepare the preconditioners when the curvature changed,
re-score and re-curate, so edited target files (and ``where:`` target sets over a grown pool) reach the subset."""

import dagster as dg

from pipelines.jobs import refresh_job

nightly_refresh = dg.ScheduleDefinition(
    name="nightly_refresh",
    job=refresh_job,
    cron_schedule="0 3 * * *",
    execution_timezone="UTC",
    description="Every night at 03:00 UTC: target sets -> preconditioners -> queries -> scores -> curated subset.",
)
