"""The chunked row argmax (greedy sampling) vs torch.argmax: ties, NaN, -inf, one element, many chunks."""

import pytest
import torch

from kiln.ops import argmax
from kiln.ops._counters import split_counters
from tests.conftest import DEVICE, requires_triton


def run(x, chunk=None):
    counters = split_counters(x.device, x.shape[0])
    out = argmax._argmax_triton(x, counters, chunk)
    assert int(counters.abs().sum()) == 0  # every row's last chunk reset its counter
    return out


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V,chunk", [(1, None), (15, None), (1000, 64), (1000, 1024), (20000, None)])
def test_argmax_matches_torch(dtype, V, chunk):
    g = torch.Generator(device=DEVICE).manual_seed(V)
    x = torch.randn(6, V, device=DEVICE, dtype=dtype, generator=g)
    if V > 20:
        x[1, V // 3] = x[1, 2 * V // 3] = x[1, V - 1] = 50.0   # ties across chunks: the first wins
        x[2, :] = float("-inf")                                 # all -inf: index 0, like torch
        x[3, V - 1] = float("inf")
        x[4, 5] = x[4, V - 2] = float("nan")                    # NaN ranks highest: the first NaN
        x[5, 7] = x[5, 9] = 60.0                                # a tie inside one chunk
    got = run(x, chunk)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))


@requires_triton
def test_argmax_of_a_strided_view_and_many_rows():
    x = torch.randn(300, 130, device=DEVICE)[:, :129]
    assert torch.equal(run(x, 16), x.argmax(dim=-1))


def test_public_op_checks_and_falls_back(monkeypatch):
    x = torch.randn(3, 50, device=DEVICE)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("KILN_OPS", "triton")
    assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1))
    assert argmax.argmax_rows(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="x must have 2 dims"):
        argmax.argmax_rows(x[0])
    with pytest.raises(ValueError, match="non-empty last dim"):
        argmax.argmax_rows(x[:, :0])
    with pytest.raises(ValueError, match="x must have dtype"):
        argmax.argmax_rows(x.long())
