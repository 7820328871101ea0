"""Queries times integer-coded rows without decoding (code_product.py) equal the product with the decoded rows."""

from __future__ import annotations

import pytest
import torch

from hyperinf_ops.core.code_product import IntegerCodeProduct
from hyperinf_ops.core.row_format import RowFormat


@pytest.mark.parametrize("dtype, blocks", [("int4", (24, 16, 24)), ("int4", (24, 16, 7)), ("int8", (24, 5, 24)),
                                           ("int8", (3,))])
def test_code_product_equals_the_decoded_rows_matmul(dtype, blocks):
    """Every block with its own step, an odd last int4 block (a padding nibble), uneven chunks (13 rows of 5)."""
    fmt = RowFormat(dtype, blocks)
    gen = torch.Generator().manual_seed(0)
    scale = torch.cat([torch.full((size,), s) for size, s in zip(blocks, (1.0, 1e-3, 30.0), strict=False)])
    rows = torch.randn(13, fmt.width, generator=gen) * scale
    enc = fmt.encode(rows)
    values, steps = torch.from_numpy(enc.values), torch.from_numpy(enc.block_scales)
    decoded = fmt.decode(values, torch.from_numpy(enc.grad_scale), steps).double()
    q = torch.randn(3, fmt.width, generator=gen)
    product = IntegerCodeProduct(fmt, q, chunk_rows=5)
    got = torch.cat([product(values[i: i + 5], steps[i: i + 5]) for i in range(0, 13, 5)]).double()
    want = decoded @ q.double().T
    bound = 1e-6 * decoded.norm(dim=1, keepdim=True) * q.double().norm(dim=1)  # float32 rounding of the sums
    assert got.shape == (13, 3) and bool(((got - want).abs() <= bound).all())


def test_code_product_refuses_what_it_cannot_take():
    assert not IntegerCodeProduct.supports(RowFormat("int4", (3, 4)))  # a byte would straddle two steps
    assert IntegerCodeProduct.supports(RowFormat("int4", (4, 3))) and IntegerCodeProduct.supports(RowFormat("int8", (3, 4)))
    assert not IntegerCodeProduct.supports(RowFormat("float16", (4,)))
    with pytest.raises(ValueError, match="no code product"):
        IntegerCodeProduct(RowFormat("int4", (3, 4)), torch.zeros(1, 7), 4)
    with pytest.raises(ValueError, match="no code product"):
        IntegerCodeProduct(RowFormat("int8", (4,)), torch.zeros(1, 4, dtype=torch.float64), 4)
    product = IntegerCodeProduct(RowFormat("int8", (4,)), torch.zeros(1, 4), 4)
    with pytest.raises(ValueError, match="5 rows"):
        product(torch.zeros(5, 4, dtype=torch.int8), torch.ones(5, 1))
