"""The LoRA adapter, the whitening its rows are stored under, and the per-example gradient rows of each pool
shard (with their checks)."""

import dagster as dg
import pyarrow.compute as pc

from assets_defs.automation import ON_NEW_ADAPTER, ONCE, step_asset
from assets_defs.metadata import column_schema, lines_markdown, summary_metadata, table_metadata, timed
from assets_defs.partitions import pool_shards
from assets_defs.pool import pool_examples, removed_shard
from assets_defs.resources import HyperinfResource
from hyperinf_ops.data.io import discover_shards
from hyperinf_ops.store import sql_literal


@step_asset(
    group="model", kinds={"pytorch", "huggingface"}, code_version="4",
    deps=[dg.AssetDep(pool_examples, partition_mapping=dg.AllPartitionMapping())],
    automation=ONCE,
    advisory_checks={"warmup_learns": "The warm-up adapter beats the pool's majority class on held-out records (the "
                                      "target-set files; causal LM: lowers their loss). Influence from an adapter "
                                      "that learned nothing ranks noise."},
    description="LoRA adapter every gradient row is taken under: a warm-up fine-tune on the pool (reused while "
                "model, labels and settings are unchanged) or the configured `adapter.path`, stored by hash. "
                "Evaluated on held-out records before training and after each epoch. Data version: the "
                "adapter's hash.",
)
def lora_adapter(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.adapter import heldout_records, train_or_load_adapter, warmup_problem

    cfg, store = hyperinf.config, hyperinf.store
    summary, wall = timed(train_or_load_adapter, store, cfg.model_spec, cfg.lora, cfg.train, given=cfg.adapter.path,
                          heldout=lambda: heldout_records(store, cfg.targets, cfg.data, cfg.task, cfg.train.seed),
                          log=context.log.info)
    metadata = {**summary_metadata(summary, skip=("seconds", "path", "train")),
                "path": dg.MetadataValue.path(summary.path), "wall_time_s": wall}
    train = summary.train or {}
    metadata.update(_training_metadata(train))
    problem = warmup_problem(train)
    if problem:
        context.log.error(problem)
    check = dg.AssetCheckResult(
        check_name="warmup_learns", passed=problem is None, severity=dg.AssetCheckSeverity.ERROR,
        description=problem or ("no held-out curve to judge (a given adapter)" if not train.get("heldout_source")
                                else None),
        metadata={k: v for k, v in metadata.items() if k.startswith(("heldout", "majority"))})
    return dg.MaterializeResult(data_version=dg.DataVersion(summary.adapter_hash), metadata=metadata,
                                check_results=[check])


def _training_metadata(train: dict) -> dict:
    """The warm-up's curve: a table and a plot per epoch (held-out entry 0 = before training), the final
    held-out numbers and the majority baseline as plottable floats."""
    if not train:
        return {}
    epochs = list(range(train["epochs"] + 1))
    train_loss = [None, *train["loss_per_epoch"]]
    train_acc = [None, *(train.get("accuracy_per_epoch") or [None] * train["epochs"])]
    held_loss = list(train.get("heldout_loss_per_epoch") or [None] * len(epochs))
    held_acc = list(train.get("heldout_accuracy_per_epoch") or [None] * len(epochs))
    rows = [{"epoch": e, "train_loss": tl, "train_accuracy": ta, "heldout_loss": hl, "heldout_accuracy": ha}
            for e, tl, ta, hl, ha in zip(epochs, train_loss, train_acc, held_loss, held_acc, strict=True)]
    out = {"training": table_metadata(rows),
           "train_examples_per_s": dg.MetadataValue.float(round(train["examples_per_s"], 2))}
    if train.get("heldout_source"):
        out["heldout_source"] = dg.MetadataValue.text(train["heldout_source"])
        out["heldout_loss"] = dg.MetadataValue.float(held_loss[-1])
        majority = train.get("majority")
        accuracy = held_acc[-1] is not None
        if accuracy:
            out["heldout_accuracy"] = dg.MetadataValue.float(held_acc[-1])
        if majority:
            out["majority_class_accuracy"] = dg.MetadataValue.float(majority["accuracy"])
        series = {"train accuracy": train_acc, "held-out accuracy": held_acc} if accuracy else \
            {"train loss": train_loss, "held-out loss": held_loss}
        out["curve"] = lines_markdown(epochs, series, title="warm-up per epoch (0 = before training)",
                                      xlabel="epoch", hlines={"majority class": majority["accuracy"]}
                                      if majority else None)
    return out


@step_asset(
    group="model", kinds={"pytorch"}, code_version="1",
    deps=[lora_adapter, dg.AssetDep(pool_examples, partition_mapping=dg.AllPartitionMapping())],
    automation=ON_NEW_ADAPTER,
    description="The whitening the gradient rows are stored under (compression.whiten > 0): the GFIM of a "
                "seeded pilot sample of the pool, taken once per adapter and compression settings and reused by "
                "every shard. Data version: its digest ('none' without whitening).",
)
def row_codec(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.codec import prepare_row_codec

    cfg = hyperinf.config
    summary, wall = timed(prepare_row_codec, hyperinf.store, cfg.model_spec, cfg.gradient_settings,
                          log=context.log.info)
    return dg.MaterializeResult(data_version=dg.DataVersion(summary.digest or "none"),
                                metadata={**summary_metadata(summary, skip=("seconds",)), "wall_time_s": wall})


# Under the Kubernetes executor (dagster-k8s) every gradient shard's step is its own pod with one GPU; the
# in-process and dask executors ignore the tag (docs/deploy.md).
GPU_STEP_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}}


@step_asset(
    group="model", kinds={"pytorch", "lance"}, code_version="5",
    partitions_def=pool_shards, op_tags=GPU_STEP_TAGS,
    deps=[pool_examples, lora_adapter, row_codec],
    checks={"gradients_finite": "Every example of the shard has a finite gradient (non-finite ones are left out)."},
    description="Per-example LoRA gradients of one shard under the current adapter: rows in `gradients`, exact "
                "curvature partial sums in `curvature`. Skipped when the shard's rows are current (same "
                "fingerprint and examples); otherwise only new and edited examples get a gradient pass (rows of "
                "unchanged content are kept, the sums updated exactly). Data version: fingerprint + the shard's "
                "examples digest.",
)
def lora_gradients(context: dg.AssetExecutionContext, hyperinf: HyperinfResource) -> dg.MaterializeResult:
    from hyperinf_ops.stages.gradients import compute_gradient_shard

    cfg = hyperinf.config
    if context.partition_key not in discover_shards(cfg.data.path):  # the file is gone: nothing to compute
        return removed_shard(context, hyperinf, [dg.AssetCheckResult(check_name="gradients_finite", passed=True)])
    summary, wall = timed(compute_gradient_shard, hyperinf.store, context.partition_key, cfg.model_spec,
                          cfg.gradient_settings, log=context.log.info)
    finite = dg.AssetCheckResult(
        check_name="gradients_finite",
        passed=summary.nonfinite_rows == 0,
        metadata={"nonfinite_rows": summary.nonfinite_rows,
                  "nonfinite_ids": dg.MetadataValue.json(summary.nonfinite_ids)},
    )
    return dg.MaterializeResult(
        data_version=dg.DataVersion(summary.data_version),
        metadata={"dagster/row_count": summary.rows,
                  "dagster/column_schema": column_schema(hyperinf.store.open("gradients").schema),
                  **summary_metadata(summary, skip=("seconds", "shard", "nonfinite_ids", "data_version")),
                  "wall_time_s": wall},
        check_results=[finite],
    )


@dg.asset_check(
    asset=lora_gradients,
    blocking=True,
    description="The shard's gradient rows are exactly its pool examples: same ids, no duplicates.",
)
def gradient_rows_match_pool(context: dg.AssetCheckExecutionContext, hyperinf: HyperinfResource) -> dg.AssetCheckResult:
    store, shard = hyperinf.store, context.partition_key
    where = f"shard = {sql_literal(shard)}"
    examples = store.open("examples").to_table(columns=["sample_id"], filter=where)["sample_id"]
    grads = store.open("gradients").to_table(columns=["sample_id"], filter=where)["sample_id"]
    missing = sorted(set(examples.to_pylist()) - set(grads.to_pylist()))
    extra = sorted(set(grads.to_pylist()) - set(examples.to_pylist()))
    duplicates = len(grads) - len(pc.unique(grads))
    return dg.AssetCheckResult(
        passed=not (missing or extra or duplicates),
        metadata={"shard": shard, "pool_rows": len(examples), "gradient_rows": len(grads),
                  "missing": dg.MetadataValue.json(missing[:20]), "not_in_pool": dg.MetadataValue.json(extra[:20]),
                  "duplicates": duplicates},
    )
