"""The project's Dagster instance: where ``DAGSTER_HOME`` is and what it holds (dagster.yaml)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg

DAGSTER_YAML_TEMPLATE = Path(__file__).with_name("dagster.yaml")
WORKSPACE_YAML = Path(__file__).with_name("workspace.yaml")
LOCATION_NAME = "hyperinf"


def dagster_home_for(config_path: Path, explicit: str | os.PathLike | None = None) -> Path:
    """``explicit``, else ``$DAGSTER_HOME``, else ``<config folder>/.dagster_home``: a config and its runs
    stay together, so ``hyperinf ui --config FILE`` shows what ``hyperinf run --config FILE`` did."""
    home = explicit or os.environ.get("DAGSTER_HOME") or Path(config_path).resolve().parent / ".dagster_home"
    return Path(home).resolve()


def prepare_dagster_home(home: Path) -> Path:
    """Create ``home`` with the project's dagster.yaml (an existing one is kept) and return it."""
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists():
        shutil.copyfile(DAGSTER_YAML_TEMPLATE, target)
    return home


def open_instance(home: Path) -> dg.DagsterInstance:
    """The persistent instance in ``home`` (what ``DAGSTER_HOME=home`` gives the UI and ``dagster`` CLI)."""
    return dg.DagsterInstance.from_config(str(prepare_dagster_home(home)))
