"""The Triton coordinate hash table (linear probing, atomic CAS) vs the sort + searchsorted reference.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (tiny shapes); on a GPU at full size."""

import pytest
import torch

from kiln.ops import hashing
from tests.conftest import DEVICE, requires_triton

BIG = DEVICE.type == "cuda"


def _gen():
    return torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())


@requires_triton
@pytest.mark.parametrize("n", [1, 37, 1000])
def test_triton_hash_lookup_matches_reference(monkeypatch, n):
    monkeypatch.setenv("KILN_OPS", "triton")
    g = _gen()
    n = n * 150 if BIG else n
    keys = torch.randperm(n * 20, device=DEVICE, generator=g)[:n].long() * 1_000_003  # spread over > 2**32
    vals = torch.randperm(n, device=DEVICE, generator=g).int()
    table = hashing.hash_build(keys, vals)
    assert table.backend == "triton" and table.capacity >= 2 * n
    assert int((table.keys != hashing.EMPTY).sum()) == n, "every key claims exactly one slot"
    queries = torch.cat([keys, keys + 1, torch.tensor([-1, -5], device=DEVICE)])
    got = hashing.hash_lookup(table, queries.view(3, -1) if queries.numel() % 3 == 0 else queries)
    ref = hashing.hash_lookup_ref(hashing.hash_build_ref(keys, vals), queries.view(got.shape))
    assert torch.equal(got, ref)
    assert torch.equal(got.view(-1)[:n], vals)


@requires_triton
@pytest.mark.parametrize("sort", [True, False])
def test_triton_unique_keys_matches_reference(monkeypatch, sort):
    monkeypatch.setenv("KILN_OPS", "triton")
    g = _gen()
    n = 200_000 if BIG else 700
    keys = torch.randint(0, n // 3, (n,), device=DEVICE, generator=g) * 7
    uniq, inv = hashing.unique_keys(keys, sort=sort)
    ref_u, _ = hashing.unique_keys_ref(keys)
    assert torch.equal(uniq[inv], keys), "inverse maps every key to its distinct key"
    assert torch.equal(torch.sort(uniq).values, ref_u)
    if sort:
        assert torch.equal(uniq, ref_u)


def test_hash_rejects_bad_keys():
    with pytest.raises(ValueError, match="keys must have dtype"):
        hashing.hash_build(torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="values has 2 entries"):
        hashing.hash_build(torch.arange(4), torch.arange(2, dtype=torch.int32))


def test_hash_doctor_check_is_exact():
    err, _ = hashing.DOCTOR_CHECKS["hash_lookup"](DEVICE, torch.float32, _gen())
    assert err == 0.0


def _voxels(shape, n, batch, g):
    """n distinct voxels (batch-first int32), a third of them on the grid's faces so neighbours fall outside."""
    coords = torch.stack([torch.randint(0, s, (4 * n,), device=DEVICE, generator=g) for s in shape], 1)
    face = torch.randint(0, len(shape), (4 * n,), device=DEVICE, generator=g)
    edge = torch.rand(4 * n, device=DEVICE, generator=g) < 0.33
    for d, s in enumerate(shape):
        sel = edge & (face == d)
        coords[sel, d] = torch.where(torch.rand(int(sel.sum()), device=DEVICE, generator=g) < 0.5, 0, s - 1)
    b = torch.randint(0, batch, (4 * n, 1), device=DEVICE, generator=g)
    idx = torch.unique(torch.cat([b, coords], 1), dim=0)
    return idx[torch.randperm(idx.shape[0], device=DEVICE, generator=g)[:n]].int()


@requires_triton
@pytest.mark.parametrize("shape, ksize, dilation", [([9, 11, 7], [3, 3, 3], [1, 1, 1]), ([6, 8], [3, 5], [2, 1]),
                                                    ([40], [4], [1]), ([5, 6, 7], [2, 3, 2], [1, 2, 1]),
                                                    ([7, 7, 7], [5, 5, 5], [1, 1, 1])])
def test_triton_neighbor_map_matches_reference(monkeypatch, shape, ksize, dilation):
    """One kernel per submanifold rulebook: every (voxel, offset) neighbour row and the per-row offset masks, as
    the reference computes them from tensors -- odd and even kernels, dilation, 1-3 dims, voxels on the faces
    (neighbours outside the grid), several batch entries, and K > 63 (masks -1)."""
    from kiln.sparse.rulebook import encode, offset_table

    g = _gen()
    n = 4000 if BIG else 60
    idx = _voxels(shape, n, 3, g)
    rel = offset_table(ksize, dilation, DEVICE)
    keys = encode(idx[:, 1:].long(), idx[:, 0], shape)
    monkeypatch.setenv("KILN_OPS", "triton")
    table = hashing.hash_build(keys)
    pm, masks = hashing.neighbor_map(table, idx, shape, rel)
    ref_pm, ref_masks = hashing.neighbor_map_ref(hashing.hash_build_ref(keys, table_values(keys)), idx, shape, rel)
    assert torch.equal(pm, ref_pm) and torch.equal(masks, ref_masks)
    assert (pm >= 0).any(1).all() if all(k % 2 for k in ksize) else True  # odd kernels: the centre is the voxel
    empty_pm, empty_masks = hashing.neighbor_map(table, idx[:0], shape, rel)
    assert empty_pm.shape == (0, rel.shape[1]) and empty_masks.shape == (0,)


def table_values(keys):
    return torch.arange(keys.numel(), device=keys.device, dtype=torch.int32)


def test_neighbor_map_rejects_mismatched_shapes():
    table = hashing.hash_build_ref(torch.arange(4, device=DEVICE), table_values(torch.arange(4, device=DEVICE)))
    idx = torch.zeros(4, 3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"indices \[N, 4\] and rel \[3, K\]"):
        hashing.neighbor_map(table, idx, [4, 4, 4], torch.zeros(3, 27, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="rel"):
        hashing.neighbor_map(table, idx[:, :3], [4, 4], torch.zeros(2, 9, dtype=torch.int64, device=DEVICE))


@requires_triton
@pytest.mark.parametrize("shape", [[9, 11, 7], [6, 8], [40]])
def test_triton_voxel_checks_match_reference(monkeypatch, shape):
    """SparseConvTensor's input checks in one kernel: the first negative row, the first row outside the batch or
    grid, and whether the keys ascend strictly -- on sorted, shuffled, bad and single-row inputs."""
    g = _gen()
    idx = _voxels(shape, 300 if BIG else 40, 3, g)
    key = idx[:, 0].long()
    for d, s in enumerate(shape):
        key = key * s + idx[:, 1 + d]
    ordered = idx[torch.argsort(key)]
    neg = ordered.clone()
    neg[7, 1] = -1
    neg[20, 0] = -3
    out = ordered.clone()
    out[5, len(shape)] = shape[-1]
    out[30, 0] = 3  # batch_size 3
    cases = [ordered, idx, neg, out, ordered[:1], torch.cat([ordered[:3], ordered[2:3]])]
    for case in cases:
        ref = hashing.voxel_checks_ref(case, shape, 3)
        monkeypatch.setenv("KILN_OPS", "triton")
        got = hashing.voxel_checks(case, shape, 3)
        monkeypatch.delenv("KILN_OPS")
        assert got == ref, (got, ref)
    assert hashing.voxel_checks_ref(ordered, shape, 3) == (len(ordered), len(ordered), True)
    assert hashing.voxel_checks_ref(neg, shape, 3)[0] == 7 and hashing.voxel_checks_ref(out, shape, 3)[1] == 5
    assert not hashing.voxel_checks_ref(cases[-1], shape, 3)[2]  # a repeated row is not strictly ascending


@requires_triton
@pytest.mark.parametrize("shape", [[9, 11, 7], [6, 8], [40]])
def test_triton_hash_build_voxels_matches_encoded_build(monkeypatch, shape):
    """Encoding the keys inside the insert kernel: every voxel's key maps to its row, absent keys miss."""
    from kiln.sparse.rulebook import encode

    g = _gen()
    idx = _voxels(shape, 300 if BIG else 50, 2, g)
    keys = encode(idx[:, 1:].long(), idx[:, 0], shape)
    monkeypatch.setenv("KILN_OPS", "triton")
    table = hashing.hash_build_voxels(idx, shape)
    assert table.backend == "triton"
    queries = torch.cat([keys, keys.max() + 1 + torch.arange(5, device=DEVICE)])
    expect = torch.cat([torch.arange(len(keys), device=DEVICE, dtype=torch.int32),
                        torch.full((5,), -1, device=DEVICE, dtype=torch.int32)])
    assert torch.equal(hashing.hash_lookup(table, queries), expect)
    with pytest.raises(ValueError, match=r"indices must be \[N, 3\]"):
        hashing.hash_build_voxels(idx[:, :2], [4, 4])
