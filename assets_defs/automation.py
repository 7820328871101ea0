"""When Dagster's automation (the `hyperinf_automation` sensor) materializes an asset by itself.

ON_NEW_DATA is `eager()` with one change: a dependency counts as updated only when its *data version* changed
(or it is requested on the same tick, so a chain runs in one go). Every asset returns a data version that says
what its output is a function of (a shard's content, the adapter's hash, the gradient fingerprint, ...), so a
re-run that found nothing to do (an unchanged shard, a reused adapter) does not cascade into recomputing
everything downstream. As in `eager()`, a change made by a run that also materialized this asset is not a
reason to run it again.
"""

import dagster as dg

AC = dg.AutomationCondition

_DEP_CHANGED = ((AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("new_data_version")
                | AC.will_be_requested())
ON_NEW_DATA = AC.eager().replace("any_deps_updated", AC.any_deps_match(_DEP_CHANGED).with_label("any_deps_changed"))
# The adapter is trained once and then kept: gradients are only comparable under one adapter, so new data
# must not silently retrain it (re-materialize it from the UI or `hyperinf run` after a settings change).
ONCE = AC.on_missing()
# The rows' whitening: made when missing and again for a new adapter, never for new pool data (a new pilot would
# make every stored row stale).
ON_NEW_ADAPTER = AC.eager().replace(
    "any_deps_updated",
    AC.any_deps_match(_DEP_CHANGED).allow(dg.AssetSelection.assets("lora_adapter")).with_label("adapter_changed"))


def step_asset(*, group: str, code_version: str, description: str, kinds: set[str], deps=(), partitions_def=None,
               checks: dict[str, str] | None = None, advisory_checks: dict[str, str] | None = None,
               automation: dg.AutomationCondition = ON_NEW_DATA, optional: bool = False,
               op_tags: dict | None = None):
    """``dg.asset`` with the project's conventions: an explicit code version (a changed step marks its output
    stale in the UI), declarative automation (ON_NEW_DATA unless said), ``checks`` (name -> description) as
    blocking checks the asset evaluates itself and ``advisory_checks`` as non-blocking ones (a failure shows in
    the UI and `hyperinf run` exits with the check-failed status, downstream assets still run). An `optional`
    asset is a generator that yields its MaterializeResult only when the config asks for it. `op_tags`: the step's
    tags for the executor (e.g. the pod a Kubernetes executor gives it)."""

    def decorate(fn):
        specs = [dg.AssetCheckSpec(name, asset=fn.__name__, blocking=blocking, description=text)
                 for group, blocking in ((checks, True), (advisory_checks, False))
                 for name, text in (group or {}).items()]
        return dg.asset(deps=list(deps), partitions_def=partitions_def, group_name=group, kinds=kinds,
                        code_version=code_version, automation_condition=automation, check_specs=specs,
                        description=description, output_required=not optional, op_tags=op_tags)(fn)

    return decorate
