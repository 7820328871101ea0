"""sql/*.sql against real Lance tables through DuckDB (live views and the synced database file): each
query equals the same selection computed with pandas; parameters are bound, validated, never spliced."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from hyperinf_ops.errors import ConfigError
from hyperinf_ops.fingerprint import Fingerprint
from hyperinf_ops.query import DUCKDB_FILE, connect, list_queries, run_query, sql_params, sync_duckdb
from hyperinf_ops.scorer import score_store
from hyperinf_ops.settings import CompressionSpec
from hyperinf_ops.store import GradientBatch, LanceStore, Query

N, DIM = 40, 32
FP = Fingerprint.create(
    model_id="tiny",
    model_hash="h",
    adapter_hash="a",
    task="classification",
    lora_modules=["q"],
    shapes={"q.lora_A": (2, 8), "q.lora_B": (2, 8)},
    compression=CompressionSpec(dtype="float16"),  # raw rows of 2 * (2 * 8) = DIM floats
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> LanceStore:
    """examples (2 shards, 3 labels, an extra column), gradients, and scores of 2 target sets x 2 methods."""
    store = LanceStore(str(tmp_path_factory.mktemp("q")))
    gen = torch.Generator().manual_seed(0)
    ids = [f"e{i:02d}" for i in range(N)]
    for s, sl in enumerate((slice(0, 25), slice(25, N))):
        part = ids[sl]
        store.write_examples(
            f"s{s}",
            pa.table(
                {
                    "sample_id": part,
                    "text": [f"it's example {i}" for i in part],
                    "label": [int(i[1:]) % 3 for i in part],
                    "content_hash": [f"h{i}" for i in part],
                    "source": ["web" if int(i[1:]) % 2 else "books" for i in part],
                }
            ),
        )
        grad = torch.randn(len(part), DIM, generator=gen)
        store.write_gradients(f"s{s}", GradientBatch(part, grad, torch.rand(len(part), 2, generator=gen)), FP)
    store.write_targets("A", pa.table({"sample_id": ["t1", "t2"], "text": ["x", "y"], "label": [0, 1]}))
    queries = [
        Query(ts, m, torch.randn(DIM, generator=gen), FP.digest(), {"q.lora_A": {"damping": 0.1}})
        for ts in ("A", "B")
        for m in ("hyperinf", "tracin")
    ]
    store.write_queries(queries)
    score_store(store, queries)
    return store


@pytest.fixture(params=["live", "synced"])
def con(request, store):
    if request.param == "live":
        con = connect(store)
    else:
        sync_duckdb(store)
        con = connect(store, live=False)
    yield con
    con.close()


def _frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas().reset_index(drop=True)


def _scores(store) -> pd.DataFrame:
    return store.open("scores").to_table().to_pandas()


def _examples(store) -> pd.DataFrame:
    return store.open("examples").to_table().to_pandas()


def _assert_rows(got: pd.DataFrame, expected: pd.DataFrame, columns: list[str]) -> None:
    assert len(got) == len(expected) > 0
    for col in columns:
        assert (
            got[col].tolist() == pytest.approx(expected[col].tolist())
            if got[col].dtype.kind == "f"
            else (got[col].tolist() == expected[col].tolist())
        ), col


def test_top_k(con, store):
    got = _frame(run_query(con, "top_k", {"method": "tracin", "k": 5}))
    s = _scores(store)
    exp = s[(s.method == "tracin") & (s["rank"] <= 5)].sort_values(["target_set", "rank"])
    _assert_rows(got, exp.reset_index(drop=True), ["target_set", "sample_id", "score", "rank", "percentile"])
    assert len(got) == 10


@pytest.mark.parametrize("fraction", [0.1, 0.25, 1.0])
def test_top_fraction(con, store, fraction):
    got = _frame(
        run_query(con, "top_fraction", {"target_set": "A", "method": "hyperinf", "fraction": fraction,
                                        "balance": False})
    )
    s = _scores(store)
    s = s[(s.target_set == "A") & (s.method == "hyperinf")].sort_values("score", ascending=False)
    exp = s.head(math.ceil(fraction * len(s)))
    _assert_rows(got, exp.reset_index(drop=True), ["sample_id", "score", "rank"])


@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_balanced_top_fraction_keeps_every_labels_share(con, store, fraction):
    """balance: the best ceil(fraction * n_c) of each label c, whatever the other labels' scores."""
    got = _frame(run_query(con, "top_fraction", {"target_set": "B", "method": "tracin", "fraction": fraction,
                                                 "balance": True}))
    s = _scores(store)
    s = s[(s.target_set == "B") & (s.method == "tracin")].copy()
    s["label"] = s["sample_id"].str[1:].astype(int) % 3  # the fixture's labels
    exp = pd.concat([g.sort_values(["rank", "sample_id"]).head(math.ceil(fraction * len(g)))
                     for _, g in s.groupby("label")]).sort_values(["rank", "sample_id"])
    _assert_rows(got, exp.reset_index(drop=True), ["sample_id", "score", "rank"])
    assert got["rank"].is_monotonic_increasing


@pytest.mark.parametrize(("query", "fraction", "rows"), [("top_fraction", 0.07, 7), ("top_fraction", 0.29, 29),
                                                          ("drop_harmful", 0.07, 93), ("top_fraction", 0.071, 8)])
def test_a_fraction_of_a_round_count_is_that_count(query, fraction, rows):
    """7% of 100 rows keeps 7: the float product 0.07 * 100 = 7.000000000000001 must not round up to 8."""
    con = duckdb.connect()
    con.execute("CREATE TABLE scores AS SELECT 'e' || i AS sample_id, 'A' AS target_set, 'hyperinf' AS method, "
                "-i::DOUBLE AS score, i AS rank, 1 - i / 100 AS percentile FROM range(1, 101) AS t(i)")
    con.execute("CREATE TABLE examples AS SELECT 'e' || i AS sample_id, i % 2 AS label FROM range(1, 101) AS t(i)")
    params = {"target_set": "A", "method": "hyperinf", "fraction": fraction}
    assert run_query(con, query, params | ({"balance": False} if query == "top_fraction" else {})).num_rows == rows
    if query == "top_fraction" and fraction < 0.071:  # balanced: 7% of each label's 50 rows is 3.5 -> 4 each
        assert run_query(con, query, params | {"balance": True}).num_rows == 8


@pytest.mark.parametrize(("issues", "kept"), [(10, 90), (40, 75)])
def test_drop_issues_drops_what_cleanlab_counts_up_to_max_fraction(issues, kept):
    """k = the issues cleanlab marks, at most ceil(max_fraction * n): a weak warm-up's flagged share is capped."""
    con = duckdb.connect()
    con.execute("CREATE TABLE scores AS SELECT 'e' || i AS sample_id, 'A' AS target_set, 'hyperinf' AS method, "
                "-i::DOUBLE AS score, i AS rank, 1 - i / 100 AS percentile FROM range(1, 101) AS t(i)")
    con.execute(f"CREATE TABLE label_suggestions AS SELECT 'e' || i AS sample_id, i <= {issues} AS issue "
                "FROM range(1, 101) AS t(i)")
    got = run_query(con, "drop_issues", {"target_set": "A", "method": "hyperinf", "max_fraction": 0.25})
    assert got["rank"].to_pylist() == list(range(1, kept + 1))  # the most harmful (highest ranks) go


def test_drop_harmful(con, store):
    got = _frame(run_query(con, "drop_harmful", {"target_set": "B", "method": "tracin", "fraction": 0.1}))
    s = _scores(store)
    s = s[(s.target_set == "B") & (s.method == "tracin")].sort_values(
        ["score", "sample_id"], ascending=[False, True]
    )
    exp = s.head(len(s) - math.ceil(0.1 * len(s)))  # the 4 lowest scores dropped
    _assert_rows(got, exp.reset_index(drop=True), ["sample_id", "score", "rank"])
    assert len(got) == N - 4


def test_class_balanced_top_k(con, store):
    got = _frame(run_query(con, "class_balanced_top_k", {"target_set": "A", "method": "tracin", "k": 3}))
    s = _scores(store).merge(_examples(store)[["sample_id", "label"]], on="sample_id")
    s = s[(s.target_set == "A") & (s.method == "tracin")]
    s = s.sort_values(["score", "sample_id"], ascending=[False, True])
    exp = s.groupby("label", sort=True).head(3).sort_values(["label", "score"], ascending=[True, False])
    _assert_rows(got, exp.reset_index(drop=True), ["label", "sample_id", "score"])
    assert got.groupby("label")["label_rank"].apply(list).tolist() == [[1, 2, 3]] * 3


def test_conflicts(con, store):
    got = _frame(run_query(con, "conflicts", {"set_a": "A", "set_b": "B", "method": "hyperinf"}))
    s = _scores(store)
    s = s[s.method == "hyperinf"]
    m = s[s.target_set == "A"].merge(s[s.target_set == "B"], on="sample_id", suffixes=("_a", "_b"))
    m = m[(m.score_a > 0) & (m.score_b < 0)].assign(gap=lambda d: d.score_a - d.score_b)
    exp = m.sort_values(["gap", "sample_id"], ascending=[False, True]).reset_index(drop=True)
    assert got["sample_id"].tolist() == exp["sample_id"].tolist() and len(got) > 0
    np.testing.assert_allclose(got["score"], exp["score_a"])
    np.testing.assert_allclose(got["hurt_score"], exp["score_b"])
    assert set(got["target_set"]) == {"A"} and set(got["hurt_set"]) == {"B"}


def test_mislabel_candidates(con, store):
    got = _frame(run_query(con, "mislabel_candidates", {"target_set": "A", "method": "hyperinf", "n": 6}))
    s = _scores(store).merge(_examples(store), on="sample_id")
    s = s[(s.target_set == "A") & (s.method == "hyperinf")]
    exp = s.sort_values(["score", "sample_id"], ascending=[True, False]).head(6).reset_index(drop=True)
    _assert_rows(got, exp, ["sample_id", "score", "rank", "text", "label", "source", "content_hash", "shard"])


def test_parameters_are_validated_and_bound_never_spliced(con):
    with pytest.raises(ConfigError, match=r"missing parameters \['k'\], unknown parameters \['K'\]"):
        run_query(con, "top_k", {"method": "tracin", "K": 5})
    with pytest.raises(ConfigError, match="no query 'nope'"):
        run_query(con, "nope", {})
    with pytest.raises(ConfigError, match="identifier"):
        run_query(con, "../etc/passwd", {})
    injected = {"target_set": "A' OR '1'='1", "method": "tracin", "fraction": 1.0, "balance": False}
    assert run_query(con, "top_fraction", injected).num_rows == 0


def test_every_query_documents_itself_and_takes_method():
    queries = list_queries()
    assert set(queries) >= {
        "top_k",
        "top_fraction",
        "drop_harmful",
        "class_balanced_top_k",
        "conflicts",
        "mislabel_candidates",
        "export_subset",
    }
    for info in queries.values():
        assert "Parameters:" in info.description and "method" in info.params, info.name
    assert sql_params("SELECT '$not' -- $nor\n, $yes /* $no */") == ("yes",)


def test_sync_copies_non_vector_tables_with_versions(store):
    versions = sync_duckdb(store)
    assert versions == store.versions()
    with duckdb.connect(f"{store.root}/{DUCKDB_FILE}", read_only=True) as db:
        recorded = dict(db.sql("SELECT table_name, version FROM _lance_versions").fetchall())
        assert recorded == versions
        assert "vector" not in db.sql("SELECT * FROM queries").columns
        assert "grad" not in db.sql("SELECT * FROM gradients").columns
        assert db.sql("SELECT count(*) FROM scores").fetchall()[0][0] == 4 * N
        assert db.sql("SELECT count(*) FROM examples WHERE source = 'web'").fetchall()[0][0] == N // 2
    # Live connections read fresh data; pinned ones read the versions they were given.
    live = connect(store, versions={"scores": versions["scores"]})
    assert live.sql("SELECT count(*) FROM scores").fetchall()[0][0] == 4 * N
    with pytest.raises(duckdb.CatalogException):
        live.sql("SELECT * FROM examples").fetchall()
    live.close()
