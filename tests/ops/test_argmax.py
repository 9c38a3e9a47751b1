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
    rows = 300 if DEVICE.type == "cuda" else 40  # the interpreter runs each of the rows x 9 chunk programs in Python
    x = torch.randn(rows, 130, device=DEVICE)[:, :129]
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


@pytest.mark.parametrize("backend", ["triton", "ref"])
def test_argmax_into_a_given_buffer(monkeypatch, backend):
    """``out=``: the tokens land in a slice of a wider buffer (a decode graph's input ids), nothing around it moves;
    a wrong buffer is a clear error."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("KILN_OPS", backend)
    x = torch.randn(3, 70, device=DEVICE)
    buf = torch.full((5,), -7, dtype=torch.int64, device=DEVICE)
    got = argmax.argmax_rows(x, chunk=16, out=buf[:3])
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:3], x.argmax(dim=-1)) and buf[3:].tolist() == [-7, -7]
    with pytest.raises(ValueError, match="out must be a contiguous"):
        argmax.argmax_rows(x, out=buf[:2])
    with pytest.raises(ValueError, match="out must have dtype"):
        argmax.argmax_rows(x, out=buf[:3].int())


# ----------------------------------------------------------------------------------------------- Gumbel sampling
def _gumbel(x, seeds, draws, chunk=None):
    counters = split_counters(x.device, x.shape[0])
    out = argmax._argmax_triton(x, counters, chunk, seeds, draws)
    assert int(counters.abs().sum()) == 0
    return out


@requires_triton
@pytest.mark.parametrize("V,chunk", [(7, None), (300, 64), (5000, None)])
def test_gumbel_argmax_matches_the_torch_philox_reference(V, chunk):
    """The kernel's noise is the reference's, bit for bit: with zero logits the argmax is the noise's alone."""
    g = torch.Generator(device=DEVICE).manual_seed(V)
    seeds = torch.tensor([0, 1, 2**40 + 7, -5, 2**63 - 1, -2**63], dtype=torch.int64, device=DEVICE)
    draws = torch.tensor([0, 3, 7, 2**31 + 1, 2**32 - 1, 12], dtype=torch.int64, device=DEVICE)
    for x in (torch.zeros(6, V, device=DEVICE), 3 * torch.randn(6, V, device=DEVICE, generator=g)):
        x[1, : V // 2] = float("-inf")  # filtered tokens (top-k / top-p) never win
        got = _gumbel(x, seeds, draws, chunk)
        ref = argmax.gumbel_argmax_reference(x.cpu(), seeds.cpu(), draws.cpu())
        assert torch.equal(got.cpu(), ref), (got, ref)
        assert (got[1] >= V // 2).item()


def test_philox_reference_draws_from_the_softmax():
    """20000 rows, one seed each: the sampled frequencies match softmax(x) (the Gumbel-max trick)."""
    p = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])
    n = 20000
    x = p.log().expand(n, 5)
    idx = argmax.gumbel_argmax_reference(x, torch.arange(n, dtype=torch.int64) * 7919 + 11, torch.zeros(n, dtype=torch.int64))
    freq = torch.bincount(idx, minlength=5).float() / n
    assert torch.all((freq - p).abs() < 4 * (p * (1 - p) / n).sqrt()), freq
    u = argmax.philox_uniform_reference(torch.tensor([3, 3, 3]), torch.tensor([0, 0, 1]), 1000)
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])   # a pure function of (seed, draw)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.03


def test_gumbel_public_op_checks(monkeypatch):
    x = torch.randn(3, 50, device=DEVICE)
    s = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="seeds must have dtype"):
        argmax.gumbel_argmax_rows(x, s.int(), s)
    with pytest.raises(ValueError, match="one entry per row"):
        argmax.gumbel_argmax_rows(x, s[:2], s[:2])
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="Triton backend only"):
            argmax.gumbel_argmax_rows(x, s, s)
        monkeypatch.setenv("KILN_OPS", "triton")
    got = argmax.gumbel_argmax_rows(x, s, s)
    assert torch.equal(got.cpu(), argmax.gumbel_argmax_reference(x.cpu(), s.cpu(), s.cpu()))
    assert argmax.gumbel_argmax_rows(x[:0], s[:0], s[:0]).shape == (0,)
