"""The resource every asset reads: the validated YAML config and the Lance store under its `storage_root`.

`pipelines/` binds it (from `$HYPERINF_CONFIG` in the code location); a run can also set it in run config:
``{"resources": {"hyperinf": {"config": {"config_path": "path/to/hyperinf.yaml"}}}}``.
"""

from __future__ import annotations

from contextlib import ExitStack
from functools import cached_property
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from hyperinf_ops.config import HyperinfConfig, load_config
from hyperinf_ops.errors import HyperinfError
from hyperinf_ops.store import LanceStore
from hyperinf_ops.store.lease import INVOCATION_TAG, share_root

__all__ = ["CONFIG_ENV_VAR", "HyperinfResource"]

CONFIG_ENV_VAR = "HYPERINF_CONFIG"


class HyperinfResource(dg.ConfigurableResource):
    """The hyperinf YAML config (validated on first use) and the Lance store under its ``storage_root``."""

    config_path: str
    _lease: ExitStack = PrivateAttr(default_factory=ExitStack)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """In a run: the storage root's lease, shared (store/lease.py). A run launched from the UI or by
        automation fails here, before its step writes anything, while a `hyperinf run` holds the root; the
        steps of that `hyperinf run`'s own runs (tagged with its invocation) go ahead. A sensor only reads."""
        run = context.run
        if run is None:
            return
        try:
            root = self.config.storage_root
        except HyperinfError:
            return  # the step raises it, naming every problem, before it could write anything
        self._lease.enter_context(share_root(root, run.tags.get(INVOCATION_TAG)))

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._lease.close()

    @cached_property
    def config(self) -> HyperinfConfig:
        """The parsed config; raises ``ConfigError`` naming every bad key before any work starts."""
        return load_config(Path(self.config_path))

    @cached_property
    def store(self) -> LanceStore:
        """The Lance tables (examples, targets, gradients, curvature, preconditioners, queries, scores)."""
        return LanceStore(str(self.config.storage_root))
