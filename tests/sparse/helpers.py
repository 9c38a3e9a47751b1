"""Shared builders for the sparse tests: random sparse tensors and dense references."""

from __future__ import annotations

from importlib.metadata import packages_distributions

import pytest
import torch
from hypothesis import strategies as st

import kiln.sparse as sp

def _spconv_cuda_build() -> bool:
    dists = packages_distributions().get("spconv", [])
    return bool(dists) and "spconv" not in dists


# spconv's CUDA wheels (the GPU benchmark's anchor) have no CPU implicit GEMM, and the parity references run on
# CPU tensors: they need its CPU build (the test extras)
requires_spconv_cpu = pytest.mark.skipif(
    _spconv_cuda_build(), reason="spconv is installed as a CUDA build without the CPU convolution; the CPU parity "
                                 "references need the CPU build (pip install spconv==2.3.8)")


RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(a, b):
    if a.numel() == 0:
        return 0.0
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


@st.composite
def sparse_coords(draw, ndim=3, max_size=6, max_batch=3, max_voxels=40):
    """(indices int32 [N, ndim+1], spatial_shape, batch_size): unique sites, possibly empty batch entries."""
    shape = [draw(st.integers(1, max_size)) for _ in range(ndim)]
    batch = draw(st.integers(1, max_batch))
    site = st.tuples(st.integers(0, batch - 1), *[st.integers(0, s - 1) for s in shape])
    sites = draw(st.sets(site, min_size=1, max_size=max_voxels))
    idx = torch.tensor(sorted(sites), dtype=torch.int32).view(-1, ndim + 1)
    return idx, shape, batch


def make_tensor(indices, shape, batch, channels, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(indices.shape[0], channels, generator=g).to(dtype).to(device)
    return sp.SparseConvTensor(feats.requires_grad_(), indices.to(device), shape, batch)


def active_mask(x: sp.SparseConvTensor) -> torch.Tensor:
    """bool [B, *spatial]: which sites are active."""
    m = torch.zeros([x.batch_size] + x.spatial_shape, dtype=torch.bool, device=x.indices.device)
    m[tuple(x.indices[:, i].long() for i in range(x.indices.shape[1]))] = True
    return m


def at_sites(dense_cf: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of a channels-first dense tensor [B, C, *spatial] at the given batch-first indices -> [N, C]."""
    nd = indices.shape[1] - 1
    cl = dense_cf.permute(0, *range(2, nd + 2), 1)
    return cl[tuple(indices[:, i].long() for i in range(nd + 1))]


def dense_weight(conv) -> torch.Tensor:
    """KRSC [Cout, *k, Cin] -> nn.Conv weight [Cout, Cin, *k]."""
    nd = conv.weight.dim() - 2
    return conv.weight.permute(0, nd + 1, *range(1, nd + 1))


def dense_weight_transposed(conv) -> torch.Tensor:
    """KRSC [Cout, *k, Cin] -> nn.ConvTranspose weight [Cin, Cout, *k]."""
    nd = conv.weight.dim() - 2
    return conv.weight.permute(nd + 1, 0, *range(1, nd + 1))


def random_voxels(n, shape, batch, cin, seed):
    """``n`` unique random voxels (batch-first int32 indices) in ``shape`` x ``batch``, with random features."""
    g = torch.Generator().manual_seed(seed)
    total = batch * shape[0] * shape[1] * shape[2]
    keys = torch.randperm(total, generator=g)[:n]
    cols = []
    for s in reversed(shape):
        cols.append(keys % s)
        keys = keys // s
    cols.append(keys)
    idx = torch.stack(cols[::-1], 1).int()
    return torch.randn(n, cin, generator=g), idx, list(shape), batch
