"""The CPU planned path (gather into reused buffers, GEMM per offset, row sums with ``embedding_bag``) against the
per-offset gather-GEMM-scatter reference, on scenes large enough to split into many blocks, at 2 threads."""

import pytest
import torch

import kiln.sparse as sp
import kiln.sparse.functional as Fsp
from kiln.ops import sparse_gemm
from kiln.sparse.rulebook import build_subm

from .helpers import random_voxels, rel_err


def _net():
    return sp.SparseSequential(
        sp.SubMConv3d(4, 8, 3, indice_key="s1"), torch.nn.ReLU(),
        sp.SparseConv3d(8, 16, 3, stride=2, padding=1, indice_key="d1"),
        sp.SubMConv3d(16, 16, 3, indice_key="s2"), torch.nn.ReLU(),
        sp.SparseInverseConv3d(16, 8, 3, indice_key="d1"),
        sp.SubMConv3d(8, 6, (1, 3, 2), indice_key="s3"),
    )


def _run(net, feats, idx, shape, batch, g):
    f = feats.clone().requires_grad_()
    y = net(sp.SparseConvTensor(f, idx, shape, batch))
    (y.features * g).sum().backward()
    out = (y.features.detach(), f.grad, {n: p.grad.clone() for n, p in net.named_parameters()})
    net.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_planned_path_with_many_blocks_matches_gather_scatter_at_two_threads(monkeypatch, shuffle):
    seed = torch.randint(0, 2**31, ()).item()
    feats, idx, shape, batch = random_voxels(1500, (10, 24, 24), 2, 4, seed)
    if not shuffle:  # sorted coordinates: pairs come out in (offset, row) order; shuffled ones take the sort path
        order = torch.argsort(((idx[:, 0] * 10 + idx[:, 1]) * 24 + idx[:, 2]) * 24 + idx[:, 3])
        feats, idx = feats[order], idx[order]
    torch.manual_seed(seed)
    net = _net()
    g = torch.randn(idx.shape[0], 6, generator=torch.Generator().manual_seed(seed))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(Fsp, "_planned", lambda x, w: False)
        ref = _run(net, feats, idx, shape, batch, g)
        monkeypatch.undo()
        monkeypatch.setattr(sparse_gemm, "PLAN_BUDGET_BYTES", 1 << 12)  # 4096-pair blocks: several per layer
        got = _run(net, feats, idx, shape, batch, g)
        again = _run(net, feats, idx, shape, batch, g)
    finally:
        torch.set_num_threads(threads)
    assert rel_err(got[0], ref[0]) <= 1e-5, "forward"
    assert rel_err(got[1], ref[1]) <= 1e-5, "input gradient"
    for name, grad in ref[2].items():
        assert rel_err(got[2][name], grad) <= 1e-5, name
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1]), "bit-reproducible"
    for name, grad in got[2].items():
        assert torch.equal(grad, again[2][name]), name


def test_plan_splits_large_rulebooks_into_blocks(monkeypatch):
    feats, idx, shape, batch = random_voxels(3000, (12, 30, 28), 1, 4, 0)
    x = sp.SparseConvTensor(feats, idx, shape, batch)
    rb = build_subm(idx, shape, [3, 3, 3], [1, 1, 1])  # fresh: a rulebook keeps the plan its first layer asked for
    plan = rb.plan(4096)
    assert rb.plan(1 << 20) is plan
    assert len(plan.blocks) == -(-sum(rb.counts) // 4096)
    assert [b.r0 for b in plan.blocks[1:]] == [b.r1 for b in plan.blocks[:-1]]
    assert plan.blocks[0].r0 == 0 and plan.blocks[-1].r1 == rb.n_out
    assert sum(b.n_products for b in plan.blocks) == sum(rb.counts)
    # the centre offset (identity pairs) is read in place: never gathered
    gathered = sum(z1 - z0 for b in plan.blocks for _, z0, z1, g0 in b.segments if g0 >= 0)
    assert gathered == sum(rb.counts) - rb.n_out


def test_mirrored_rulebook_twin_reuses_the_plan_with_offsets_reversed():
    """A submanifold rulebook (odd kernel) and its swapped twin hold the same pairs, offset k as K-1-k: the twin's
    plan (the input gradient's) is the original's relabelled, and computes what a freshly built plan computes."""
    from kiln.ops import sparse_gemm as sg

    feats, idx, shape, batch = random_voxels(2000, (12, 30, 28), 1, 4, 1)
    rb = build_subm(idx, shape, [3, 3, 3], [1, 1, 1])
    fwd = rb.plan(4096)
    twin = rb.swapped()
    got = twin.plan(4096)
    assert got.src is fwd.src and [s[0] for s in got.blocks[0].segments] == \
        [rb.kernel_volume - 1 - s[0] for s in fwd.blocks[0].segments]
    fresh = sg.build_plan(twin.out_idx, twin.in_idx, twin.counts, twin.n_out, twin.identity_offset, 4096)
    w = torch.randn(rb.kernel_volume, 4, 5)
    dy = torch.randn(rb.n_out, 5)
    a = sg.planned_conv_backward(feats, w, dy, got)
    b = sg.planned_conv_backward(feats, w, dy, fresh)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
