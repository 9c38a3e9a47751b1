"""The whole sparse stack on the Triton path (hash-table rulebooks + implicit GEMM + split weight grad), under
TRITON_INTERPRET=1 on a CPU, against the reference path; and deterministic mode."""

import pytest
import torch

import kiln.sparse as sp
from kiln.ops import sparse_gemm
from kiln.sparse import rulebook as rbmod
from tests.conftest import DEVICE, requires_triton

from .helpers import random_voxels, rel_err


def _scene(n=60, shape=(5, 9, 8), batch=2, cin=4, seed=0, device=DEVICE):
    feats, idx, shape, batch = random_voxels(n, shape, batch, cin, seed)
    return feats.to(device), idx.to(device), shape, batch


def _net():
    return sp.SparseSequential(
        sp.SubMConv3d(4, 8, 3, indice_key="s1"), torch.nn.ReLU(),
        sp.SparseConv3d(8, 16, 3, stride=2, padding=1, indice_key="d1"),
        sp.SubMConv3d(16, 16, 3, indice_key="s2"),
        sp.SparseConvTranspose3d(16, 8, 2, stride=2),
        sp.SparseMaxPool3d(2, 2),
    ).to(DEVICE)


def _forward_backward(net, feats, idx, shape, batch, seed=1):
    f = feats.clone().requires_grad_()
    y = net(sp.SparseConvTensor(f, idx, shape, batch))
    key = ((y.indices[:, 0].long() * 100 + y.indices[:, 1]) * 100 + y.indices[:, 2]) * 100 + y.indices[:, 3]
    order = torch.argsort(key)
    g = torch.randn(y.features.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    (y.features[order] * g).sum().backward()
    return (y.indices, y.indices[order], y.features[order].detach(), f.grad,
            {n: p.grad.clone() for n, p in net.named_parameters()})


@requires_triton
@pytest.mark.parametrize("wgrad_lists,sorted_rows", [(False, True), (True, True), (False, False)])
def test_triton_path_matches_reference_path_fwd_bwd(monkeypatch, wgrad_lists, sorted_rows):
    """Weight gradients from the dense pair map, or (wgrad_lists) from its compacted pairs; rows in mask order, or
    (not sorted_rows: every rulebook below ``SORT_MIN_ROWS``) in plain order."""
    monkeypatch.setattr(sparse_gemm, "WGRAD_MODE", "lists" if wgrad_lists else "map")
    monkeypatch.setattr(rbmod, "SORT_MIN_ROWS", 0 if sorted_rows else 10**9)
    feats, idx, shape, batch = _scene(seed=torch.randint(0, 2**31, ()).item())
    torch.manual_seed(0)
    net = _net()
    monkeypatch.setenv("KILN_OPS", "ref")
    ref = _forward_backward(net, feats, idx, shape, batch)
    net.zero_grad()
    monkeypatch.setenv("KILN_OPS", "triton")
    got = _forward_backward(net, feats, idx, shape, batch)
    assert torch.equal(got[1], ref[1]), "same output coordinates"
    assert rel_err(got[2], ref[2]) <= 1e-5
    assert rel_err(got[3], ref[3]) <= 1e-5
    for name, g in ref[4].items():
        assert rel_err(got[4][name], g) <= 1e-5, name


@requires_triton
def test_subm_input_gradient_reads_the_forward_map_reversed(monkeypatch):
    """An odd submanifold kernel's input gradient runs on the forward pair map with the weight reversed along the
    offsets: the swapped rulebook never materialises its own (flipped) map, and the gradient equals the
    reference path's."""
    monkeypatch.setenv("KILN_OPS", "triton")
    feats, idx, shape, batch = _scene(seed=torch.randint(0, 2**31, ()).item())
    torch.manual_seed(0)
    conv = sp.SubMConv3d(4, 6, 3, indice_key="s").to(DEVICE)
    f = feats.clone().requires_grad_()
    x = sp.SparseConvTensor(f, idx, shape, batch)
    y = conv(x)
    g = torch.randn(y.features.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (y.features * g).sum().backward()
    rb = x.indice_dict["s"].rulebook
    assert rb.swapped().mirror_source() is rb and "pair_fwd" not in rb.swapped()._cache
    monkeypatch.setenv("KILN_OPS", "ref")
    f2 = feats.clone().requires_grad_()
    (conv(sp.SparseConvTensor(f2, idx, shape, batch)).features * g).sum().backward()
    assert rel_err(f.grad, f2.grad) <= 1e-5


@requires_triton
@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_deterministic_mode_sorted_outputs_and_bitwise_repeatable(monkeypatch, backend):
    monkeypatch.setenv("KILN_OPS", backend)
    feats, idx, shape, batch = _scene(seed=torch.randint(0, 2**31, ()).item())
    torch.manual_seed(0)
    net = _net()
    with sp.deterministic():
        assert sp.is_deterministic()
        a = _forward_backward(net, feats, idx, shape, batch)
        net.zero_grad()
        b = _forward_backward(net, feats, idx, shape, batch)
    assert not sp.is_deterministic()
    ind = a[0].long()
    key = ((ind[:, 0] * 100 + ind[:, 1]) * 100 + ind[:, 2]) * 100 + ind[:, 3]
    assert torch.all(key[1:] > key[:-1]), "strided outputs come out in sorted coordinate order"
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    for name in a[4]:
        assert torch.equal(a[4][name], b[4][name]), name


@requires_triton
def test_triton_path_inverse_conv_reuses_the_strided_maps(monkeypatch):
    """An inverse convolution runs on the strided layer's rulebook swapped: on the Triton path both pair maps
    and their masks are exchanged, not rebuilt; outputs and gradients equal the reference path's."""
    feats, idx, shape, batch = _scene(seed=3)
    torch.manual_seed(0)
    net = sp.SparseSequential(sp.SubMConv3d(4, 8, 3, indice_key="s1"),
                              sp.SparseConv3d(8, 16, 3, stride=2, padding=1, indice_key="d1"), torch.nn.ReLU(),
                              sp.SparseInverseConv3d(16, 4, 3, indice_key="d1")).to(DEVICE)
    results = []
    for backend in ("ref", "triton"):
        monkeypatch.setenv("KILN_OPS", backend)
        net.zero_grad()
        results.append(_forward_backward(net, feats, idx, shape, batch))
    (ref, got) = results
    assert torch.equal(got[0], idx) and torch.equal(ref[0], idx), "inverse conv restores the input voxels in order"
    assert rel_err(got[2], ref[2]) <= 1e-5 and rel_err(got[3], ref[3]) <= 1e-5
    for name, g in ref[4].items():
        assert rel_err(got[4][name], g) <= 1e-5, name


@requires_triton
def test_rulebooks_below_the_sort_thresholds_keep_plain_row_order(monkeypatch):
    """Rows are sorted by offset mask only for rulebooks of SORT_MIN_ROWS rows whose first layer has SORT_MIN_WORK
    GEMM work per offset (rows x Cin x Cout); a caller that names no channels counts as large."""
    monkeypatch.setenv("KILN_OPS", "triton")
    feats, idx, shape, batch = _scene(seed=3)
    n = idx.shape[0]
    for min_rows, min_work, channels, sorted_expected in [(0, 0, None, True), (10**9, 0, None, False),
                                                          (0, 64 * n, 8 * 8, True), (0, 64 * n + 1, 8 * 8, False),
                                                          (0, 10**12, None, True)]:
        monkeypatch.setattr(rbmod, "SORT_MIN_ROWS", min_rows)
        monkeypatch.setattr(rbmod, "SORT_MIN_WORK", min_work)
        rb = rbmod.build_subm(idx, shape, [3, 3, 3], [1, 1, 1])
        order, masks = rb.fwd_schedule(channels)
        assert (order is not None) == sorted_expected and masks.shape == (n,)
        assert rb.fwd_schedule(10**9)[0] is order  # cached: the first layer to ask decides
