"""gllm.model.kernels: the CPU's float32 products of float16 weights, converted a block at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gllm.model import kernels
from gllm.model.kernels import ModelKernels, upcast_linear


@pytest.mark.parametrize("n,k,rows", [(49152, 576, 16), (1000, 64, 17), (300, 2048, 40), (5, 8, 64), (4096, 1024, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_an_upcast_product_in_blocks_is_the_whole_float32_product_bit_for_bit(n, k, rows, with_bias, monkeypatch):
    torch.manual_seed(n + k)
    monkeypatch.setattr(kernels, "UPCAST_BLOCK_ROWS", 256)   # several blocks, the last one short
    monkeypatch.setattr(kernels, "UPCAST_BLOCK_BYTES", 256 * 4 * 1024)  # (4096 x 1024: blocks of 256 rows too)
    weight = torch.randn(n, k).half()
    bias = torch.randn(n).half() if with_bias else None
    x = torch.randn(rows, k).half()
    whole = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    assert torch.equal(upcast_linear(x, weight, bias), whole)


def test_only_wide_float16_products_are_upcast():
    kern = ModelKernels(upcast_rows=16)
    weight, x = torch.randn(64, 32).half(), torch.randn(16, 32).half()
    assert torch.equal(kern.product(x, weight), F.linear(x.float(), weight.float()).half())
    assert torch.equal(kern.product(x[:15], weight), F.linear(x[:15], weight))
