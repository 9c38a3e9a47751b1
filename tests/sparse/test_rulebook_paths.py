"""Rulebook builders against a brute-force reference, on both CPU key widths.

``build_subm`` and ``build_conv`` use int32 keys where every key fits (small grids) and int64 otherwise (huge
grids); the submanifold lookup searches windows of consecutive keys along the last dim and derives the centre
row from each voxel's own sorted position. Both widths, unsorted input, dense lines longer than the window,
even and odd kernels and dilation are checked here pair by pair.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kiln.sparse import rulebook
from kiln.sparse.rulebook import build_conv, build_subm, conv_output_size


def _segments(rb):
    out, start = [], 0
    for c in rb.counts:
        out.append(set(zip(rb.in_idx[start:start + c].tolist(), rb.out_idx[start:start + c].tolist())))
        start += c
    return out


def _ref_subm(idx, shape, ksize, dilation):
    rows = {tuple(r): i for i, r in enumerate(idx.tolist())}
    segs = []
    for k in itertools.product(*[range(s) for s in ksize]):
        pairs = set()
        for o, r in enumerate(idx.tolist()):
            nb = [r[1 + d] + (k[d] - ksize[d] // 2) * dilation[d] for d in range(len(shape))]
            if all(0 <= nb[d] < shape[d] for d in range(len(shape))):
                i = rows.get((r[0], *nb))
                if i is not None:
                    pairs.add((i, o))
        segs.append(pairs)
    return segs


def _ref_conv(idx, shape, ksize, stride, padding, dilation):
    out_shape = conv_output_size(shape, ksize, stride, padding, dilation)
    raw = []
    for k in itertools.product(*[range(s) for s in ksize]):
        for i, r in enumerate(idx.tolist()):
            o = []
            for d in range(len(shape)):
                num = r[1 + d] + padding[d] - k[d] * dilation[d]
                if num % stride[d] or not 0 <= num // stride[d] < out_shape[d]:
                    break
                o.append(num // stride[d])
            else:
                raw.append((k, i, (r[0], *o)))
    outs = sorted({o for _, _, o in raw})
    row = {o: j for j, o in enumerate(outs)}
    segs = {k: set() for k in itertools.product(*[range(s) for s in ksize])}
    for k, i, o in raw:
        segs[k].add((i, row[o]))
    return outs, list(segs.values())


def _scene(shape, n, batch, seed, line=0):
    """Clustered voxels near a random corner (so neighbours exist), plus an optional dense line along the last
    dim longer than any window; unique, shuffled."""
    g = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    base = torch.tensor([int(torch.randint(0, max(1, s - 8), (1,), generator=g)) for s in shape])
    c = base + torch.randint(0, 6, (n, ndim), generator=g)
    if line:
        ln = base.repeat(line, 1)
        ln[:, -1] = base[-1] + torch.arange(line)
        c = torch.cat([c, ln])
    c = torch.minimum(c, torch.tensor(shape) - 1)
    b = torch.randint(0, batch, (c.shape[0], 1), generator=g)
    idx = torch.unique(torch.cat([b, c], 1), dim=0)
    return idx[torch.randperm(idx.shape[0], generator=g)].int()


GRIDS = [[7, 9, 11], [41, 1600, 1408], [60000, 70000, 80000]]  # the last one needs int64 keys


def _sorted(idx, shape):
    key = idx[:, 0].long()
    for d, s in enumerate(shape):
        key = key * s + idx[:, 1 + d]
    return idx[torch.argsort(key)]


@pytest.mark.parametrize("shape", GRIDS)
@pytest.mark.parametrize("ksize,dilation", [([3, 3, 3], [1, 1, 1]), ([5, 3, 5], [1, 2, 1]), ([2, 3, 2], [1, 1, 1]),
                                            ([3, 3, 3], [2, 1, 2])])
@pytest.mark.parametrize("lookup", ["dense", "search", "hash"])
@pytest.mark.parametrize("order", ["shuffled", "sorted"])
def test_subm_matches_brute_force(monkeypatch, device, shape, ksize, dilation, lookup, order):
    """Both CPU lookups (direct table where the key range is small enough, sorted-key search otherwise) and the
    GPU's (the Triton hash table, every offset looked up, the rulebook kept as its pair map: its pair lists, and
    for odd kernels the mirrored backward map, are derived from that)."""
    if lookup == "search":
        monkeypatch.setattr(rulebook, "_dense_fits", lambda span, n: False)
    if lookup == "hash":
        monkeypatch.setenv("KILN_OPS", "triton")
    idx = _scene(shape, 90, 2, seed=sum(shape) + sum(ksize), line=12)
    if order == "sorted":
        idx = _sorted(idx, shape)
    if lookup == "hash":
        idx = idx.to(device)  # the Triton table: compiled on a GPU, interpreted on the CPU
    rb = build_subm(idx, shape, ksize, dilation)
    assert rb.kernel_volume == math.prod(ksize)
    assert _segments(rb) == _ref_subm(idx, shape, ksize, dilation)
    # the pair maps agree with the lists whichever was built first (the backward map of odd kernels is a flip)
    fresh = build_subm(idx, shape, ksize, dilation)
    for name, rows, vals in (("pair_fwd", rb.out_idx, rb.in_idx), ("pair_bwd", rb.in_idx, rb.out_idx)):
        pm = getattr(fresh, name)()
        k_of = torch.repeat_interleave(torch.arange(rb.kernel_volume), torch.tensor(rb.counts)).to(pm.device)
        expect = torch.full_like(pm, -1)
        expect[rows, k_of] = vals.int()
        assert torch.equal(pm, expect), name
    sw = fresh.swapped()
    assert _segments(sw) == [{(o, i) for i, o in seg} for seg in _segments(rb)]
    monkeypatch.setattr(rulebook, "SORT_MIN_ROWS", 0)  # these small rulebooks are sorted only when asked
    order, _ = fresh.fwd_schedule()
    sw_order, sw_masks = sw.fwd_schedule()
    if sw._mirrored:  # the input gradient's schedule reuses the forward's order: its masks are bit-reversed
        assert sw_order is order
    grouped = sw_masks[sw_order.long()]
    assert grouped.unique_consecutive().numel() == grouped.unique().numel(), "rows grouped by mask"
    centre = sum((k // 2) * math.prod(ksize[d + 1:]) for d, k in enumerate(ksize))
    assert rb.identity_offset == (centre if all(k % 2 for k in ksize) else -1)


@pytest.mark.parametrize("shape", GRIDS)
@pytest.mark.parametrize("ksize,stride,padding,dilation", [([3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1]),
                                                           ([3, 1, 1], [2, 1, 1], [0, 0, 0], [1, 1, 1]),
                                                           ([2, 3, 3], [1, 2, 3], [0, 1, 1], [1, 1, 2])])
def test_conv_matches_brute_force(shape, ksize, stride, padding, dilation):
    idx = _scene(shape, 90, 2, seed=sum(shape) + sum(stride), line=9)
    out_indices, out_shape, rb = build_conv(idx, shape, ksize, stride, padding, dilation)
    outs, segs = _ref_conv(idx, shape, ksize, stride, padding, dilation)
    assert out_shape == conv_output_size(shape, ksize, stride, padding, dilation)
    assert [tuple(r) for r in out_indices.tolist()] == outs
    assert out_indices.dtype == torch.int32
    assert _segments(rb) == segs


def test_dense_lookup_tables_are_left_clear_and_reused():
    """The per-thread direct tables must be all zero between calls (entries are reset one by one), or a later
    scene would see an earlier scene's voxels."""
    shape = [41, 1600, 1408]
    for seed in range(3):
        idx = _scene(shape, 300, 2, seed=seed, line=20)
        rb = build_subm(idx, shape, [3, 3, 3], [1, 1, 1])
        assert _segments(rb) == _ref_subm(idx, shape, [3, 3, 3], [1, 1, 1])
        tables = rulebook._dense.tables
        assert set(tables) == {"dir", "slots"} and all(int(t.count_nonzero()) == 0 for t in tables.values())


def _maps_match_lists(rb):
    """Both pair maps hold exactly the pairs of the lists (whichever the rulebook was built from)."""
    k_of = torch.repeat_interleave(torch.arange(rb.kernel_volume), torch.tensor(rb.counts, dtype=torch.long))
    for pm, rows, vals, n in ((rb.pair_fwd(), rb.out_idx, rb.in_idx, rb.n_out),
                              (rb.pair_bwd(), rb.in_idx, rb.out_idx, rb.n_in)):
        k_of = k_of.to(pm.device)
        expect = torch.full((n, rb.kernel_volume), -1, dtype=torch.int32, device=pm.device)
        expect[rows, k_of] = vals.int()
        assert torch.equal(pm, expect)


@pytest.mark.parametrize("shape", GRIDS)
@pytest.mark.parametrize("ksize,stride,padding,dilation", [([3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1]),
                                                           ([3, 1, 1], [2, 1, 1], [0, 0, 0], [1, 1, 1]),
                                                           ([2, 3, 3], [1, 2, 3], [0, 1, 1], [1, 1, 2]),
                                                           # dilation sharing a factor with the stride: voxels
                                                           # of odd c + padding reach no tap at all
                                                           ([3, 3, 3], [2, 2, 2], [1, 0, 1], [2, 1, 2])])
@pytest.mark.parametrize("sort", [True, False])
def test_conv_hash_path_matches_brute_force(monkeypatch, device, shape, ksize, stride, padding, dilation, sort):
    """The GPU's strided rulebook (two kernels over (voxel, tap): insert every reached output key, then number
    the outputs and write both pair maps): the same outputs as the brute force -- ascending in deterministic
    mode, any order otherwise -- and the same pairs; lists derived from the maps agree with them."""
    from kiln.sparse.rulebook import deterministic

    monkeypatch.setenv("KILN_OPS", "triton")
    idx = _scene(shape, 90, 2, seed=sum(shape) + sum(stride), line=9).to(device)
    with deterministic(sort):
        out_indices, out_shape, rb = build_conv(idx, shape, ksize, stride, padding, dilation)
    outs, segs = _ref_conv(idx, shape, ksize, stride, padding, dilation)
    got = [tuple(r) for r in out_indices.tolist()]
    assert out_indices.dtype == torch.int32 and out_shape == conv_output_size(shape, ksize, stride, padding, dilation)
    assert (got == outs) if sort else (sorted(got) == outs and len(set(got)) == len(got))
    row = {o: j for j, o in enumerate(outs)}
    remap = [row[o] for o in got]
    assert [{(i, remap[o]) for i, o in seg} for seg in _segments(rb)] == segs
    _maps_match_lists(rb)
    sw = rb.swapped()
    assert _segments(sw) == [{(o, i) for i, o in seg} for seg in _segments(rb)]


@pytest.mark.parametrize("shape", [[7, 9, 11], [12, 10]])
@pytest.mark.parametrize("dil", [1, 2])
def test_transposed_conv_hash_path_matches_cpu_path(monkeypatch, device, shape, dil):
    from kiln.sparse.rulebook import deterministic

    ndim = len(shape)
    ksize, stride, padding, dilation = [3] * ndim, [2] * ndim, [1] * ndim, [dil] + [1] * (ndim - 1)
    idx = _scene(shape, 60, 2, seed=5)
    results = []
    for backend in ("ref", "triton"):
        monkeypatch.setenv("KILN_OPS", backend)
        with deterministic(True):
            out_indices, out_shape, rb = build_conv(idx.to(device) if backend == "triton" else idx, shape, ksize, stride, padding, dilation, transposed=True,
                                                    output_padding=[1] * ndim)
        results.append((out_indices.tolist(), out_shape, _segments(rb)))
        if backend == "triton":
            _maps_match_lists(rb)
    assert results[0] == results[1]
