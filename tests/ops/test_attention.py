"""Paged attention kernels (varlen prefill with cached prefix, split-K decode) vs the SDPA reference."""

import pytest
import torch

from kiln.ops import attention
from tests.conftest import DEVICE, requires_triton

BIG = DEVICE.type == "cuda"
TOL = {torch.float32: 2e-3 if BIG else 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def make_case(g, dtype, hq, hkv, d, bs, new_lens, cached_lens):
    lens_k = [n + c for n, c in zip(new_lens, cached_lens)]
    nblocks = [-(-L // bs) for L in lens_k]
    total = sum(nblocks) + 3
    kc = torch.randn(total, bs, hkv, d, device=DEVICE, dtype=dtype, generator=g)
    vc = torch.randn(total, bs, hkv, d, device=DEVICE, dtype=dtype, generator=g)
    perm = torch.randperm(total, device=DEVICE, generator=g).tolist()  # scattered physical blocks
    width = max(nblocks) + 2
    tables, i = [], 0
    for n in nblocks:
        tables.append(perm[i:i + n] + [-1] * (width - n))
        i += n
    bt = torch.tensor(tables, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0] + list(torch.tensor(new_lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    lk = torch.tensor(lens_k, dtype=torch.int32, device=DEVICE)
    # q as a strided view into a fused projection
    T = sum(new_lens)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device=DEVICE, dtype=dtype, generator=g)
    q = qkv[:, : hq * d].view(T, hq, d)
    return q, kc, vc, cu, lk, bt


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


CONFIGS = [(4, 4, 64), (8, 2, 64), (4, 1, 40), (6, 2, 128)]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", CONFIGS)
def test_varlen_prefill_with_cached_prefix_matches_reference(dtype, hq, hkv, d):
    g = torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())
    if BIG:
        new, cached, bs = [1000, 1, 37, 513, 2048], [0, 700, 3000, 64, 100], 16
    else:
        new, cached, bs = [19, 1, 5, 33], [0, 9, 40, 3], 4
    q, kc, vc, cu, lk, bt = make_case(g, dtype, hq, hkv, d, bs, new, cached)
    ref = attention.paged_attention_ref(q, kc, vc, cu, lk, bt, d ** -0.5)
    got = attention.varlen_prefill_triton(q, kc, vc, cu, lk, bt, d ** -0.5, max(new))
    assert not got.isnan().any()
    assert rel(got, ref) <= TOL[dtype]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", CONFIGS)
@pytest.mark.parametrize("splits", [1, 3, None])
def test_split_k_decode_matches_reference(dtype, hq, hkv, d, splits):
    g = torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())
    if BIG:
        cached, bs = [0, 5, 16000, 777, 4095, 31, 2000, 1] * 8, 16
    else:
        cached, bs = [0, 5, 70, 33], 8
    q, kc, vc, cu, lk, bt = make_case(g, dtype, hq, hkv, d, bs, [1] * len(cached), cached)
    ref = attention.paged_attention_ref(q, kc, vc, cu, lk, bt, d ** -0.5)
    got = attention.paged_decode_triton(q, kc, vc, lk, bt, d ** -0.5, num_splits=splits)
    assert not got.isnan().any()
    assert rel(got, ref) <= TOL[dtype]


def test_reference_equals_plain_causal_sdpa_without_paging():
    torch.manual_seed(0)
    T, h, d = 10, 2, 8
    q, k, v = torch.randn(3, T, h, d).unbind(0)
    kc = k.view(5, 2, h, d)
    vc = v.view(5, 2, h, d)
    out = attention.paged_attention(q, kc, vc, torch.tensor([0, T], dtype=torch.int32),
                                    torch.tensor([T], dtype=torch.int32), torch.arange(5, dtype=torch.int32)[None],
                                    d ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_attention_inputs_are_named():
    q = torch.randn(3, 4, 8)
    kc = torch.randn(2, 4, 3, 8)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    lk = torch.tensor([3], dtype=torch.int32)
    bt = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="query heads \\(4\\) must be a multiple of KV heads \\(3\\)"):
        attention.paged_attention(q, kc, kc, cu, lk, bt, 1.0)
    with pytest.raises(ValueError, match="k_cache must have dtype"):
        attention.paged_attention(q, kc.half(), kc, cu, lk, bt, 1.0)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        attention.paged_attention(q, kc[:, :, :2], kc[:, :, :2], cu, torch.tensor([3, 3], dtype=torch.int32), bt, 1.0)


def test_batched_decode_reference_equals_the_per_sequence_loop():
    g = torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())
    q, kc, vc, cu, lk, bt = make_case(g, torch.float32, 8, 2, 32, 4, [1, 1, 1, 1], [0, 9, 30, 3])
    batched = attention.paged_attention_ref(q, kc, vc, cu, lk, bt, 0.3)
    for i, L in enumerate(lk.tolist()):  # each sequence by hand: its keys gathered block by block, no mask
        k = attention.gather_kv(kc, bt[i], L).repeat_interleave(4, dim=1)  # [L, Hq, D]
        v = attention.gather_kv(vc, bt[i], L).repeat_interleave(4, dim=1)
        w = torch.softmax(torch.einsum("hd,lhd->hl", q[i], k) * 0.3, dim=-1)
        torch.testing.assert_close(batched[i], torch.einsum("hl,lhd->hd", w, v), rtol=1e-5, atol=1e-5)
