"""The run loggers of the code location: what a person reads in the terminal while a run works.

``progress`` (what ``hyperinf run`` / ``demo`` use) prints only the steps' own lines (progress with rate and
ETA, warnings, one-line summaries) as ``HH:MM:SS step: message``. Dagster's framework events (step starts,
outputs, and failures with their stack traces) still go to the instance's event log, where the UI shows them;
the CLI then names the failed step in one line and writes the full trace to a log file. ``--verbose`` uses
Dagster's own ``console`` logger at DEBUG instead (every event, traces included).
"""

from __future__ import annotations

import logging
import sys

import dagster as dg
from dagster._core.log_manager import get_log_record_metadata, has_log_record_metadata

__all__ = ["LOGGERS", "progress_logger", "run_config_loggers"]


class _StepLineFormatter(logging.Formatter):
    """``HH:MM:SS step: message`` from the record's Dagster metadata (the step, the original message)."""

    def format(self, record: logging.LogRecord) -> str:
        meta = get_log_record_metadata(record) if has_log_record_metadata(record) else None
        step = (meta.get("step_key") or meta.get("job_name") or "run") if meta else record.name
        message = meta.get("orig_message", record.getMessage()) if meta else record.getMessage()
        return f"{self.formatTime(record, '%H:%M:%S')} {step}: {message}"


def _user_line(record: logging.LogRecord) -> bool:
    """True for a step's own log line; False for a framework event (it carries a DagsterEvent)."""
    return not has_log_record_metadata(record) or get_log_record_metadata(record).get("dagster_event") is None


@dg.logger(config_schema={"log_level": dg.Field(str, default_value="INFO")},
           description="The steps' own lines (progress, warnings, summaries) on stdout; Dagster's events stay "
                       "in the instance's event log.")
def progress_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.Logger("hyperinf", level=init_context.logger_config["log_level"])
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_user_line)
    handler.setFormatter(_StepLineFormatter())
    logger.addHandler(handler)
    return logger


# Dagster's default console logger stays available (UI launches, `--verbose`) next to the quiet one.
LOGGERS = {"console": dg.colored_console_logger, "progress": progress_logger}


def run_config_loggers(verbose: bool) -> dict:
    """The ``loggers`` section of a CLI run's config: the quiet progress lines, or every event."""
    if verbose:
        return {"console": {"config": {"log_level": "DEBUG"}}}
    return {"progress": {"config": {"log_level": "INFO"}}}
