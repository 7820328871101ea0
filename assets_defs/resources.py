"""The resource every asset reads: the validated YAML config and the Lance store under its `storage_root`.

`pipelines/` binds it (from `$HYPERINF_CONFIG` in the code location); a run can also set it in run config:
``{"resources": {"hyperinf": {"config": {"config_path": "path/to/hyperinf.yaml"}}}}``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import dagster as dg

from hyperinf_ops.config import HyperinfConfig, load_config
from hyperinf_ops.store import LanceStore

__all__ = ["CONFIG_ENV_VAR", "HyperinfResource"]

CONFIG_ENV_VAR = "HYPERINF_CONFIG"


class HyperinfResource(dg.ConfigurableResource):
    """The hyperinf YAML config (validated on first use) and the Lance store under its ``storage_root``."""

    config_path: str

    @cached_property
    def config(self) -> HyperinfConfig:
        """The parsed config; raises ``ConfigError`` naming every bad key before any work starts."""
        return load_config(Path(self.config_path))

    @cached_property
    def store(self) -> LanceStore:
        """The Lance tables (examples, targets, gradients, curvature, preconditioners, queries, scores)."""
        return LanceStore(str(self.config.storage_root))
