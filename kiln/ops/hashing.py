"""Coordinate hash table: int64 keys -> int32 values, for sparse-convolution rulebooks.

The Triton table is open addressing with linear probing; its capacity is the next power of two at or above twice
the number of keys (load factor <= 0.5), empty slots hold -1, insertion claims a slot with ``atomic_cas``. The
reference (the specification) is a sorted key array searched with ``torch.searchsorted``.

Keys must be non-negative int64 (sparse coordinates are encoded as ``((b * D0 + z) * D1 + y) * D2 + x``); a
negative query key always misses, which is how callers mark out-of-range neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import backend_for, check_tensor
from ._triton import tl, triton

EMPTY = -1
_BLOCK = 256


@dataclass
class HashTable:
    """A built table. ``backend`` is 'triton' (slot arrays) or 'ref' (sorted keys + the value of each)."""

    backend: str
    keys: torch.Tensor  # triton: [capacity] int64 slots (-1 empty); ref: [n] sorted int64
    values: torch.Tensor  # triton: [capacity] int32; ref: [n] int32 aligned with ``keys``

    @property
    def capacity(self) -> int:
        return self.keys.numel()


def _check_keys(name: str, keys: torch.Tensor) -> None:
    check_tensor(name, keys, ndim=1, dtypes=(torch.int64,))


def hash_build(keys: torch.Tensor, values: torch.Tensor | None = None) -> HashTable:
    """Table mapping ``keys[i]`` ([n] int64, non-negative, unique) to ``values[i]`` ([n] int32, default i)."""
    _check_keys("keys", keys)
    if values is None:
        values = torch.arange(keys.numel(), device=keys.device, dtype=torch.int32)
    check_tensor("values", values, ndim=1, dtypes=(torch.int32,), device=keys.device)
    if values.numel() != keys.numel():
        raise ValueError(f"values has {values.numel()} entries but keys has {keys.numel()}")
    if backend_for(keys) == "triton":
        table = _empty_table(keys.numel(), keys.device)
        _insert(table, keys.contiguous(), values.contiguous())
        return table
    return hash_build_ref(keys, values)


def hash_build_ref(keys: torch.Tensor, values: torch.Tensor) -> HashTable:
    sk, perm = torch.sort(keys)
    return HashTable("ref", sk, values[perm])


def hash_lookup(table: HashTable, queries: torch.Tensor) -> torch.Tensor:
    """int32 value of every query key (any shape, int64), -1 where the key is absent or negative."""
    check_tensor("queries", queries, dtypes=(torch.int64,), device=table.keys.device)
    if table.backend == "triton":
        return _lookup_triton(table, queries)
    return hash_lookup_ref(table, queries)


def hash_lookup_ref(table: HashTable, queries: torch.Tensor) -> torch.Tensor:
    if table.keys.numel() == 0:
        return torch.full(queries.shape, -1, dtype=torch.int32, device=queries.device)
    pos = torch.searchsorted(table.keys, queries).clamp_(max=table.keys.numel() - 1)
    found = (table.keys[pos] == queries) & (queries >= 0)
    return torch.where(found, table.values[pos], torch.full_like(table.values[pos], -1))


def unique_keys(keys: torch.Tensor, sort: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct keys and, for every input key, the int64 index of its distinct key.

    With ``sort`` the distinct keys come out ascending (a stable, reproducible output order); without it the
    Triton path returns them in slot order, which depends on insertion races. The reference always sorts.
    """
    _check_keys("keys", keys)
    if backend_for(keys) == "triton":
        return _unique_triton(keys.contiguous(), sort)
    return unique_keys_ref(keys)


def unique_keys_ref(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    return uniq, inverse


# ----------------------------------------------------------------------------------------------- Triton


def _capacity(n: int) -> int:
    return max(16, triton.next_power_of_2(2 * max(n, 1)))


def _empty_table(n: int, device) -> HashTable:
    cap = _capacity(n)
    return HashTable("triton", torch.full((cap,), EMPTY, dtype=torch.int64, device=device),
                     torch.full((cap,), -1, dtype=torch.int32, device=device))


@triton.jit
def _hash_slot(key, cap_mask):
    # fold the key to < 2**32 and multiply by a 31-bit odd constant: the product stays below 2**63
    lo = key & 0xFFFFFFFF
    hi = (key >> 32) & 0xFFFFFFFF
    h = ((lo ^ (hi * 40503)) & 0xFFFFFFFF) * 1540483477
    h = h ^ (h >> 29)
    return h & cap_mask


@triton.jit
def _insert_kernel(Keys, Vals, TKeys, TVals, N, cap_mask, HAS_VALS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    key = tl.load(Keys + offs, mask=valid, other=0)
    if HAS_VALS:
        val = tl.load(Vals + offs, mask=valid, other=0)
    slot = _hash_slot(key, cap_mask)
    active = valid
    while tl.max(active.to(tl.int32), axis=0) > 0:
        # finished lanes compare against -2, which no slot ever holds: their CAS is a no-op read
        cmp = tl.where(active, -1, -2).to(tl.int64)
        prev = tl.atomic_cas(TKeys + slot, cmp, key)
        claimed = active & (prev == -1)
        if HAS_VALS:
            tl.store(TVals + slot, val, mask=claimed)
        done = claimed | (prev == key)
        active = active & (done == 0)
        slot = tl.where(active, (slot + 1) & cap_mask, slot)


@triton.jit
def _lookup_kernel(Q, TKeys, TVals, Out, N, cap_mask, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    q = tl.load(Q + offs, mask=valid, other=-1)
    active = valid & (q >= 0)
    slot = _hash_slot(q, cap_mask)
    result = tl.full([BLOCK], -1, tl.int32)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        k = tl.load(TKeys + slot, mask=active, other=-1)
        found = active & (k == q)
        v = tl.load(TVals + slot, mask=found, other=-1)
        result = tl.where(found, v, result)
        active = active & (k != q) & (k != -1)
        slot = (slot + 1) & cap_mask
    tl.store(Out + offs, result, mask=valid)


def _insert(table: HashTable, keys: torch.Tensor, values: torch.Tensor | None) -> None:
    n = keys.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, _BLOCK),)
    _insert_kernel[grid](keys, values if values is not None else keys, table.keys, table.values, n,
                         table.capacity - 1, HAS_VALS=values is not None, BLOCK=_BLOCK)


def _lookup_triton(table: HashTable, queries: torch.Tensor) -> torch.Tensor:
    q = queries.reshape(-1).contiguous()
    out = torch.full(q.shape, -7, dtype=torch.int32, device=q.device)  # poison: every entry must be written
    if q.numel():
        _lookup_kernel[(triton.cdiv(q.numel(), _BLOCK),)](q, table.keys, table.values, out, q.numel(),
                                                          table.capacity - 1, BLOCK=_BLOCK)
    return out.view(queries.shape)


def _unique_triton(keys: torch.Tensor, sort: bool) -> tuple[torch.Tensor, torch.Tensor]:
    table = _empty_table(keys.numel(), keys.device)
    _insert(table, keys, None)
    slots = torch.nonzero(table.keys != EMPTY).view(-1)
    uniq = table.keys[slots]
    if sort:
        uniq, order = torch.sort(uniq)
        slots = slots[order]
    table.values[slots] = torch.arange(slots.numel(), device=keys.device, dtype=torch.int32)
    inverse = _lookup_triton(table, keys).long()
    return uniq, inverse


def _check_hash(device, dtype, g):
    """Doctor check: Triton (or the reference on CPU) table vs the sorted reference, as exact equality."""
    keys = torch.randperm(50000, device=device, generator=g)[:3001].long() * 7919
    table = hash_build(keys)
    q = torch.cat([keys[torch.randperm(keys.numel(), device=device, generator=g)],
                   torch.randint(0, 2**40, (777,), device=device, generator=g), -keys[:5] - 1])
    got = hash_lookup(table, q)
    ref = hash_lookup_ref(hash_build_ref(keys, torch.arange(keys.numel(), device=device, dtype=torch.int32)), q)
    return float((got != ref).sum().item()), table.backend


DOCTOR_CHECKS = {"hash_lookup": _check_hash}
