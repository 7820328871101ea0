"""Sequential reads of a fixed_size_list column (the gradient rows) at memory speed.

Lance (file format 2.1+) stores a non-null fixed_size_list of fixed-width values (the row formats' floats and
integer codes) of >= 256 bytes a row, without compression, as "full zip" pages whose one data buffer is the
rows' values back to back: exactly the bytes of a row-major (rows, D) array. Lance's decoder copies every page
through freshly allocated buffers: ~10 us of CPU per 16 KB row (4-6 page faults a row) on the 2 shared cores
this was measured on, several times the cost of the matmul that consumes the row. Mapping those bytes read-only (`mmap`, a window of `batch_rows` rows at a time) and
viewing them as a (rows, D) array costs nothing but the page-cache lookups.

`plain_pages` accepts a fragment for direct reads only when all of these hold: the data file is local, the
fragment has no deletion vector, every page of the column is exactly that plain layout (its encoding, read from
`LanceFileReader` metadata, matches the one pattern below in full), the page sizes and rows add up to the
fragment's rows, and the first row of every page and the fragment's last row read directly equal Lance's own
decode of them (`take`). Any other fragment is read by Lance's scanner: the same rows in the same order, only
slower. `iter_fixed_rows` yields either way.
"""

from __future__ import annotations

import mmap
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import lance
import numpy as np
import pyarrow as pa
from lance.file import LanceFileReader

__all__ = ["MAX_READ_BYTES", "Page", "iter_fixed_rows", "plain_pages"]

# The encoding (Debug text of Lance's PageLayout, whitespace collapsed, every number replaced by #) of a plain page.
# The numbers, in order: bits_rep (0), bits_def (0), num_items, num_visible_items, items_per_value (D),
# bits_per_value (8, 16 or 32), bits per row (D * bits_per_value).
_PLAIN_PAGE = (
    "PageLayout { layout: Some( FullZipLayout( FullZipLayout { bits_rep: #, bits_def: #, num_items: #, "
    "num_visible_items: #, value_compression: Some( CompressiveEncoding { compression: Some( FixedSizeList( "
    "FixedSizeList { items_per_value: #, has_validity: false, values: Some( CompressiveEncoding { compression: "
    "Some( Flat( Flat { bits_per_value: #, data: None, }, ), ), }, ), }, ), ), }, ), layers: [ "
    "RepdefAllValidItem, ], details: Some( BitsPerValue( #, ), ), }, ), ), }"
)
_NUMBER = re.compile(r"\d+")
# Rows per batch are capped so that one batch stays under this many bytes whatever the row width.
MAX_READ_BYTES = 32 << 20


@dataclass(frozen=True)
class Page:
    """`rows` consecutive rows of a column stored back to back at byte `offset` of the data file `path`."""

    path: str
    offset: int
    rows: int


def _local_root(uri: str) -> str | None:
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    return None if "://" in uri else uri


def _page_rows(encoding: str, dim: int, bits: int) -> int | None:
    """Rows of a page with the plain layout for rows of `dim` values of `bits` bits; None for any other page."""
    text = " ".join(encoding.split())
    if _NUMBER.sub("#", text) != _PLAIN_PAGE:
        return None
    rep, defn, items, visible, per_value, value_bits, row_bits = (int(v) for v in _NUMBER.findall(text))
    if (rep, defn, per_value, value_bits, row_bits) != (0, 0, dim, bits, dim * bits) or items != visible:
        return None
    return items


def _read_exact(file: BinaryIO, out: memoryview, offset: int) -> None:
    file.seek(offset)
    done = 0
    while done < len(out):
        got = file.readinto(out[done:])
        if not got:
            raise OSError(f"short read at byte {offset + done} of a Lance data file")
        done += got


def plain_pages(ds: lance.LanceDataset, fragment: lance.LanceFragment, column: str) -> list[Page] | None:
    """The pages of `column` in `fragment` when they can be read directly (see the module docstring), else None."""
    root = _local_root(ds.uri)
    value_type = ds.schema.field(column).type
    if root is None or fragment.metadata.deletion_file is not None or not pa.types.is_fixed_size_list(value_type):
        return None
    np_type = {pa.float16(): np.float16, pa.float32(): np.float32, pa.int8(): np.int8,
               pa.uint8(): np.uint8}.get(value_type.value_type)
    if np_type is None:
        return None
    dim, itemsize = value_type.list_size, np.dtype(np_type).itemsize
    field_id = next(f.id() for f in ds.lance_schema.fields() if f.name() == column)
    files = [f for f in fragment.metadata.files if field_id in f.fields]
    if len(files) != 1 or files[0].base_id is not None or (files[0].file_major_version, files[0].file_minor_version) < (2, 1):
        return None
    data_file = files[0]
    path = os.path.join(root, "data", data_file.path)
    try:
        if data_file.file_size_bytes and os.path.getsize(path) != data_file.file_size_bytes:
            return None
        column_meta = LanceFileReader(path).metadata().columns[data_file.column_indices[data_file.fields.index(field_id)]]
    except Exception:  # any surprise in the file or its metadata: Lance's scanner reads this fragment
        return None
    pages = []
    for page in column_meta.pages:
        rows = _page_rows(page.encoding, dim, 8 * itemsize)
        if rows is None or len(page.buffers) != 1 or page.buffers[0].size != rows * dim * itemsize:
            return None
        pages.append(Page(path, page.buffers[0].position, rows))
    n = fragment.metadata.physical_rows
    if sum(p.rows for p in pages) != n or n == 0:
        return None
    # Spot check against Lance's own decode: the first row of every page and the last row.
    starts = np.cumsum([0] + [p.rows for p in pages[:-1]])
    checked = sorted({*starts.tolist(), n - 1})
    expected = fragment.take(checked, columns=[column]).column(column).combine_chunks()
    expected = expected.flatten().to_numpy(zero_copy_only=False).reshape(len(checked), dim)
    got = np.empty((len(checked), dim), dtype=np_type)
    with open(path, "rb") as file:
        for i, row in enumerate(checked):
            page = int(np.searchsorted(starts, row, side="right")) - 1
            offset = pages[page].offset + (row - int(starts[page])) * dim * itemsize
            _read_exact(file, memoryview(got[i].view(np.uint8)), offset)
    if got.tobytes() != expected.tobytes():
        warnings.warn(f"Lance page layout of {column!r} in {path} is not the expected plain layout; "
                      "reading it with Lance's scanner", RuntimeWarning, stacklevel=2)
        return None
    return pages


def _values(batch: pa.RecordBatch, column: str) -> np.ndarray:
    col = batch.column(column)
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def iter_fixed_rows(
    ds: lance.LanceDataset, column: str, columns: Sequence[str], batch_rows: int
) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """Every row of `ds` in scan order: (the `columns` of up to `batch_rows` rows, their `column` values as a
    read-only (b, D) array of the column's dtype). Direct fragments yield views of a read-only mapping of the
    data file (never write through a tensor made from one: the page is mapped read-only), released when the
    array and every view of it are dropped; Lance's scanner decodes the others two batches ahead. Memory: the
    batches the caller holds (at most MAX_READ_BYTES of values each) plus one fragment's `columns`, whatever
    the table size.
    """
    value_type = ds.schema.field(column).type
    dim = value_type.list_size
    row_bytes = dim * value_type.value_type.bit_width // 8
    batch_rows = max(1, min(batch_rows, MAX_READ_BYTES // row_bytes))
    dtype = np.dtype(value_type.value_type.to_pandas_dtype())
    for fragment in ds.get_fragments():
        pages = plain_pages(ds, fragment, column)
        if pages is None:
            for batch in fragment.to_batches(columns=[*columns, column], batch_size=batch_rows, batch_readahead=2):
                yield batch.select(list(columns)), _values(batch, column)
            continue
        others = fragment.to_table(columns=list(columns)).combine_chunks()
        row = 0
        with open(pages[0].path, "rb") as file:
            for page in pages:
                for start in range(0, page.rows, batch_rows):
                    n = min(batch_rows, page.rows - start)
                    offset = page.offset + start * row_bytes
                    base = offset - offset % mmap.ALLOCATIONGRANULARITY
                    window = mmap.mmap(file.fileno(), offset - base + n * row_bytes, access=mmap.ACCESS_READ,
                                       offset=base)
                    values = np.frombuffer(window, dtype=dtype, count=n * dim, offset=offset - base)
                    yield others.slice(row, n).to_batches()[0], values.reshape(n, dim)
                    row += n
