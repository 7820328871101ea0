"""The rankings beside influence, each against a direct computation: the loss and margin from the adapter's own
logits, the AUM from the logits of a second, identical warm-up, the probe and cross-fit scores with cleanlab's
own functions on the stored probabilities, HyperINF under the epoch-1 checkpoint from raw gradients, and the
fusion by hand; plus the small pieces (margins, folds, the evaluation's choice) on their own."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hyperinf_project import make_project
from tiny_models import save_tiny_model

from hyperinf_ops.config import load_config
from hyperinf_ops.errors import DataError
from hyperinf_ops.signals import MarginHistory, assess_labels, classification_margins, rank_fusion
from hyperinf_ops.signals.cross_fit import fold_assignment
from hyperinf_ops.stages.evaluation_plan import Candidate, EvaluationPlan, choose, split_test
from hyperinf_ops.store import LanceStore

SIGNALS = {"folds": 2, "checkpoints": True, "probe": True, "similarity": True, "unit": True, "cover": True,
           "fuse": ["loss", "hyperinf_cp", "probe", "aum"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A 120-example tiny project with every signal on (2 folds, checkpoints, probe, similarity), materialized
    once."""
    import dagster as dg

    from pipelines.runner import materialize_all

    root = tmp_path_factory.mktemp("signals")
    model = save_tiny_model(root / "tiny_bert")
    cfg_path = make_project(root / "project", model, n_pool=120, signals=SIGNALS,
                            train={"epochs": 3, "lr": 3.0e-2, "batch_size": 8, "seed": 0})
    cfg = load_config(cfg_path)
    with dg.DagsterInstance.ephemeral() as instance:
        report = materialize_all(instance, cfg_path, cfg, log=lambda _: None)
        assert all(r.is_success for r in report.runs)
    return cfg, LanceStore(str(cfg.storage_root))


def _scores(store: LanceStore, target: str, method: str) -> pd.Series:
    return store.open("scores").to_table(
        columns=["sample_id", "score"], filter=f"target_set = '{target}' AND method = '{method}'"
    ).to_pandas().set_index("sample_id")["score"].sort_index()


def _pool(store: LanceStore) -> list[dict]:
    return sorted(store.open("examples").to_table(columns=["sample_id", "text", "label"]).to_pylist(),
                  key=lambda r: r["sample_id"])


def _logits(loaded, records, max_length: int) -> np.ndarray:
    """The model's logits per record, one example at a time, in eval mode (no batching to share)."""
    from hyperinf_ops.models.lora import batches

    loaded.model.eval()
    with torch.no_grad():
        return np.concatenate([loaded.model(**{k: v for k, v in b.items() if k != "labels"}).logits.double().numpy()
                               for _, b in batches(loaded, records, 1, max_length)])


def _by_hand(logits: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cross-entropy, margin) of each row of logits at class y, in numpy."""
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    given = logits[np.arange(len(y)), y]
    others = np.where(np.arange(logits.shape[1])[None, :] == y[:, None], -np.inf, logits).max(1)
    return -log_probs[np.arange(len(y)), y], given - others


def test_loss_and_margin_are_the_adapters_own(project):
    cfg, store = project
    from hyperinf_ops.stages.loading import load_current_model

    loaded, manifest = load_current_model(cfg.storage_root, cfg.model_spec)
    records = _pool(store)
    y = np.array([manifest.labels.index(r["label"]) for r in records])
    loss, margin = _by_hand(_logits(loaded, records, cfg.max_length), y)
    np.testing.assert_allclose(_scores(store, "self", "loss").to_numpy(), -loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_scores(store, "self", "margin").to_numpy(), margin, rtol=1e-5, atol=1e-6)


def test_aum_is_the_mean_training_margin(project, monkeypatch):
    """The same warm-up again (same seed: the same adapter), its training logits captured with a hook and the
    examples of each step with the batching it uses: the mean margin per example equals the stored `aum`."""
    import hyperinf_ops.training as training
    from hyperinf_ops.models import adapter_hash, load_lora_model
    from hyperinf_ops.stages.adapter import pool_labels
    from hyperinf_ops.stages.loading import load_current_model

    cfg, store = project
    labels = pool_labels(store, cfg.task)
    loaded = load_lora_model(cfg.model_spec, labels, lora=cfg.lora, seed=cfg.train.seed)
    steps, logits = [], []
    real_accumulate = training._accumulate

    def recording(loaded, chunk, *args, **kwargs):  # one optimizer step's examples, in the order trained
        steps.append(([r["sample_id"] for r in chunk], np.array([loaded.label2id[r["label"]] for r in chunk])))
        return real_accumulate(loaded, chunk, *args, **kwargs)

    monkeypatch.setattr(training, "_accumulate", recording)
    hook = loaded.model.register_forward_hook(lambda m, a, out: logits.append(out.logits.detach().double().numpy()))
    training.warmup_train(loaded, _pool(store), cfg.train, max_length=cfg.max_length)  # sorted, as the warm-up
    hook.remove()
    assert adapter_hash(loaded.model) == load_current_model(cfg.storage_root, cfg.model_spec)[1].adapter_hash
    sums: dict[str, list[float]] = {}
    for (ids, y), z in zip(steps, logits, strict=True):
        for i, m in zip(ids, _by_hand(z, y)[1], strict=True):
            sums.setdefault(i, []).append(m)
    assert {len(v) for v in sums.values()} == {cfg.train.epochs}  # one margin per example and epoch
    stored = _scores(store, "self", "aum")
    np.testing.assert_allclose(stored.to_numpy(), [np.mean(sums[i]) for i in stored.index], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("signal", ["probe", "confident"])
def test_probe_and_confident_are_cleanlab_on_the_stored_probabilities(project, signal):
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    cfg, store = project
    rows = store.read_label_signal(signal, "self").to_pandas().set_index("sample_id").sort_index()
    labels = sorted(set(store.open("examples").to_table(columns=["label"])["label"].to_pylist()))
    given = store.open("examples").to_table(columns=["sample_id", "label"]).to_pandas().set_index("sample_id")
    y = given.loc[rows.index, "label"].map(labels.index).to_numpy()
    probs = np.stack(rows["probs"].to_numpy()).astype(np.float64)
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(rows["value"].to_numpy(), get_label_quality_scores(y, probs), rtol=1e-6)
    assert (rows["issue"].to_numpy() == find_label_issues(y, probs, n_jobs=1)).all()
    np.testing.assert_allclose(_scores(store, "self", signal).to_numpy(), rows["value"].to_numpy())
    if signal == "confident":  # the cross-fit's probabilities are the suggestions' (argmax, cleanlab's issues)
        g = store.open("label_suggestions").to_table().to_pandas().set_index("sample_id").loc[rows.index]
        assert (g["source"] == "cross_fit").all() and (g["issue"].to_numpy() == rows["issue"].to_numpy()).all()
        assert (g["suggested_label"].to_numpy() == np.array(labels)[probs.argmax(1)]).all()


def test_similarity_is_the_cosine_to_the_target_sets_mean_embedding(project):
    """Each example embedded alone (no padding to mask) by the base model, by hand: the stored `similarity` of
    every target set is the cosine of the example's mean-pooled state to the mean of the target set's."""
    from transformers import AutoModel, AutoTokenizer

    from hyperinf_ops.models import resolve_model

    cfg, store = project
    path = resolve_model(cfg.model_spec.name)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(text: str) -> np.ndarray:
        with torch.no_grad():
            state = model(**tokenizer(text, truncation=True, max_length=cfg.max_length, return_tensors="pt"))
        pooled = state.last_hidden_state[0].double().mean(0).numpy()
        return pooled / np.linalg.norm(pooled)

    pool = np.stack([embed(r["text"]) for r in _pool(store)])
    targets = store.open("targets").to_table(columns=["target_set", "text"]).to_pylist()
    assert set(cfg.targets) == {t["target_set"] for t in targets}
    for name in cfg.targets:
        centre = np.mean([embed(t["text"]) for t in targets if t["target_set"] == name], axis=0)
        np.testing.assert_allclose(_scores(store, name, "similarity").to_numpy(),
                                   pool @ (centre / np.linalg.norm(centre)), rtol=1e-4, atol=1e-5)


def test_probe_and_similarity_share_one_embedding_pass(project, tmp_path):
    """With both due, the probe and similarity come from one forward pass of the pool and the target sets (one model
    load), and are what each gave when made."""
    import shutil
    from unittest import mock

    from hyperinf_ops.location import Location
    from hyperinf_ops.signals import similarity
    from hyperinf_ops.stages.cross_fit import cross_fit_labels

    cfg, store = project
    shutil.copytree(cfg.storage_root, tmp_path / "store")
    copy = LanceStore(str(tmp_path / "store"))
    Location(copy.uri("label_signals")).remove_tree()  # nothing current: both are due
    real, calls = similarity.embed_records, []

    def counted(model_path, records, task, max_length, **options):
        calls.append(len(records))
        return real(model_path, records, task, max_length, **options)

    lines: list[str] = []
    with mock.patch.object(similarity, "embed_records", counted):
        summary = cross_fit_labels(copy, cfg.model_spec, cfg.lora, cfg.train,
                                   cfg.signals.model_copy(update={"folds": 0}), log=lines.append)
    n_pool, n_targets = copy.open("examples").count_rows(), copy.open("targets").count_rows()
    assert set(summary.computed) == {"probe", "similarity"} and calls == [n_pool + n_targets]
    # the pass reports its progress: about ten lines, the last at its end
    progress = [line for line in lines if line.startswith("embeddings: ")]
    assert 1 <= len(progress) <= 11 and progress[-1].startswith(f"embeddings: {n_pool + n_targets}/{n_pool + n_targets}")
    for name, target in (("probe", "self"), *(("similarity", t) for t in cfg.targets)):
        made, again = (s.read_label_signal(name, target).to_pandas().set_index("sample_id")["value"].sort_index()
                       for s in (store, copy))
        np.testing.assert_allclose(again.to_numpy(), made.to_numpy(), rtol=1e-4, atol=1e-5)


def test_unit_rankings_divide_by_the_exact_gradient_norm(project):
    """`hyperinf_unit` / `tracin_unit` = the stored score over the example's gradient norm, here checked against
    the norm of its raw per-example LoRA gradients from a fresh pass (the whitening is lossless; int4 codes and
    the stored norms are of the exact blocks), so the ranking is the cosine's, up to the query's norm."""
    from hyperinf_ops.stages.loading import gradient_batches, load_current_model

    cfg, store = project
    loaded, _ = load_current_model(cfg.storage_root, cfg.model_spec)
    norms = {}
    for ids, grads, _ in gradient_batches(loaded, _pool(store), cfg.gradient_settings, cfg.max_length):
        sq = sum(g.double().square().sum(dim=(1, 2)) for g in grads.values())
        norms.update(zip(ids, sq.sqrt().tolist(), strict=True))
    for target in cfg.targets:
        for method in ("hyperinf", "tracin"):
            raw, unit = _scores(store, target, method), _scores(store, target, f"{method}_unit")
            np.testing.assert_allclose(unit.to_numpy(), raw.to_numpy() / pd.Series(norms)[raw.index].to_numpy(),
                                       rtol=1e-4)


def test_cover_rankings_are_per_target_example_influence_in_round_robin(project):
    """`hyperinf_cover` / `tracin_cover` against an independent computation: every target example's gradient from a
    per-example backward loop, preconditioned by an exact Cholesky solve of the GFIM of the pool's fresh raw
    gradients (tracin: none), against the stored rows' blocks (whitening undone: what every influence score
    reads), over the exact gradient norms, through cover_scores; and the first round of the ranking is every
    target example's most influential pool example."""
    from hyperinf_ops.core.curvature import curvature_partials
    from hyperinf_ops.core.estimators import precondition
    from hyperinf_ops.core.gradients import per_example_lora_gradients
    from hyperinf_ops.models.lora import batches
    from hyperinf_ops.scorer import raw_gradient_batches
    from hyperinf_ops.settings import EstimatorOptions
    from hyperinf_ops.signals.cover import cover_scores
    from hyperinf_ops.stages.codec import current_whitening
    from hyperinf_ops.stages.loading import load_current_model

    cfg, store = project
    loaded, _ = load_current_model(cfg.storage_root, cfg.model_spec)

    def grads(records):
        parts = [per_example_lora_gradients(loaded.model, b) for _, b in batches(loaded, records, 16,
                                                                                 cfg.max_length)]
        return {k: torch.cat([p[k] for p in parts]).double() for k in sorted(parts[0])}

    pool = _pool(store)
    raw = grads(pool)
    norms = sum(g.square().sum(dim=(1, 2)) for g in raw.values()).sqrt().numpy()
    curvature = curvature_partials(raw)
    shapes = {k: tuple(g.shape[1:]) for k, g in raw.items()}
    blocks, ids = {k: [] for k in shapes}, []
    for batch_ids, b in raw_gradient_batches(store, shapes, whitening=current_whitening(store, cfg.gradient_settings)):
        ids += batch_ids
        for k in shapes:
            blocks[k].append(b[k].double())
    assert ids == [r["sample_id"] for r in pool]
    blocks = {k: torch.cat(v) for k, v in blocks.items()}
    targets = store.open("targets").to_table(columns=["target_set", "sample_id", "text", "label"]).to_pylist()
    for target in cfg.targets:
        rows = sorted((r for r in targets if r["target_set"] == target), key=lambda r: r["sample_id"])
        per_target = grads(rows)
        for method, solve in (("hyperinf", "exact"), ("tracin", "tracin")):
            options = EstimatorOptions(method=solve, damping_ratio=cfg.damping_ratio)
            influence = np.stack([
                sum((blocks[k] * pv[k]).sum(dim=(1, 2)) for k in shapes).numpy()
                for pv in (precondition({k: per_target[k][j] for k in shapes}, curvature, options).vectors
                           for j in range(len(rows)))], axis=1)
            expected = cover_scores(influence, norms)
            stored = _scores(store, target, f"{method}_cover").to_numpy()
            n = len(pool)
            np.testing.assert_allclose(stored, expected, atol=3 / n)  # a near tie may swap neighbours
            firsts = {int(i) for i in np.argmax(influence / norms[:, None], axis=0)}
            assert set(np.argsort(-stored, kind="stable")[:len(firsts)].tolist()) == firsts


def test_cover_is_a_round_robin_over_target_examples():
    """Sorting by cover_scores takes every target example's best pool example before any example's second, however
    unequal the target examples' scales, and the unit normalisation makes a row's scale irrelevant."""
    from hyperinf_ops.signals.cover import cover_scores

    rng = np.random.default_rng(0)
    influence = rng.normal(size=(300, 4)) * np.array([1000.0, 1.0, 0.01, 5.0])
    norms = rng.uniform(0.5, 2.0, size=300)
    order = np.argsort(-cover_scores(influence, norms), kind="stable")
    unit = influence / norms[:, None]
    ranks = np.argsort(np.argsort(-unit, axis=0), axis=0)  # 0 = a target example's best
    best = ranks.min(1)
    assert (np.diff(best[order]) >= 0).all()  # placed by the target example it serves best, round by round
    assert set(order[:4].tolist()) == set(np.argmax(unit, axis=0).tolist())
    row_scale = np.repeat([3.0, 0.2], 150)
    np.testing.assert_array_equal(cover_scores(influence * row_scale[:, None], norms * row_scale),
                                  cover_scores(influence, norms))
    with pytest.raises(ValueError, match="positive"):
        cover_scores(influence, np.zeros(300))


def test_hyperinf_under_the_epoch_1_checkpoint_and_hyperinf_cp(project):
    """The checkpoint's scores from raw per-example gradients under its tensors (the pilot is the whole pool
    here), and hyperinf_cp = their sum over checkpoints, each over its std, plus the end point's."""
    from hyperinf_ops.adapters import AdapterStore
    from hyperinf_ops.core.estimators import influence_scores
    from hyperinf_ops.core.gradients import per_example_lora_gradients
    from hyperinf_ops.models.lora import adapter_parameters, batches
    from hyperinf_ops.stages.loading import load_current_model

    cfg, store = project
    loaded, manifest = load_current_model(cfg.storage_root, cfg.model_spec)
    assert manifest.checkpoints == (1, 2)  # every epoch but the last
    checkpoints = AdapterStore(cfg.storage_root).checkpoints(manifest)
    params = adapter_parameters(loaded.model)
    end = {k: v.detach().clone() for k, v in params.items()}
    pool = _pool(store)
    target = store.open("targets").to_table(columns=["sample_id", "text", "label"]).to_pylist()

    def grads(records):
        parts = [per_example_lora_gradients(loaded.model, b) for _, b in batches(loaded, records, 16,
                                                                                 cfg.max_length)]
        return {k: torch.cat([p[k] for p in parts]).double() for k in parts[0]}

    expected = {}
    try:
        for epoch, tensors in checkpoints.items():
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value)
            expected[epoch] = influence_scores(grads(pool), grads(target), "hyperinf", cfg.damping_ratio).numpy()
    finally:
        with torch.no_grad():
            for name, value in end.items():
                params[name].copy_(value)
    total = np.zeros(len(pool))
    for epoch, values in expected.items():
        rows = store.read_label_signal(f"hyperinf@{epoch}", "clean").to_pandas().set_index("sample_id").sort_index()
        np.testing.assert_allclose(rows["value"].to_numpy(), values, rtol=1e-4, atol=1e-6 * np.abs(values).max())
        total += rows["value"].to_numpy() / rows["value"].std(ddof=0)
    end_scores = _scores(store, "clean", "hyperinf").to_numpy()
    np.testing.assert_allclose(_scores(store, "clean", "hyperinf_cp").to_numpy(),
                               total + end_scores / end_scores.std(), rtol=1e-9)


def test_fused_is_the_mean_rank_percentile_of_its_members(project):
    cfg, store = project
    members = [_scores(store, *key) for key in (("self", "loss"), ("clean", "hyperinf_cp"), ("self", "probe"),
                                                ("self", "aum"))]
    n = len(members[0])
    by_hand = np.zeros(n)
    for s in members:  # percentile = (1 + position in ascending order) / n; average ranks for ties
        values = s.to_numpy()
        order = np.argsort(values, kind="stable")
        ranks = np.empty(n)
        ranks[order] = np.arange(1, n + 1)
        for v in np.unique(values):
            ranks[values == v] = ranks[values == v].mean()
        by_hand += ranks / n
    np.testing.assert_allclose(_scores(store, "clean", "fused").to_numpy(), by_hand / len(members), rtol=1e-12)
    assert list(cfg.fusion_members) == SIGNALS["fuse"]


# ------------------------------------------------------------------------------------------------ small pieces

def test_margins_and_aum_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2, 1])
    np.testing.assert_allclose(classification_margins(logits, targets).numpy(), [1.5, -2.0, 0.0])
    history = MarginHistory()
    history.record(["a", "b"], torch.tensor([1.0, -2.0]))
    history.record(["a"], torch.tensor([3.0]))
    assert history.aum() == {"a": 2.0, "b": -2.0} and len(history) == 2
    with pytest.raises(ValueError, match="margins need"):
        classification_margins(torch.zeros(3), targets)


def test_rank_fusion_by_hand():
    a, b = np.array([0.3, 0.1, 0.2, 0.4]), np.array([10.0, 40.0, 30.0, 20.0])
    # percentiles a: [3, 1, 2, 4] / 4; b: [1, 4, 3, 2] / 4
    np.testing.assert_allclose(rank_fusion({"a": a, "b": b}), [0.5, 0.625, 0.625, 0.75])
    np.testing.assert_allclose(rank_fusion({"t": np.array([1.0, 1.0, 2.0])}), [0.5, 0.5, 1.0])  # ties averaged
    with pytest.raises(ValueError, match="different lengths"):
        rank_fusion({"a": a, "b": b[:3]})


def test_assess_labels_is_cleanlabs():
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=60)
    labels = np.arange(60) % 3
    quality = assess_labels(labels, probs)
    np.testing.assert_allclose(quality.quality, get_label_quality_scores(labels, probs))
    assert (quality.issues == find_label_issues(labels, probs, n_jobs=1)).all()
    assert (quality.suggested == probs.argmax(1)).all()
    with pytest.raises(ValueError, match="rows sum to 1"):
        assess_labels(labels, probs * 2)


def test_folds_are_stratified_and_independent_of_record_order():
    ids = [f"id{i:03d}" for i in range(30)]
    labels = ["a"] * 18 + ["b"] * 12
    folds = fold_assignment(ids, labels, 3, seed=1)
    assert np.bincount(folds).tolist() == [10, 10, 10]
    for f in range(3):  # every fold holds its share of every label
        assert sorted(np.array(labels)[folds == f]).count("b") == 4
    reverse = fold_assignment(ids[::-1], labels[::-1], 3, seed=1)
    assert (reverse[::-1] == folds).all()


def test_choice_reads_only_the_validation_half():
    a = Candidate("drop_harmful", "fused", "clean", 0.2)
    b = Candidate("relabel", "fused", "clean", 0.2)
    plan = EvaluationPlan(test_path="unused", candidates=(a, b), seeds=2)

    def row(candidate, seed, validation, test, subset="curated"):
        return {"subset": subset, "candidate": candidate.name if candidate else None, "query": None, "method": None,
                "balance": False,
                "fraction": 0.2, "seed": seed, "n_examples": 100, "n_relabelled": 0, "n_flipped": None,
                "validation_accuracy": validation, "validation_loss": 1 - validation, "test_accuracy": test,
                "test_loss": 1 - test}

    rows = [row(None, s, 0.70, 0.99, "full") for s in (0, 1)] + [row(a, s, v, 0.10) for s, v in ((0, 0.8), (1, 0.7))] \
        + [row(b, s, v, 0.99) for s, v in ((0, 0.74), (1, 0.74))] + [row(None, 0, 0.99, 0.99, "oracle")]
    chosen = choose(rows, plan, has_classes=True)
    assert chosen.candidate == a  # 0.75 on validation beats 0.74 and the full pool's 0.70; test numbers ignored
    flipped_tests = [{**r, "test_accuracy": 1 - r["test_accuracy"], "test_loss": r["test_accuracy"]} for r in rows]
    assert choose(flipped_tests, plan, has_classes=True).candidate == a
    tie = [{**r, "validation_accuracy": 0.7} for r in rows]
    assert choose(tie, plan, has_classes=True).candidate is None  # ties go to the full pool
    lossy = [{**r, "validation_loss": 0.1 if r["subset"] == "full" else r["validation_loss"]} for r in rows]
    assert choose(lossy, plan, has_classes=False).candidate is None  # causal LM: the lowest validation loss
    assert choose(rows, plan, has_classes=True).export(plan) == ("drop_harmful", a.params)
    # the full pool wins: drop_harmful with fraction 0 over the first candidate's ranking, whatever that
    # candidate's own query takes (drop_issues: max_fraction)
    issues = Candidate("drop_issues", "hyperinf", "clean", None)
    alone = EvaluationPlan(test_path="unused", candidates=(issues,), seeds=2)
    full = [row(None, s, 0.9, 0.9, "full") for s in (0, 1)] + [row(issues, s, 0.5, 0.5) for s in (0, 1)]
    assert choose(full, alone, has_classes=True).export(alone) == (
        "drop_harmful", {"target_set": "clean", "method": "hyperinf", "fraction": 0.0})
    # a run stopped part-way: a new plan's first fit beside the old plan's, or a seed missing, is refused
    for broken in (rows + [row(a, 0, 0.99, 0.99)], [r for r in rows if (r["candidate"], r["seed"]) != (b.name, 1)]):
        with pytest.raises(DataError, match="does not hold one fit per seed"):
            choose(broken, plan, has_classes=True)


def test_split_test_is_seeded_disjoint_and_order_free():
    records = [{"sample_id": f"t{i}"} for i in range(11)]
    validation, test = split_test(records, 0.5)
    assert len(validation) == 6 and len(test) == 5
    assert {r["sample_id"] for r in validation}.isdisjoint(r["sample_id"] for r in test)
    again = split_test(records[::-1], 0.5)
    assert [r["sample_id"] for r in again[0]] == [r["sample_id"] for r in validation]
    with pytest.raises(Exception, match="too few"):
        split_test(records[:1], 0.5)


def test_exact_match_is_greedy_decoding_up_to_the_first_eos():
    """Teacher-forced argmax over the response equals what greedy decoding emits: a miss before the end-of-sequence
    token fails the example, what follows that token (never generated) does not count, and a response cut before
    its end-of-sequence token (max_length) is no match however well its start is predicted."""
    from hyperinf_ops.signals.outputs import exact_matches

    eos, ignored = 4, -100
    targets = torch.tensor([[ignored, 3, eos, 1], [ignored, 3, eos, 1], [ignored, 2, 2, eos], [ignored] * 4,
                            [ignored, 2, 2, 3]])
    argmax = torch.tensor([[0, 3, eos, 0], [0, 2, eos, 1], [0, 2, 2, eos], [0, 0, 0, 0], [0, 2, 2, 3]])
    logits = torch.nn.functional.one_hot(argmax, 5).double()
    assert exact_matches(logits, targets, eos).tolist() == [True, False, True, False, False]  # no target: no match
    assert exact_matches(logits, targets, None).tolist() == [False, False, True, False, True]  # every target counts


def test_similarity_of_a_causal_pair_embeds_prompt_and_response(tmp_path):
    """A causal LM's pairs are embedded as prompt, newline, response: the pool pair equal to the target set's one
    example has cosine 1 and ranks first; one with the same prompt and another response does not."""
    from hyperinf_ops.signals.similarity import embed_records, target_similarity

    model = save_tiny_model(tmp_path / "tiny_llama", task="causal_lm")
    target = [{"prompt": "what is this", "response": "a good film"}]
    pool = [{"prompt": "hello", "response": "hi"}, {"prompt": "what is this", "response": "a dull film"}, target[0],
            {"prompt": "how are you", "response": "fine thanks"}]
    values = target_similarity(embed_records(model, pool, "causal_lm", 32), embed_records(model, target,
                                                                                            "causal_lm", 32))
    assert values[2] == pytest.approx(1.0) and int(np.argmax(values)) == 2 and values[1] < 1 - 1e-6


def test_similarity_embeds_an_over_long_pair_as_its_training_cuts_it(tmp_path):
    """An over-long pair is embedded as `collate` trains it: its prompt's end and its response's start. Pairs that
    differ only where the cut drops (the prompt's start) embed alike; a different prompt end does not."""
    from hyperinf_ops.signals.probe import load_tokenizer, token_embeddings
    from hyperinf_ops.signals.similarity import embed_records
    from hyperinf_ops.tasks import get_task

    model = save_tiny_model(tmp_path / "tiny_llama", task="causal_lm")
    words = " ".join(f"w{i}" for i in range(60))
    pairs = [{"prompt": f"alpha beta {words} what is it", "response": "a good film " * 10},
             {"prompt": f"gamma delta {words} what is it", "response": "a good film " * 10},
             {"prompt": f"alpha beta {words} who made it", "response": "a good film " * 10}]
    embedded = embed_records(model, pairs, "causal_lm", 32)
    assert np.allclose(embedded[0], embedded[1], atol=1e-6) and not np.allclose(embedded[0], embedded[2], atol=1e-3)
    tokenizer = load_tokenizer(model)
    batch = get_task("causal_lm").collate(tokenizer, pairs[:1], {}, 32)
    trained = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert np.allclose(embedded[0], token_embeddings(model, [trained], tokenizer.pad_token_id)[0], atol=1e-6)
