"""The one-launch decode attention (rotary + KV store + split-K + reduction) vs the unfused reference ops."""

import pytest
import torch

from kiln.ops import fused_decode
from kiln.ops._counters import split_counters
from kiln.ops.fused_decode import decode_attention_rope, decode_attention_rope_ref
from kiln.ops.rotary import rope_cos_sin_cache
from tests.conftest import DEVICE, requires_triton

BIG = DEVICE.type == "cuda"
TOL = {torch.float32: 2e-3 if BIG else 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
STORE_TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_decode(g, dtype, hq, hkv, d, bs, cached, pad_rows=0):
    """A decode batch: sequence b has cached[b] keys in scattered blocks and one new token at position cached[b]
    (slot from its block table); ``pad_rows`` trailing rows look like the runner's graph padding (slot -1)."""
    lens = [c + 1 for c in cached]
    nblocks = [-(-L // bs) for L in lens]
    total = sum(nblocks) + 2
    kc = torch.randn(total, bs, hkv, d, device=DEVICE, dtype=dtype, generator=g)
    vc = torch.randn(total, bs, hkv, d, device=DEVICE, dtype=dtype, generator=g)
    perm = torch.randperm(total, device=DEVICE, generator=g).tolist()
    width = max(nblocks) + 1
    tables, slots, i = [], [], 0
    for L, n in zip(lens, nblocks):
        row = perm[i:i + n]
        tables.append(row + [-1] * (width - n))
        slots.append(row[(L - 1) // bs] * bs + (L - 1) % bs)
        i += n
    for _ in range(pad_rows):
        tables.append([0] * width)
        slots.append(-1)
        lens.append(1)
    B = len(lens)
    qkv = torch.randn(B, (hq + 2 * hkv) * d, device=DEVICE, dtype=dtype, generator=g)  # views of a fused qkv
    q = qkv[:, : hq * d].view(B, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(B, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(B, hkv, d)
    pos = torch.tensor([L - 1 for L in lens], device=DEVICE, dtype=torch.int64)
    cs = rope_cos_sin_cache(d, max(lens) + 8, 10000.0, device=DEVICE)
    as_t = dict(device=DEVICE, dtype=torch.int32)
    return (q, k, v, pos, cs, kc, vc, torch.tensor(slots, device=DEVICE, dtype=torch.int64),
            torch.tensor(lens, **as_t), torch.tensor(tables, **as_t))


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


CONFIGS = [(4, 4, 32), (8, 2, 64), (4, 1, 64), (6, 2, 128)]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", CONFIGS)
@pytest.mark.parametrize("splits", [1, 3, None])
def test_fused_decode_matches_unfused_ops(dtype, hq, hkv, d, splits):
    g = torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())
    if BIG:
        cached, bs = [0, 5, 16000, 777, 4095, 31, 2000, 1] * 8, 16
    else:
        cached, bs = [0, 5, 40, 17], 8
    args = make_decode(g, dtype, hq, hkv, d, bs, cached)
    q, k, v, pos, cs, kc, vc, slots, lens, bt = args
    q0, k0 = q.clone(), k.clone()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = decode_attention_rope_ref(q, k, v, pos, cs, kc_ref, vc_ref, slots, lens, bt, d ** -0.5)
    locks = split_counters(DEVICE, q.shape[0] * hkv)
    got = fused_decode._decode_attention_rope_triton(q, k, v, pos, cs, kc, vc, slots, lens, bt, d ** -0.5, locks,
                                                     num_splits=splits)
    assert not got.isnan().any()
    assert rel(got, ref) <= TOL[dtype]
    # the rotated key and v went to their slots as the unfused store wrote them (the interpreter rounds bf16
    # differently from torch, hence a tolerance of one rounding); nothing else changed
    assert rel(kc, kc_ref) <= STORE_TOL[dtype] and torch.equal(vc, vc_ref)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # q and k are not rotated in place
    assert int(locks.abs().sum()) == 0  # the last split of every (sequence, head) reset its counter
    # the counters are reusable: a second launch over the now-stored cache (the new token counted once) agrees
    again = fused_decode._decode_attention_rope_triton(q, k, v, pos, cs, kc, vc, slots, lens, bt, d ** -0.5, locks,
                                                       num_splits=splits)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


@requires_triton
def test_padding_rows_store_nothing_and_real_rows_are_unaffected():
    g = torch.Generator(device=DEVICE).manual_seed(1)
    q, k, v, pos, cs, kc, vc, slots, lens, bt = make_decode(g, torch.float16, 8, 2, 64, 8, [3, 20], pad_rows=2)
    kc_before, vc_before = kc.clone(), vc.clone()
    locks = split_counters(DEVICE, q.shape[0] * 2)
    got = fused_decode._decode_attention_rope_triton(q, k, v, pos, cs, kc, vc, slots, lens, bt, 0.125, locks,
                                                     num_splits=4)
    ref = decode_attention_rope_ref(q[:2], k[:2], v[:2], pos[:2], cs, kc_before.clone(), vc_before.clone(),
                                    slots[:2], lens[:2], bt[:2], 0.125)
    assert rel(got[:2], ref) <= TOL[torch.float16]
    changed = (kc != kc_before).flatten(1).any(1).nonzero().flatten().tolist()
    assert set(changed) <= {int(s) // 8 for s in slots[:2].tolist()}  # only the real rows' new-token blocks


def test_public_op_dispatches_and_names_bad_inputs(monkeypatch):
    g = torch.Generator(device=DEVICE).manual_seed(2)
    q, k, v, pos, cs, kc, vc, slots, lens, bt = make_decode(g, torch.float32, 4, 2, 32, 4, [2, 9])
    ref = decode_attention_rope_ref(q, k, v, pos, cs, kc.clone(), vc.clone(), slots, lens, bt, 0.2)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("KILN_OPS", "triton")  # the interpreter on a CPU-only machine
    out = decode_attention_rope(q, k, v, pos, cs, kc, vc, slots, lens, bt, 0.2)
    assert rel(out, ref) <= TOL[torch.float32]
    assert fused_decode.fused_decode_supported(q, kc, cs, True)
    assert not fused_decode.fused_decode_supported(q, kc, cs, False)  # GPT-J rotary: the unfused ops
    monkeypatch.setenv("KILN_FUSED_DECODE", "0")
    assert not fused_decode.fused_decode_supported(q, kc, cs, True)
    with pytest.raises(ValueError, match="must equal head_dim"):
        decode_attention_rope(q, k, v, pos, cs[:, :16], kc, vc, slots, lens, bt, 0.2)
    with pytest.raises(ValueError, match="k.shape"):
        decode_attention_rope(q, k[:, :1], v, pos, cs, kc, vc, slots, lens, bt, 0.2)
    with pytest.raises(ValueError, match="seqlens_k.shape\\[0\\]"):
        decode_attention_rope(q, k, v, pos, cs, kc, vc, slots, lens[:1], bt, 0.2)


@requires_triton
@pytest.mark.parametrize("fused", ["1", "0"])
def test_attention_layer_takes_the_fused_path_in_decode_steps(monkeypatch, fused):
    """kiln.llm's PagedAttention in a decode step: the fused kernel (when supported) and the unfused ops give the
    same output and the same cache."""
    from kiln.llm.context import AttentionContext, set_context
    from kiln.llm.layers.attention import PagedAttention

    g = torch.Generator(device=DEVICE).manual_seed(3)
    q, k, v, pos, cs, kc, vc, slots, lens, bt = make_decode(g, torch.float16, 8, 2, 64, 8, [4, 30, 0])
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ref = decode_attention_rope_ref(q, k, v, pos, cs, ref_kc, ref_vc, slots, lens, bt, 0.125)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("KILN_OPS", "triton")
    monkeypatch.setenv("KILN_FUSED_DECODE", fused)
    calls = []
    real = fused_decode._decode_attention_rope_triton
    monkeypatch.setattr(fused_decode, "_decode_attention_rope_triton",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    layer = PagedAttention(8, 2, 64, 0.125)
    layer.k_cache, layer.v_cache = kc, vc
    set_context(AttentionContext(slot_mapping=slots, cu_seqlens_q=torch.arange(4, dtype=torch.int32, device=DEVICE),
                                 seqlens_k=lens, block_tables=bt, max_seqlen_q=1, is_decode=True))
    try:
        out = layer(q.clone(), k.clone(), v, rotary=(pos, cs, True))
    finally:
        set_context(None)
    assert len(calls) == (1 if fused == "1" else 0)
    assert rel(out.view(3, 8, 64), ref) <= TOL[torch.float16]
    assert rel(kc, ref_kc) <= STORE_TOL[torch.float16] and torch.equal(vc, ref_vc)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_fused_equals_the_unfused_kernels(dtype, splits):
    """Same key chunks per split, same rounding: the fused kernel reproduces rope_and_store_kv + the split-K decode
    kernel + its reduction (to the last bit, or to one rounding where the merge of several splits sums in another
    order), so greedy decoding does not move when the fusion is switched on."""
    from kiln.ops import attention, kv_cache

    g = torch.Generator(device=DEVICE).manual_seed(11)
    cached = [0, 5, 3000, 77, 1] * 4 if BIG else [0, 5, 40, 17]
    q, k, v, pos, cs, kc, vc, slots, lens, bt = make_decode(g, dtype, 8, 2, 64, 16 if BIG else 8, cached)
    kc2, vc2, q2, k2 = kc.clone(), vc.clone(), q.clone(), k.clone()
    got = fused_decode._decode_attention_rope_triton(q, k, v, pos, cs, kc, vc, slots, lens, bt, 0.125,
                                                     split_counters(DEVICE, q.shape[0] * 2), num_splits=splits)
    kv_cache._rope_and_store_kv_triton(q2, k2, v, pos, cs, kc2, vc2, slots, True)
    want = attention.paged_decode_triton(q2, kc2, vc2, lens, bt, 0.125, num_splits=splits)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    if splits == 1:
        assert torch.equal(got, want)
    else:  # the split partials agree bit for bit; the merge may sum them in another order: one rounding at most
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got, want, rtol=eps, atol=eps * float(want.abs().max()))


@requires_triton
def test_merge_takes_only_the_splits_that_hold_keys_in_either_width():
    """32 splits of Llama-8B-like heads (group 4, head dim 128): the last split merges only the splits that hold
    keys, all four heads in one pass over 16 splits when at most 16 hold keys, else two heads a pass over 32; the
    splits without keys exit at once. Both widths give the unfused kernels' output (to one rounding)."""
    from kiln.ops import attention, kv_cache

    g = torch.Generator(device=DEVICE).manual_seed(5)
    chunk = 64 if BIG else 16  # keys per split while a context fits 32 tiles
    cached = [0, 3 * chunk, 20 * chunk + 5]  # 1, 4 and 21 splits hold keys
    q, k, v, pos, cs, kc, vc, slots, lens, bt = make_decode(g, torch.bfloat16, 8, 2, 128, 16, cached)
    kc2, vc2, q2, k2 = kc.clone(), vc.clone(), q.clone(), k.clone()
    got = fused_decode._decode_attention_rope_triton(q, k, v, pos, cs, kc, vc, slots, lens, bt, 128 ** -0.5,
                                                     split_counters(DEVICE, q.shape[0] * 2), num_splits=32)
    kv_cache._rope_and_store_kv_triton(q2, k2, v, pos, cs, kc2, vc2, slots, True)
    want = attention.paged_decode_triton(q2, kc2, vc2, lens, bt, 128 ** -0.5, num_splits=32)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(got, want, rtol=eps, atol=eps * float(want.abs().max()))


@requires_triton
def test_outgrown_counters_fall_back_to_the_unfused_kernels(monkeypatch):
    """While a CUDA graph is captured the counter buffer cannot grow (split_counters gives None): the op then runs
    the three unfused kernels, which need no host sync, and gives the same answer."""
    g = torch.Generator(device=DEVICE).manual_seed(5)
    q, k, v, pos, cs, kc, vc, slots, lens, bt = make_decode(g, torch.float16, 8, 2, 64, 8, [4, 30])
    ref = decode_attention_rope_ref(q, k, v, pos, cs, kc.clone(), vc.clone(), slots, lens, bt, 0.125)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("KILN_OPS", "triton")
    monkeypatch.setattr(fused_decode, "split_counters", lambda device, n: None)
    monkeypatch.setattr(fused_decode, "_decode_attention_rope_triton", None)  # must not be reached
    out = decode_attention_rope(q, k, v, pos, cs, kc, vc, slots, lens, bt, 0.125)
    assert rel(out, ref) <= TOL[torch.float16]
