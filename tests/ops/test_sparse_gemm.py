"""Sparse-conv GEMM kernels (implicit GEMM fwd / dgrad, split weight grad) vs their references.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (tiny shapes); on a GPU at full size."""

import pytest
import torch

from kiln.ops import sparse_gemm as sg
from tests.conftest import DEVICE, requires_triton

BIG = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _gen():
    return torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _problem(dtype, g, n_in, n_out, K, cin, cout):
    x = torch.randn(n_in + 5, cin + 3, device=DEVICE, dtype=dtype, generator=g)[5:, 1:cin + 1]  # strided view
    w_krsc = torch.randn(cout, K, cin, device=DEVICE, dtype=dtype, generator=g) / 8
    w = w_krsc.permute(1, 2, 0)  # [K, Cin, Cout] view of the KRSC layout, never copied
    pm = sg._random_rulebook(n_in, n_out, K, DEVICE, g)
    return x, w, pm


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheduled", [False, True])
def test_implicit_gemm_triton_matches_reference(dtype, scheduled):
    g = _gen()
    shape = (20000, 15000, 27, 64, 96) if BIG else (37, 29, 7, 20, 18)
    x, w, pm = _problem(dtype, g, *shape)
    masks = sg.offset_masks(pm)
    order = sg.mask_order(masks) if scheduled else None
    got = sg._implicit_gemm_triton(x, w, pm, order, masks if scheduled else None)
    ref = sg.implicit_gemm_ref(x.float(), w.float(), pm)
    assert rel_err(got, ref) <= RTOL[dtype]
    # rows without any pair must come out exactly zero
    empty = (pm < 0).all(1)
    assert torch.all(got[empty] == 0)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_grad_triton_matches_reference(dtype):
    g = _gen()
    shape = (20000, 15000, 27, 64, 96) if BIG else (150, 120, 5, 20, 18)
    x, _, pm = _problem(dtype, g, *shape)
    in_idx, out_idx, counts = sg.pairs_from_map(pm)
    dy = torch.randn(pm.shape[0], shape[4], device=DEVICE, dtype=dtype, generator=g)
    got = sg._weight_grad_triton(x, dy, in_idx, out_idx, counts)
    ref = sg.weight_grad_ref(x.float(), dy.float(), in_idx, out_idx, counts)
    assert rel_err(got, ref) <= RTOL[dtype]
    again = sg._weight_grad_triton(x, dy, in_idx, out_idx, counts)
    assert torch.equal(got, again), "weight gradient is bit-reproducible (no atomics)"


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scatter_and_implicit_references_agree(dtype):
    g = _gen()
    x, w, pm = _problem(dtype, g, 61, 45, 9, 12, 10)
    in_idx, out_idx, counts = sg.pairs_from_map(pm)
    a = sg.gather_gemm_scatter(x, w, in_idx, out_idx, counts, pm.shape[0])
    b = sg.implicit_gemm_ref(x, w, pm)
    ref = sg.implicit_gemm_ref(x.float(), w.float(), pm)
    assert rel_err(a, ref) <= RTOL[dtype] and rel_err(b, ref) <= RTOL[dtype]


def test_sparse_gemm_rejects_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="input channels"):
        sg.implicit_gemm(x, torch.randn(2, 5, 4), torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="pair_map must have dtype"):
        sg.implicit_gemm(x, torch.randn(2, 3, 4), torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="offsets"):
        sg.implicit_gemm(x, torch.randn(2, 3, 4), torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight must have dtype"):
        sg.gather_gemm_scatter(x, torch.randn(2, 3, 4).half(), torch.zeros(0, dtype=torch.long),
                               torch.zeros(0, dtype=torch.long), [0, 0], 4)
