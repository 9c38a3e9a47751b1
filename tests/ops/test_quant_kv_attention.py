"""Quantized KV cache (int8 / fp8 e4m3 with per-head static scales): the Triton write paths (store_kv, the fused
rope + store) produce exactly the reference's codes, and the prefill (with a cached prefix) and split-K decode
kernels reading int8 / fp8 K/V match the dequantize-then-SDPA reference.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 on tiny shapes; on a GPU at larger sizes.
"""

import pytest
import torch

from kiln.ops import attention, kv_cache
from kiln.ops.rotary import rope_cos_sin_cache
from tests.conftest import DEVICE, requires_triton

BIG = DEVICE.type == "cuda"
QDTYPES = [torch.int8, torch.float8_e4m3fn]


def fresh_gen():
    return torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())


def scales_for(x, qdtype):
    """Per-head scales from the data's absmax, shrunk a little so some values saturate (the clamp is tested)."""
    qmax = 127.0 if qdtype == torch.int8 else 448.0
    return (x.float().abs().amax(dim=(0, 2)) / qmax * 0.9).contiguous()


def codes_close(got, ref, qdtype):
    """int8: identical codes. fp8: identical except one e4m3 step where a GPU's reciprocal rounds differently.

    NaN must sit in the same places: the poison byte 0x7F that marks never-written slots is NaN in e4m3fn, so a
    plain allclose (NaN != NaN) would fail on every untouched slot, and a kernel writing NaN where the reference
    writes a finite code must still fail."""
    if qdtype == torch.int8 or not BIG:
        return torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    return torch.allclose(got.float(), ref.float(), rtol=0.13, atol=2.0**-9, equal_nan=True)


@requires_triton
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_store_kv_and_rope_store_write_the_reference_codes(qdtype, dtype):
    g = fresh_gen()
    T, hq, hk, d, nb, bs = (9, 6, 2, 40, 5, 4) if not BIG else (300, 32, 8, 128, 64, 16)
    k = torch.randn(T, hk, d, device=DEVICE, generator=g).to(dtype) * torch.linspace(0.5, 3, hk, device=DEVICE)[:, None].to(dtype)
    v = torch.randn(T, hk, d, device=DEVICE, generator=g).to(dtype)
    ks, vs = scales_for(k, qdtype), scales_for(v, qdtype)
    slots = torch.randperm(nb * bs, device=DEVICE, generator=g)[:T]
    slots[::5] = -1
    # store_kv: poisoned caches (0x7F bytes) must keep their poison exactly where the slot is -1
    caches = [torch.full((nb, bs, hk, d), 0x7F, dtype=torch.uint8, device=DEVICE).view(qdtype) for _ in range(4)]
    kv_cache._store_kv_triton(k, v, caches[0], caches[1], slots, ks, vs)
    kv_cache.store_kv_ref(k, v, caches[2], caches[3], slots, ks, vs)
    assert codes_close(caches[0], caches[2], qdtype) and codes_close(caches[1], caches[3], qdtype)
    written = torch.zeros(nb * bs, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    untouched = caches[0].view(torch.uint8).view(nb * bs, -1)[~written]
    assert (untouched == 0x7F).all()
    # the dequantized cache is within half a step (int8) / 1/16 relative (fp8) of the written values
    deq = kv_cache.dequantize_kv(caches[0].view(nb * bs, hk, d)[slots[slots >= 0]], ks)
    src = k[slots >= 0].float()
    clipped = ks[None, :, None] * (127.0 if qdtype == torch.int8 else 448.0)
    src = torch.maximum(torch.minimum(src, clipped), -clipped)
    bound = ks[None, :, None] / 2 if qdtype == torch.int8 else src.abs() / 16 + ks[None, :, None] * 2.0**-9
    assert ((deq - src).abs() <= bound * 1.001 + 1e-6).all()
    if dtype != torch.float32:  # 16-bit rotary rounding is tested in test_basic_ops; here the quantized write
        return
    # fused rope + store (partial rotary: 32 of 40 dims in the tiny case)
    cos_sin = rope_cos_sin_cache(32 if not BIG else 128, 512, 10000.0, device=DEVICE)
    pos = torch.randint(0, 512, (T,), device=DEVICE, generator=g)
    q = torch.randn(T, hq, d, device=DEVICE, generator=g).to(dtype)
    outs = [torch.zeros(nb, bs, hk, d, device=DEVICE).to(qdtype) for _ in range(4)]
    q1, k1, q2, k2 = q.clone(), k.clone(), q.clone(), k.clone()
    kv_cache._rope_and_store_kv_triton(q1, k1, v, pos, cos_sin, outs[0], outs[1], slots, True, ks, vs)
    kv_cache.rope_and_store_kv_ref(q2, k2, v, pos, cos_sin, outs[2], outs[3], slots, True, ks, vs)
    assert torch.allclose(q1, q2, rtol=1e-6, atol=1e-6)
    assert roped_codes_close(outs[0], outs[2], k2, ks, slots, qdtype) and codes_close(outs[1], outs[3], qdtype)


def roped_codes_close(got, ref, roped, scale, slots, qdtype):
    """``codes_close`` for codes of rotated keys: the kernel's fp32 rotation may differ from torch's in the last
    bit (FMA contraction), which moves a value sitting on a rounding boundary (x.5 for int8) to the next code. Such
    a code may differ by one; any other difference fails."""
    if codes_close(got, ref, qdtype):
        return True
    if qdtype != torch.int8:
        return False
    ok = slots >= 0
    g = got.view(-1, *roped.shape[1:])[slots[ok]].int()
    r = ref.view(-1, *roped.shape[1:])[slots[ok]].int()
    v = (roped[ok].float() * (1.0 / scale.float())[None, :, None]).abs()
    on_boundary = ((v - v.floor()) - 0.5).abs() < 1e-4
    differ = g != r
    return bool(((g - r).abs() <= 1).all() and on_boundary[differ].all())


def paged_setup(g, qdtype, dtype, lens_new, lens_k, hq=4, hkv=2, d=32, bs=8):
    nb = sum(-(-L // bs) for L in lens_k) + 2
    kf = torch.randn(nb, bs, hkv, d, device=DEVICE, generator=g) * torch.tensor([1.0, 4.0], device=DEVICE)[:, None]
    vf = torch.randn(nb, bs, hkv, d, device=DEVICE, generator=g)
    ks, vs = scales_for(kf.flatten(0, 1), qdtype), scales_for(vf.flatten(0, 1), qdtype)
    kc = kv_cache.quantize_kv_ref(kf.flatten(0, 1), ks, qdtype).view(nb, bs, hkv, d)
    vc = kv_cache.quantize_kv_ref(vf.flatten(0, 1), vs, qdtype).view(nb, bs, hkv, d)
    perm = torch.randperm(nb, device=DEVICE, generator=g).to(torch.int32)
    width = max(-(-L // bs) for L in lens_k) + 1
    tables, i = [], 0
    for L in lens_k:
        n = -(-L // bs)
        tables.append(perm[i:i + n].tolist() + [-1] * (width - n))
        i += n
    bt = torch.tensor(tables, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0] + list(torch.tensor(lens_new).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE)
    lk = torch.tensor(lens_k, dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lens_new), hq, d, device=DEVICE, generator=g).to(dtype)
    return q, kc, vc, ks, vs, cu, lk, bt


@requires_triton
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_kernels_read_quantized_kv_like_the_dequantized_reference(qdtype, dtype):
    g = fresh_gen()
    lens_new, lens_k = ([11, 1, 4], [11, 19, 30]) if not BIG else ([300, 1, 64], [300, 900, 2000])
    q, kc, vc, ks, vs, cu, lk, bt = paged_setup(g, qdtype, dtype, lens_new, lens_k)
    d = q.shape[-1]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ref = attention.paged_attention_ref(q, kc, vc, cu, lk, bt, d ** -0.5, ks, vs)
    # the reference equals attention over float K/V holding the dequantized values
    kf, vf = kv_cache.dequantize_kv(kc, ks).to(dtype), kv_cache.dequantize_kv(vc, vs).to(dtype)
    if dtype == torch.float32:
        assert torch.allclose(ref, attention.paged_attention_ref(q, kf, vf, cu, lk, bt, d ** -0.5), atol=1e-6)
    got = attention.varlen_prefill_triton(q, kc, vc, cu, lk, bt, d ** -0.5, max(lens_new), ks, vs)
    assert ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= tol
    qd = q[: len(lens_k)].contiguous()
    cud = torch.arange(len(lens_k) + 1, dtype=torch.int32, device=DEVICE)
    ref_d = attention.paged_attention_ref(qd, kc, vc, cud, lk, bt, d ** -0.5, ks, vs)
    for splits in (1, 3):
        got_d = attention.paged_decode_triton(qd, kc, vc, lk, bt, d ** -0.5, splits, k_scale=ks, v_scale=vs)
        assert ((got_d.float() - ref_d.float()).abs().max() / ref_d.float().abs().max()).item() <= tol


def test_quantized_kv_bad_input_is_named():
    g = fresh_gen()
    q, kc, vc, ks, vs, cu, lk, bt = paged_setup(g, torch.int8, torch.float32, [3], [5])
    with pytest.raises(ValueError, match="int8 KV cache needs k_scale"):
        attention.paged_attention(q, kc, vc, cu, lk, bt, 0.1)
    for dev in {torch.device("cpu"), DEVICE}:  # the length is named before the device, on every device
        with pytest.raises(ValueError, match="one value per KV head \\(2\\), got 3"):
            attention.paged_attention(q, kc, vc, cu, lk, bt, 0.1, k_scale=torch.ones(3, device=dev), v_scale=vs)
    if BIG:
        with pytest.raises(ValueError, match="k_scale is on cpu but the other inputs are on cuda"):
            attention.paged_attention(q, kc, vc, cu, lk, bt, 0.1, k_scale=ks.cpu(), v_scale=vs)
    with pytest.raises(ValueError, match="apply to an int8 or fp8 KV cache"):
        attention.paged_attention(q, kc.float(), vc.float(), cu, lk, bt, 0.1, k_scale=ks, v_scale=vs)
    k = torch.randn(2, 2, 32)
    with pytest.raises(ValueError, match="k_cache must have dtype"):
        kv_cache.store_kv(k, k, kc.to(torch.int16), vc.to(torch.int16), torch.tensor([0, 1]))
