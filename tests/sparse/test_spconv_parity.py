"""Same state_dict, same voxels: kiln.sparse vs spconv 2.3.8 (CPU build) on a chain of subm, strided, pooling and
inverse layers, forward and backward. spconv's CPU path races with >1 torch thread, so the reference runs
single-threaded; kiln runs with 2 threads (its CPU path must be right at any thread count)."""

import pytest
import torch

import kiln.sparse as ksp

from .helpers import random_voxels, rel_err, requires_spconv_cpu

spconv = pytest.importorskip("spconv.pytorch")
pytestmark = requires_spconv_cpu


def _chain(lib, inverse=True):
    layers = [
        lib.SubMConv3d(4, 8, 3, padding=1, bias=False, indice_key="subm1"),
        torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
        lib.SubMConv3d(8, 8, 3, padding=1, indice_key="subm1"),
        lib.SparseConv3d(8, 16, 3, stride=2, padding=1, indice_key="down1"),
        lib.SubMConv3d(16, 16, 3, padding=1, indice_key="subm2"), torch.nn.ReLU(),
        lib.SparseConv3d(16, 16, (3, 1, 1), stride=(2, 1, 1), indice_key="down2"),
    ]
    if inverse:
        layers += [lib.SparseInverseConv3d(16, 16, (3, 1, 1), indice_key="down2"),
                   lib.SparseInverseConv3d(16, 6, 3, indice_key="down1")]
    return lib.SparseSequential(*layers)


def _voxels(seed, batch=2, shape=(11, 24, 20), n=500):
    return random_voxels(n, shape, batch, 4, seed)


def _run(lib, net, feats, idx, shape, batch, grad_seed, backward=True):
    f = feats.clone().requires_grad_(backward)
    y = net(lib.SparseConvTensor(f, idx, shape, batch))
    order = torch.argsort(y.indices[:, 0].long() * 10**9 + y.indices[:, 1].long() * 10**6 +
                          y.indices[:, 2].long() * 10**3 + y.indices[:, 3].long())
    out = y.features[order]
    if not backward:
        return y.indices[order], out.detach()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    return y.indices[order], out.detach(), f.grad, grads


def _pair(inverse, seed):
    torch.manual_seed(seed)
    ours = _chain(ksp, inverse).train()
    theirs = _chain(spconv, inverse).train()
    missing = theirs.load_state_dict(ours.state_dict())  # KRSC weights load unchanged
    assert not missing.missing_keys and not missing.unexpected_keys
    return ours, theirs


def test_chain_with_inverse_layers_matches_spconv_forward():
    seed = torch.randint(0, 2**31, ()).item()
    feats, idx, shape, batch = _voxels(seed)
    ours, theirs = _pair(True, seed)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = _run(spconv, theirs, feats, idx, shape, batch, 0, backward=False)
        torch.set_num_threads(2)
        got = _run(ksp, ours, feats, idx, shape, batch, 0, backward=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], ref[0]), "output coordinates differ"
    key = idx.long() @ torch.tensor([10**9, 10**6, 10**3, 1])
    assert torch.equal(got[0], idx[torch.argsort(key)]), "inverse layers restore the input coordinates"
    assert rel_err(got[1], ref[1]) <= 1e-5


@pytest.fixture
def spconv_cpu_backward(monkeypatch):
    """spconv 2.3.8's backward asks torch for the current CUDA stream even for CPU tensors, which fails on a
    CPU-only torch; the stream handle is unused on the CPU path, so hand it 0."""
    import spconv.pytorch.ops as spops
    monkeypatch.setattr(spops, "get_current_stream", lambda: 0)


@pytest.mark.parametrize("inverse", [False, True])
def test_chain_of_subm_strided_inverse_matches_spconv_fwd_bwd(spconv_cpu_backward, inverse):
    seed = torch.randint(0, 2**31, ()).item()
    feats, idx, shape, batch = _voxels(seed)
    ours, theirs = _pair(inverse, seed)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = _run(spconv, theirs, feats, idx, shape, batch, seed + 1)
        torch.set_num_threads(2)
        got = _run(ksp, ours, feats, idx, shape, batch, seed + 1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], ref[0]), "output coordinates differ"
    assert rel_err(got[1], ref[1]) <= 1e-5, "forward"
    assert rel_err(got[2], ref[2]) <= 1e-5, "input gradient"
    for name, g in ref[3].items():
        assert rel_err(got[3][name], g) <= 1e-5, f"gradient of {name}"


@pytest.mark.parametrize("pool", ["SparseMaxPool3d"])  # spconv's avg pool has no CPU path; see test_tensor_pool
def test_pooling_matches_spconv(pool):
    feats, idx, shape, batch = _voxels(torch.randint(0, 2**31, ()).item(), n=300)
    # spconv's CPU (native) max pool starts from 0, its GPU implicit-GEMM pool and kiln from -inf (max over the
    # active inputs only): they agree on non-negative features, the usual post-ReLU input of a pool
    feats = feats.abs()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = getattr(spconv, pool)(3, 2, 1)(spconv.SparseConvTensor(feats, idx, shape, batch))
        torch.set_num_threads(2)
        got = getattr(ksp, pool)(3, 2, 1)(ksp.SparseConvTensor(feats, idx, shape, batch))
    finally:
        torch.set_num_threads(threads)
    assert got.spatial_shape == list(ref.spatial_shape)
    torch.testing.assert_close(got.dense(), ref.dense(), rtol=1e-5, atol=1e-6)


def test_spconv_state_dict_loads_into_kiln_unchanged():
    theirs = _chain(spconv)
    ours = _chain(ksp)
    ours.load_state_dict(theirs.state_dict())
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert n1 == n2 and p1.shape == p2.shape and torch.equal(p1, p2)
