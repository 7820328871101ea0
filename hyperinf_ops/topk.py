"""The k most helpful / most harmful rows for one stored query, without scanning every full row.

The exact answer is `score_k = <q, row_k>` over every decoded row (scorer.py). A vector index over the full rows
is out of reach at the product's scale (a default MiniLM row is 73,728 values; an IVF build over 1M of them on
two cores takes hours), so the index holds a reduced representation and only proposes candidates:

    basis    B (m, D): the first m principal directions (uncentred) of a seeded sample of decoded rows
    index    z_k = B row_k, (m,) float32 per row, in a Lance table with an IVF_HNSW_SQ index, metric "dot"
    search   the `candidates` rows with the largest <z_k, B q>: "lance" asks the index (metric dot; Lance orders
             by -<., .>: the largest first), "flat" scores every z_k held in memory (one (n, m) matrix-vector
             product: ~20 ms for 1M rows at m = 128 on one thread, exact in the reduced space, and measured
             faster and of higher recall than the HNSW search at every candidate count tried);
             harmful = the most negative scores = the largest <-q, row>, so it searches with -B q
    rerank   the candidates' stored rows are read by position from a memory-mapped view of their Lance pages
             (store/vectors.py `plain_pages`; Lance's `take`, 0.2-0.6 s a call whatever the count, only for
             other layouts) and scored exactly (integer codes by the scorer's code product): returned scores are
             exact, and the rerank costs what the exact scan costs for as many rows

Recall is lost only where a true top-k row is not among the candidates. Principal directions rather than a
random projection: on the demo's real rows (4,000, default int4, hyperinf query) 256 principal directions rank
with Spearman 0.92 against the exact scores, a 256-dim Gaussian projection with 0.22 (the score lives in the
rows' dominant directions plus the query-weighted tail, and a random projection spreads every direction's
error over all of them). benchmarks/bench_ann.py measures recall@100 and the speed-up against the exact scan.

The index is built for one gradients table version and fingerprint (both in the index table's metadata) and
answers only queries of that fingerprint, on that version.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lance
import numpy as np
import pyarrow as pa
import torch

from hyperinf_ops.core.code_product import IntegerCodeProduct
from hyperinf_ops.core.row_format import RowFormat
from hyperinf_ops.errors import DataError, FingerprintMismatchError, GradientMismatchError
from hyperinf_ops.store import LanceStore, Query
from hyperinf_ops.store.vectors import iter_fixed_rows, plain_pages

__all__ = ["BASIS_TABLE", "INDEX_TABLE", "IndexInfo", "TopK", "TopKIndex", "build_index", "fit_basis", "read_index_info", "top_k"]

INDEX_TABLE = "topk_index"
BASIS_TABLE = "topk_basis"
_META_KEY = b"hyperinf.topk"
_BATCH_ROWS = 1024


@dataclass(frozen=True)
class IndexInfo:
    """What an index was built from: the gradient rows' fingerprint digest and table version, `rows` rows
    reduced to `dims` principal directions (basis digest `basis`), the Lance index type and its partitions;
    `seconds`: the build's wall time (basis + projection + index)."""

    fingerprint: str
    gradients_version: int
    rows: int
    dims: int
    basis: str
    index_type: str
    num_partitions: int
    seconds: float


@dataclass(frozen=True)
class TopK:
    """The k rows answered, best first: `sample_ids` (k,), their exact `scores` (k,) float64 (descending when
    helpful, ascending when harmful), and `candidates`, the rows the index proposed and the rerank scored;
    `search_seconds` / `rerank_seconds`: the candidate stage's and the rerank's wall time."""

    sample_ids: list[str]
    scores: np.ndarray
    candidates: int
    search_seconds: float = 0.0
    rerank_seconds: float = 0.0


def _meta_columns(fmt: RowFormat) -> list[str]:
    return ["sample_id", "grad_scale", *(["block_scales"] if fmt.integer else [])]


def _decode(fmt: RowFormat, values: np.ndarray, meta: pa.RecordBatch | pa.Table) -> torch.Tensor:
    """(b, stored_width) stored values + their scale columns -> (b, width) float32 rows."""
    scales = None
    if fmt.integer:
        col = meta.column("block_scales")
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        scales = torch.from_numpy(col.flatten().to_numpy().reshape(len(col), -1).copy())
    grad_scale = torch.from_numpy(np.array(meta.column("grad_scale").to_numpy(), dtype=np.float32))
    return fmt.decode(torch.from_numpy(np.array(values)), grad_scale, scales)


def _take_rows(ds: lance.LanceDataset, fmt: RowFormat, positions: np.ndarray) -> tuple[list[str], torch.Tensor]:
    """The rows at `positions` (offsets in scan order) as (sample_ids, (n, width) float32 decoded rows)."""
    table = ds.take(positions, columns=[*_meta_columns(fmt), "grad"])
    grad = table.column("grad").combine_chunks()
    values = grad.flatten().to_numpy(zero_copy_only=False).reshape(len(grad), -1)
    return table.column("sample_id").to_pylist(), _decode(fmt, values, table)


def fit_basis(ds: lance.LanceDataset, fmt: RowFormat, dims: int, sample_rows: int, seed: int) -> np.ndarray:
    """(dims, D) float32 orthonormal rows: the first `dims` principal directions (uncentred: scores are inner
    products, so the mean direction matters like any other) of `sample_rows` seeded rows of `ds`.

    Through the sample's Gram matrix (s x s, s = sample size): D is 73,728 for MiniLM, s a few thousand."""
    n = ds.count_rows()
    positions = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample_rows), replace=False))
    _, x = _take_rows(ds, fmt, positions)
    # The Gram product in float32 (in float64 it took 100 s for 4,000 MiniLM rows), its eigenvectors in float64.
    values, vectors = torch.linalg.eigh((x @ x.T).double())
    keep = torch.argsort(values, descending=True)[:dims]
    keep = keep[values[keep] > values.max() * 1e-7]  # a rank-deficient sample has fewer directions
    if len(keep) < dims:
        raise DataError(f"the {len(positions)} sampled rows span only {len(keep)} directions, {dims} asked: "
                        "lower dims or sample more rows")
    basis = (vectors[:, keep] / values[keep].sqrt()).float().T @ x
    return basis.numpy()


def _digest(basis: np.ndarray) -> str:
    return hashlib.sha256(basis.tobytes()).hexdigest()[:16]


def _fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), values.shape[1])


def _projected(ds: lance.LanceDataset, fmt: RowFormat, basis: torch.Tensor) -> Iterator[pa.RecordBatch]:
    """Every row of `ds` in scan order as a batch of (pos int64, sample_id, vec (m,) float32 = basis @ row)."""
    pos = 0
    for meta, values in iter_fixed_rows(ds, "grad", _meta_columns(fmt), _BATCH_ROWS):
        z = (_decode(fmt, values, meta) @ basis.T).numpy()
        yield pa.record_batch([pa.array(np.arange(pos, pos + len(z))), meta.column("sample_id"), _fixed(z)],
                              names=["pos", "sample_id", "vec"])
        pos += len(z)


def build_index(store: LanceStore, *, dims: int = 256, sample_rows: int = 2048, seed: int = 0,
                num_partitions: int | None = None, version: int | None = None) -> IndexInfo:
    """Build the reduced-row index of the gradients table at `version` (default latest); replaces any earlier.

    dims: m, the principal directions kept; sample_rows: rows the basis is fitted on (seeded by `seed`);
    num_partitions: IVF lists (default ~sqrt(rows) / 4, >= 1). Writes the basis table first and the index
    table second, the index naming the basis digest, so a reader never pairs an index with another basis.
    """
    start = time.perf_counter()
    ds = store.open("gradients", version)
    fp = store.fingerprint("gradients", ds.version)
    if fp is None:
        raise DataError("the gradients table has no rows to index")
    fmt = fp.row_format
    basis = fit_basis(ds, fmt, dims, sample_rows, seed)
    rows = ds.count_rows()
    partitions = num_partitions or max(1, round(math.sqrt(rows) / 4))
    info = IndexInfo(fingerprint=fp.digest(), gradients_version=ds.version, rows=rows, dims=dims,
                     basis=_digest(basis), index_type="IVF_HNSW_SQ", num_partitions=partitions, seconds=0.0)
    meta = {_META_KEY: json.dumps({k: v for k, v in info.__dict__.items() if k != "seconds"}).encode()}
    basis_table = pa.table({"direction": pa.array(np.arange(dims, dtype=np.int32)), "vector": _fixed(basis)})
    lance.write_dataset(basis_table.replace_schema_metadata(meta), store.uri(BASIS_TABLE), mode="overwrite",
                        storage_options=store.storage_options)
    schema = pa.schema([("pos", pa.int64()), ("sample_id", pa.string()), ("vec", pa.list_(pa.float32(), dims))],
                       metadata=meta)
    reader = pa.RecordBatchReader.from_batches(schema, _projected(ds, fmt, torch.from_numpy(basis)))
    index = lance.write_dataset(reader, store.uri(INDEX_TABLE), mode="overwrite",
                                storage_options=store.storage_options)
    index.create_index("vec", index_type="IVF_HNSW_SQ", metric="dot", num_partitions=partitions, replace=True)
    return IndexInfo(**{**info.__dict__, "seconds": time.perf_counter() - start})


def read_index_info(store: LanceStore) -> IndexInfo:
    """The stored index's IndexInfo (seconds = 0); DataError when there is none."""
    if not store.exists(INDEX_TABLE):
        raise DataError("no top-k index: build one first (topk.build_index)")
    meta = store.open(INDEX_TABLE).schema.metadata or {}
    return IndexInfo(**json.loads(meta[_META_KEY]), seconds=0.0)


class _RowReader:
    """The gradient rows at given scan positions, read from a memory-mapped view of their Lance pages (the plain
    layout `store.vectors.plain_pages` accepts) when every fragment allows it, else through Lance's `take`; their
    scale columns (and sample ids) held in memory from the open. `take` costs 0.2-0.6 s per call whatever the
    count; a mapped gather costs the page-cache copies of the rows asked."""

    def __init__(self, ds: lance.LanceDataset, fmt: RowFormat) -> None:
        self._ds, self._format = ds, fmt
        meta = ds.to_table(columns=_meta_columns(fmt)).combine_chunks()
        self.sample_ids = meta.column("sample_id").combine_chunks()
        self._grad_scale = np.array(meta.column("grad_scale").to_numpy(), dtype=np.float32)
        self._steps = None
        if fmt.integer:
            col = meta.column("block_scales").combine_chunks()
            self._steps = np.array(col.flatten().to_numpy(), dtype=np.float32).reshape(len(col), -1)
        self._pages: list[np.ndarray] | None = []
        starts = []
        value_type = ds.schema.field("grad").type
        dtype = np.dtype(value_type.value_type.to_pandas_dtype())
        pos = 0
        for fragment in ds.get_fragments():
            pages = plain_pages(ds, fragment, "grad")
            if pages is None:
                self._pages = None
                break
            for page in pages:
                self._pages.append(np.memmap(page.path, dtype=dtype, mode="r", offset=page.offset,
                                             shape=(page.rows, value_type.list_size)))
                starts.append(pos)
                pos += page.rows
        self._starts = np.array(starts, dtype=np.int64)
        self.mapped = self._pages is not None

    def values(self, positions: np.ndarray) -> np.ndarray:
        """(n, stored_width) stored values of the rows at `positions` (ascending scan positions)."""
        if self._pages is None:
            grad = self._ds.take(positions, columns=["grad"]).column("grad").combine_chunks()
            return grad.flatten().to_numpy(zero_copy_only=False).reshape(len(grad), -1)
        page = np.searchsorted(self._starts, positions, side="right") - 1
        out = np.empty((len(positions), self._pages[0].shape[1]), dtype=self._pages[0].dtype)
        bounds = np.flatnonzero(np.diff(page)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(positions)], strict=True):
            p = page[lo]
            out[lo:hi] = self._pages[p][positions[lo:hi] - self._starts[p]]
        return out

    def scores(self, positions: np.ndarray, q: np.ndarray) -> np.ndarray:
        """(n,) float64 exact scores <q, row> of the rows at `positions` (ascending), as the scorer computes them
        (integer codes multiplied without decoding where the code product supports the format)."""
        values = torch.from_numpy(self.values(positions))
        qt = torch.from_numpy(q)[None, :]
        if self._steps is not None and IntegerCodeProduct.supports(self._format):
            chunk = max(1, (4 << 20) // (4 * self._format.width))
            product = IntegerCodeProduct(self._format, qt, chunk)
            steps = torch.from_numpy(self._steps[positions])
            parts = [product(values[i: i + chunk], steps[i: i + chunk]) for i in range(0, len(values), chunk)]
            return torch.cat(parts)[:, 0].double().numpy() if parts else np.zeros(0)
        scales = torch.from_numpy(self._steps[positions]) if self._steps is not None else None
        rows = self._format.decode(values, torch.from_numpy(self._grad_scale[positions]), scales)
        return (rows.double() @ qt[0].double()).numpy()


class TopKIndex:
    """The stored index, opened once for many queries: its IndexInfo, the basis (m, D) float32 in memory (75 MB for
    MiniLM at m = 256: reading it is most of a cold query), the gradients table version it indexes, and its
    rows' scale columns and sample ids (for the rerank). `projections` (n, m) float32, every row's projection,
    is read into memory on the first `search="flat"` query (4 bytes x m a row: 512 MB at 1M rows, m = 128)."""

    def __init__(self, store: LanceStore) -> None:
        self.info = read_index_info(store)
        self._index = store.open(INDEX_TABLE)
        self._gradients = store.open("gradients")
        if self._gradients.version != self.info.gradients_version:
            raise DataError(f"the top-k index was built on gradients version {self.info.gradients_version}, the "
                            f"table is at {self._gradients.version}: rebuild it")
        self._format = store.fingerprint("gradients").row_format
        basis_ds = store.open(BASIS_TABLE)
        if json.loads((basis_ds.schema.metadata or {}).get(_META_KEY, b"{}")).get("basis") != self.info.basis:
            raise DataError("the top-k basis and index tables are from different builds: rebuild the index")
        col = basis_ds.to_table(columns=["vector"]).column("vector").combine_chunks()
        self.basis = col.flatten().to_numpy().reshape(len(col), -1)
        self._rows = _RowReader(self._gradients, self._format)
        if len(self._rows.sample_ids) != self.info.rows or self._index.count_rows() != self.info.rows:
            raise DataError("the top-k index's rows do not match the gradients table: rebuild it")
        self.projections: np.ndarray | None = None

    def _load_projections(self) -> np.ndarray:
        table = self._index.to_table(columns=["pos", "sample_id", "vec"])
        pos = table.column("pos").to_numpy()
        if not np.array_equal(pos, np.arange(self.info.rows)) or not table.column("sample_id").combine_chunks().equals(
                self._rows.sample_ids):
            raise DataError("the top-k index's rows do not match the gradients table: rebuild it")
        vec = table.column("vec").combine_chunks()
        return np.ascontiguousarray(vec.flatten().to_numpy().reshape(len(vec), -1))

    def top_k(self, query: Query, k: int = 100, *, harmful: bool = False, candidates: int | None = None,
              nprobes: int | None = None, ef: int | None = None, refine_factor: int | None = None,
              search: str = "lance") -> TopK:
        """The k most helpful (largest score) or, with `harmful`, most harmful (most negative score) rows for
        `query` (a (D,) vector laid out like the decoded rows, as stored in `queries`).

        candidates: rows proposed for the exact rerank (default 10 k; more = higher recall, slower);
        search: "lance" (the IVF_HNSW_SQ index: nprobes IVF lists, default half of them, a quarter lost 16%
        recall@50 on the test's table; ef: the HNSW search list, Lance's default when None; refine_factor: Lance
        re-scores refine_factor x candidates unquantized projections, none when None) or "flat" (every
        row's projection in memory scored by one matrix-vector product: exact in the reduced space).
        The candidates' stored rows are read (memory-mapped where the pages allow) and scored exactly.
        Refuses (FingerprintMismatchError) a query of another fingerprint than the index's and
        (GradientMismatchError) one of another width.
        """
        if query.fingerprint != self.info.fingerprint:
            raise FingerprintMismatchError(f"query {query.target_set}/{query.method} was built for fingerprint "
                                           f"{query.fingerprint}, the top-k index for {self.info.fingerprint}")
        q = np.asarray(query.vector, dtype=np.float32).reshape(-1)
        if q.size != self.basis.shape[1]:
            raise GradientMismatchError(f"query has {q.size} dims, the indexed rows {self.basis.shape[1]}")
        if search not in ("lance", "flat"):
            raise ValueError(f"search must be 'lance' or 'flat', not {search!r}")
        start = time.perf_counter()
        sign = -1.0 if harmful else 1.0
        reduced = (sign * (self.basis @ q)).astype(np.float32)
        count = min(candidates or 10 * k, self.info.rows)
        if search == "flat":
            if self.projections is None:
                self.projections = self._load_projections()
            approx = self.projections @ reduced
            positions = (np.argpartition(-approx, count - 1)[:count] if count < len(approx)
                         else np.arange(len(approx)))
        else:
            nearest = {"column": "vec", "q": reduced, "k": count,
                       "nprobes": nprobes or max(1, math.ceil(self.info.num_partitions / 2))}
            if ef is not None:
                nearest["ef"] = ef
            if refine_factor is not None:
                nearest["refine_factor"] = refine_factor
            found = self._index.to_table(nearest=nearest, columns=["pos", "sample_id"],
                                         disable_scoring_autoprojection=True)
            positions = found.column("pos").to_numpy()
            if not found.column("sample_id").combine_chunks().equals(self._rows.sample_ids.take(positions)):
                raise DataError("the top-k index's rows do not match the gradients table: rebuild it")
        positions = np.sort(positions)  # the rows are read in file order
        searched = time.perf_counter()
        exact = self._rows.scores(positions, q)
        best = np.argsort(-sign * exact, kind="stable")[:k]
        ids = self._rows.sample_ids.take(positions[best]).to_pylist()
        return TopK(sample_ids=ids, scores=exact[best], candidates=len(positions),
                    search_seconds=searched - start, rerank_seconds=time.perf_counter() - searched)


def top_k(store: LanceStore, query: Query, k: int = 100, **options: Any) -> TopK:
    """One query against the stored index: `TopKIndex(store).top_k(query, k, **options)`; DataError when the
    index is missing or older than the gradients table (rebuild it)."""
    return TopKIndex(store).top_k(query, k, **options)
