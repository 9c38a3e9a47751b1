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
