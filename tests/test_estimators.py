"""Influence estimators against direct evaluations of their formulas, the sign convention, and bad input."""

import math

import numpy as np
import pytest
import torch

from hyperinf_ops.core.curvature import curvature_partials
from hyperinf_ops.core.estimators import (
    METHODS,
    EstimatorOptions,
    influence_scores,
    mean_target_gradient,
    precondition,
    score_gradients,
    self_influence,
)
from hyperinf_ops.errors import (
    EmptyTargetSetError,
    GradientMismatchError,
    InverseNotConvergedError,
    NonFiniteGradientError,
)
from hyperinf_ops.models import resolve_model

SHAPES = {"l0.query.lora_A": (4, 24), "l0.query.lora_B": (4, 16), "l1.value.lora_A": (4, 24)}


def _low_rank_grads(n: int, seed: int, rank: int = 5) -> dict[str, torch.Tensor]:
    """fp32 gradients near a rank-`rank` subspace per matrix, like real LoRA gradients (strong spectral decay)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (r, d)) in enumerate(SHAPES.items()):
        basis = torch.randn(rank, d, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        coef = torch.randn(n, r, rank, generator=gen, dtype=torch.float64) * 10.0 ** (-i)
        noise = 0.02 * 10.0 ** (-i) * torch.randn(n, r, d, generator=gen, dtype=torch.float64)
        out[name] = (coef @ basis + noise).float()
    return out


@pytest.fixture(scope="module")
def data():
    return _low_rank_grads(30, seed=0), _low_rank_grads(6, seed=1)


def _rel(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _np(name_grads):
    return {k: v.double().numpy() for k, v in name_grads.items()}


def _direct_gfim_scores(train, target, ratio=0.1) -> np.ndarray:
    """score_k = sum_l vec(g_kl) . vec(v_l (G_l + lam_l I)^-1) with a dense numpy solve."""
    train, target = _np(train), _np(target)
    scores = 0.0
    for name, g in train.items():
        n, r, d = g.shape
        gfim = sum(g[k].T @ g[k] for k in range(n)) / n
        lam = ratio * np.mean(g**2)
        v = target[name].mean(0)
        pv = np.linalg.solve(gfim + lam * np.eye(d), v.T).T
        scores = scores + np.einsum("nrd,rd->n", g, pv)
    return scores


def test_exact_equals_dense_numpy_solve_and_hyperinf_equals_exact(data):
    train, target = data
    exact = influence_scores(train, target, "exact")
    assert exact.dtype == torch.float64 and exact.shape == (30,)
    np.testing.assert_allclose(exact.numpy(), _direct_gfim_scores(train, target), rtol=1e-10)
    for order in (2, 3):
        assert _rel(influence_scores(train, target, "hyperinf", schulz_order=order), exact) <= 1e-5
    # fp32 Schulz (moderate condition here) is good to fp32 accuracy, not better
    assert _rel(influence_scores(train, target, "hyperinf", dtype=torch.float32), exact) <= 1e-3


def test_datainf_equals_its_closed_form_loop(data):
    train, target = data
    want = 0.0
    for name, g in _np(train).items():
        n = g.shape[0]
        flat, v = g.reshape(n, -1), _np(target)[name].mean(0).reshape(-1)
        lam = 0.1 * np.mean(g**2)
        pv = sum(v - (v @ flat[i]) / (lam + flat[i] @ flat[i]) * flat[i] for i in range(n)) / (n * lam)
        want = want + flat @ pv
    np.testing.assert_allclose(influence_scores(train, target, "datainf").numpy(), want, rtol=1e-10)


def test_datainf_tends_to_exact_full_under_heavy_damping(data):
    # both are (1/lam)(v - F v / lam) + O(lam^-3): the approximation is exact in the heavy-damping limit
    train, target = data
    rel = [
        _rel(
            influence_scores(train, target, "datainf", ratio),
            influence_scores(train, target, "exact_full", ratio),
        )
        for ratio in (1e3, 1e5)
    ]
    assert rel[1] < 1e-3 and rel[1] < rel[0] / 50


def test_exact_full_equals_dense_numpy_solve(data):
    train, target = data
    want = 0.0
    for name, g in _np(train).items():
        n = g.shape[0]
        flat, v = g.reshape(n, -1), _np(target)[name].mean(0).reshape(-1)
        full = flat.T @ flat / n + 0.1 * np.mean(g**2) * np.eye(flat.shape[1])
        want = want + flat @ np.linalg.solve(full, v)
    np.testing.assert_allclose(influence_scores(train, target, "exact_full").numpy(), want, rtol=1e-9)


def test_tracin_is_the_gradient_dot_product(data):
    train, target = data
    want = sum(np.einsum("nrd,rd->n", g, _np(target)[name].mean(0)) for name, g in _np(train).items())
    np.testing.assert_allclose(influence_scores(train, target, "tracin").numpy(), want, rtol=1e-12)


def test_lissa_approaches_exact_as_iterations_grow(data):
    train, target = data
    exact = influence_scores(train, target, "exact")
    errs = [
        _rel(influence_scores(train, target, "lissa", lissa_iterations=t), exact) for t in (10, 100, 1000)
    ]
    assert errs[0] > errs[1] > errs[2] and errs[2] < errs[0] / 3
    # well conditioned (heavy damping): the Neumann series converges fully, so the damping sign is right
    heavy = influence_scores(train, target, "lissa", 10.0, lissa_iterations=1000)
    assert _rel(heavy, influence_scores(train, target, "exact", 10.0)) <= 1e-8


def test_gfim_matches_full_fisher_when_rows_are_iid_and_not_otherwise():
    # Lemma 1: iid zero-mean rows give F = I_r (x) G / r, so v (F + lam I)^-1 = r v (G + r lam I)^-1.
    r, d, n = 3, 6, 20000
    gen = torch.Generator().manual_seed(5)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    iid = {"m": torch.randn(n, r, d, generator=gen, dtype=torch.float64) @ mix}
    shared_row = torch.randn(n, 1, d, generator=gen, dtype=torch.float64) @ mix
    copies = {"m": shared_row.expand(n, r, d).contiguous()}  # perfectly correlated rows: the lemma fails
    v = {"m": torch.randn(r, d, generator=gen, dtype=torch.float64)}
    errs = []
    for grads in (iid, copies):
        full = precondition(
            v, curvature_partials(grads, full=True), EstimatorOptions("exact_full", 0.1)
        ).vectors["m"]
        gfim = precondition(v, curvature_partials(grads), EstimatorOptions("exact", 0.1 * r)).vectors["m"]
        errs.append(_rel(r * gfim, full))
    assert errs[0] < 0.05 and errs[1] > 0.3


@pytest.mark.parametrize("method", METHODS)
def test_sign_convention_higher_is_more_helpful(data, method):
    train, target = data
    v = mean_target_gradient(target)
    # example 0 is the target direction itself, example 1 its opposite
    pool = {k: torch.cat([v[k][None].float(), -v[k][None].float(), train[k]]) for k in train}
    scores = influence_scores(pool, target, method)
    assert scores[0] > 0 > scores[1] and float(scores[0]) == pytest.approx(-float(scores[1]), rel=1e-9)


def test_self_influence_matches_direct_evaluation(data):
    train, _ = data
    want = 0.0
    for g in _np(train).values():
        n, _, d = g.shape
        inv = np.linalg.inv(sum(g[k].T @ g[k] for k in range(n)) / n + 0.1 * np.mean(g**2) * np.eye(d))
        want = want + np.einsum("nrd,de,nre->n", g, inv, g)
    exact = self_influence(train, "exact")
    np.testing.assert_allclose(exact.numpy(), want, rtol=1e-10)
    assert (exact > 0).all()
    assert _rel(self_influence(train), exact) <= 1e-6
    tracin = sum(np.square(g).sum((1, 2)) for g in _np(train).values())
    np.testing.assert_allclose(self_influence(train, "tracin").numpy(), tracin, rtol=1e-12)


def test_diagnostics_report_damping_convergence_and_a_condition_upper_bound(data):
    train, target = data
    curvature = curvature_partials(train)
    v = mean_target_gradient(target)
    pv = precondition(v, curvature, EstimatorOptions())
    assert list(pv.vectors) == sorted(SHAPES)
    for name, info in pv.diagnostics.items():
        part = curvature[name]
        lam = part.damping(0.1)
        assert info.damping == lam and info.converged and 0 < info.iterations <= 40
        assert info.residual <= 1e-9
        eig = torch.linalg.eigvalsh(part.gfim() + lam * torch.eye(part.gfim().shape[0], dtype=torch.float64))
        assert info.condition_estimate >= float(eig[-1] / eig[0]) * (1 - 1e-9)
        assert pv.vectors[name].dtype == torch.float64 and pv.vectors[name].shape == SHAPES[name]
    exact = precondition(v, curvature, EstimatorOptions("exact"))
    assert all(info.residual <= 1e-12 and info.converged for info in exact.diagnostics.values())
    torch.testing.assert_close(
        score_gradients(pv, train), score_gradients(exact.vectors, train), rtol=1e-6, atol=0
    )


def test_unconverged_schulz_raises_unless_explicitly_allowed(data):
    train, target = data
    with pytest.raises(InverseNotConvergedError, match=r"'l0\.query\.lora_A'.*residual"):
        influence_scores(train, target, "hyperinf", schulz_max_iter=2)
    options = EstimatorOptions(schulz_max_iter=2, allow_unconverged=True)
    pv = precondition(mean_target_gradient(target), curvature_partials(train), options)
    assert not pv.diagnostics["l0.query.lora_A"].converged


def test_paper_start_diverges_on_large_gradients(data):
    # lambda_max of the GFIM above 2 / 5e-5 = 40,000: the reference start diverges, and we say so
    train, target = data
    big = {k: v * 1e3 for k, v in train.items()}
    with pytest.raises(InverseNotConvergedError):
        influence_scores(big, target, "hyperinf", init="paper")


@pytest.mark.parametrize("method", ["hyperinf", "exact", "lissa", "datainf", "exact_full"])
def test_all_zero_matrix_contributes_nothing(data, method):
    train, target = data
    zeroed = {**train, "l0.query.lora_B": torch.zeros_like(train["l0.query.lora_B"])}
    without = {k: v for k, v in zeroed.items() if k != "l0.query.lora_B"}
    target_without = {k: v for k, v in target.items() if k != "l0.query.lora_B"}
    torch.testing.assert_close(
        influence_scores(zeroed, target, method, lissa_iterations=50),
        influence_scores(without, target_without, method, lissa_iterations=50),
    )


def test_bad_input_is_a_named_error(data):
    train, target = data
    name = "l0.query.lora_B"
    with pytest.raises(GradientMismatchError, match=name):
        influence_scores(train, {k: v for k, v in target.items() if k != name})
    with pytest.raises(GradientMismatchError, match=name):
        influence_scores(train, {**target, name: target[name][:, :, :-1]})
    with pytest.raises(EmptyTargetSetError, match="target"):
        influence_scores(train, {k: v[:0] for k, v in target.items()})
    with pytest.raises(EmptyTargetSetError):
        influence_scores({k: v[:0] for k, v in train.items()}, target)
    for which in ("train", "target"):
        broken = dict(train if which == "train" else target)
        broken[name] = broken[name].clone()
        broken[name][0, 0, 0] = math.nan
        args = (broken, target) if which == "train" else (train, broken)
        with pytest.raises(NonFiniteGradientError, match=f"{which} gradient '{name}'"):
            influence_scores(*args)
    with pytest.raises(ValueError, match="'hyperinf', 'datainf', 'lissa', 'tracin', 'exact' or 'exact_full'"):
        influence_scores(train, target, "influence")
    with pytest.raises(ValueError, match="damping_ratio"):
        influence_scores(train, target, damping_ratio=0.0)
    with pytest.raises(ValueError, match="schulz_orderr"):  # a misspelled option is named, never ignored
        influence_scores(train, target, schulz_orderr=3)
    v = mean_target_gradient(target)
    with pytest.raises(ValueError, match="train_grads"):
        precondition(v, curvature_partials(train), EstimatorOptions("datainf"))
    with pytest.raises(ValueError, match="full"):
        precondition(v, curvature_partials(train), EstimatorOptions("exact_full"))
    with pytest.raises(ValueError, match="curvature"):
        precondition(v, None, EstimatorOptions("hyperinf"))
    torch.testing.assert_close(precondition(v, None, EstimatorOptions("tracin")).vectors, v)


@pytest.mark.real_weights
def test_real_minilm_hyperinf_equals_exact():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging

    from hyperinf_ops.core.gradients import per_example_lora_gradients

    path = resolve_model("minilm")  # the bundled weights: installed by make setup
    tok = AutoTokenizer.from_pretrained(path)
    logging.set_verbosity_error()  # the new classification head is reported "missing", as expected
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    cfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False, task_type="SEQ_CLS"
    )
    model = get_peft_model(base, cfg)
    texts = [
        "A man is eating food.",
        "The market fell sharply today.",
        "Great film!",
        "Terrible service.",
        "I loved every minute of it.",
        "Never again.",
        "The plot was thin but fun.",
        "Boring and long.",
        "What a wonderful day.",
        "The food was cold.",
        "Superb acting.",
        "I want my money back.",
    ]
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    batch = {**tok(texts, padding=True, return_tensors="pt"), "labels": labels}
    grads = per_example_lora_gradients(model, batch, modules=["layer.5."])  # 4 matrices of (8, 384)
    train = {k: v[:9] for k, v in grads.items()}
    target = {k: v[9:] for k, v in grads.items()}
    exact = influence_scores(train, target, "exact")
    assert _rel(influence_scores(train, target, "hyperinf"), exact) <= 1e-5
