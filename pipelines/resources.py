"""Resources: the validated YAML config and the Lance store it points at.

The config reaches Dagster as a resource, so every entry point shares it: the code location reads the path
from the ``HYPERINF_CONFIG`` environment variable (``hyperinf ui``/``hyperinf run`` set it), and
``dagster asset materialize`` / ``dg launch`` accept the same variable or run config::

    {"resources": {"hyperinf": {"config": {"config_path": "path/to/hyperinf.yaml"}}}}
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import dagster as dg

from hyperinf_ops.config import HyperinfConfig, load_config
from hyperinf_ops.store import LanceStore

CONFIG_ENV_VAR = "HYPERINF_CONFIG"


class HyperinfConfigResource(dg.ConfigurableResource):
    """The hyperinf YAML config (validated on first use) and the Lance store under its ``storage_root``."""

    config_path: str

    @cached_property
    def config(self) -> HyperinfConfig:
        """The parsed config; raises ``ConfigError`` naming the bad key before any work starts."""
        return load_config(Path(self.config_path))

    @cached_property
    def store(self) -> LanceStore:
        """The Lance tables (examples, targets, gradients, curvature, queries, scores)."""
        return LanceStore(self.config.storage_root)


def config_resource_from_env() -> HyperinfConfigResource:
    """The resource the code location binds: its path comes from ``$HYPERINF_CONFIG`` at run time."""
    return HyperinfConfigResource(config_path=dg.EnvVar(CONFIG_ENV_VAR))
