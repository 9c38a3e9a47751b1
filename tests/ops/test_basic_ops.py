"""Triton kernels vs their PyTorch references: fresh random inputs, odd sizes, strided views, every dtype.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (tiny shapes); on a GPU at full size.
"""

import pytest
import torch

from kiln.ops import activation, kv_cache, norm, rotary
from kiln.ops._dispatch import interpreting
from tests.conftest import DEVICE, requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative-to-max tolerances; the interpreter rounds bf16 by truncation, so allow a couple of ulps
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
BIG = DEVICE.type == "cuda"


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def fresh_gen():
    return torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_triton_matches_reference(dtype, with_residual):
    g = fresh_gen()
    rows, hidden = (4099, 4096) if BIG else (13, 97)
    # a strided view: every other row of a wider buffer
    base = torch.randn(rows * 2, hidden + 3, device=DEVICE, dtype=dtype, generator=g)
    x = base[::2, :hidden]
    w = torch.randn(hidden, device=DEVICE, dtype=dtype, generator=g)
    r = torch.randn(rows, hidden, device=DEVICE, dtype=dtype, generator=g) if with_residual else None
    x_before = x.clone()
    got = norm._rms_norm_triton(x, w, 1e-6, r)
    ref = norm.rms_norm_ref(x, w, 1e-6, r)
    assert torch.equal(x, x_before), "inputs must not be modified"
    if with_residual:
        assert rel_err(got[0], ref[0]) <= RTOL[dtype]
        if dtype == torch.bfloat16 and interpreting():  # the interpreter truncates when it rounds to bf16
            assert rel_err(got[1], ref[1]) <= RTOL[dtype]
        else:
            assert torch.equal(got[1], ref[1]), "residual sum must be bit-identical to torch's add"
    else:
        assert rel_err(got, ref) <= RTOL[dtype]


def test_rms_norm_3d_input_and_dispatch(device):
    x = torch.randn(2, 5, 64, device=device)
    w = torch.rand(64, device=device)
    y = norm.rms_norm(x, w, 1e-5)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [None, 32])
def test_rotary_triton_matches_reference_in_place_on_fused_qkv_view(dtype, is_neox, rotary_dim):
    g = fresh_gen()
    T, hq, hk, d = (1021, 32, 8, 128) if BIG else (11, 6, 2, 64)
    rot = rotary_dim or d
    cache = rotary.rope_cos_sin_cache(rot, 4096, 500000.0, {"rope_type": "llama3", "factor": 32.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 128},
                                      device=DEVICE)
    qkv = torch.randn(T, (hq + 2 * hk) * d, device=DEVICE, dtype=dtype, generator=g)
    q = qkv[:, : hq * d].view(T, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(T, hk, d)
    v_before = qkv[:, (hq + hk) * d:].clone()
    pos = torch.randint(0, 4096, (T,), device=DEVICE, generator=g)
    q_ref = rotary.rotary_ref(q, pos, cache, is_neox)
    k_ref = rotary.rotary_ref(k, pos, cache, is_neox)
    rotary._apply_rotary_triton(q, k, pos, cache, is_neox)
    assert rel_err(q, q_ref) <= RTOL[dtype] and rel_err(k, k_ref) <= RTOL[dtype]
    assert torch.equal(qkv[:, (hq + hk) * d:], v_before), "v must be untouched"


def test_rotary_reference_matches_transformers_llama3_rope():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=512,
                                   rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    emb = LlamaRotaryEmbedding(cfg)
    T = 40
    pos = torch.randint(0, 512, (T,))
    q = torch.randn(1, 2, T, 64)
    k = torch.randn(1, 2, T, 64)
    cos, sin = emb(q, pos[None])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    cache = rotary.rope_cos_sin_cache(64, 512, 500000.0, cfg.rope_scaling)
    qk = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()
    rotary.apply_rotary(qk[0], qk[1], pos, cache, is_neox=True)
    torch.testing.assert_close(qk[0], q_hf[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qk[1], k_hf[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_rope_inv_freq_llama3_scaling_leaves_high_freqs_and_divides_low_freqs():
    base = rotary.rope_inv_freq(64, 500000.0)
    scaled = rotary.rope_inv_freq(64, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192})
    assert torch.allclose(scaled[0], base[0])
    assert torch.allclose(scaled[-1], base[-1] / 8.0)
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        rotary.rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 2.0})


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_triton_matches_reference(dtype):
    g = fresh_gen()
    rows, inner = (2053, 8192) if BIG else (7, 1500)
    base = torch.randn(rows, 2 * inner + 6, device=DEVICE, dtype=dtype, generator=g)
    x = base[:, 3: 3 + 2 * inner]  # non-contiguous rows
    assert rel_err(activation._silu_and_mul_triton(x), activation.silu_and_mul_ref(x)) <= RTOL[dtype]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_triton_writes_every_slot_and_skips_minus_one(dtype):
    g = fresh_gen()
    nb, bs, h, d = (512, 16, 8, 128) if BIG else (5, 4, 3, 24)
    pool = torch.randn(2, 3, nb, bs, h, d, device=DEVICE, dtype=dtype, generator=g)  # [K/V, layers, ...]
    kc, vc = pool[0, 1], pool[1, 1]
    before = pool.clone()
    T = nb * bs // 2 + 1
    qkv = torch.randn(T, 4 * h * d, device=DEVICE, dtype=dtype, generator=g)
    k = qkv[:, h * d: 2 * h * d].view(T, h, d)  # views into a fused projection
    v = qkv[:, 2 * h * d: 3 * h * d].view(T, h, d)
    slots = torch.randperm(nb * bs, device=DEVICE, generator=g)[:T]
    slots[1::3] = -1
    ref_k, ref_v = kc.clone(), vc.clone()
    kv_cache.store_kv_ref(k, v, ref_k, ref_v, slots)
    kv_cache._store_kv_triton(k, v, kc, vc, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    # nothing outside layer 1 was touched, and the -1 slots wrote nothing
    assert torch.equal(pool[:, 0], before[:, 0]) and torch.equal(pool[:, 2], before[:, 2])
    written = torch.zeros(nb * bs, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    untouched = before[0, 1].reshape(nb * bs, h, d)[~written]
    assert torch.equal(kc.reshape(nb * bs, h, d)[~written], untouched)


def test_store_kv_reference_places_tokens_in_their_blocks():
    kc = torch.zeros(3, 2, 1, 2)
    vc = torch.zeros(3, 2, 1, 2)
    k = torch.arange(1, 7, dtype=torch.float32).view(3, 1, 2)
    kv_cache.store_kv(k, -k, kc, vc, torch.tensor([5, -1, 0]))
    assert kc[2, 1, 0].tolist() == [1.0, 2.0] and kc[0, 0, 0].tolist() == [5.0, 6.0]
    assert vc[2, 1, 0].tolist() == [-1.0, -2.0]
    assert kc.abs().sum() == 14.0


# ------------------------------------------------------------------ bad input names the argument
def test_bad_inputs_raise_value_errors_naming_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="x must have dtype"):
        norm.rms_norm(x.int(), torch.ones(8))
    with pytest.raises(ValueError, match=r"weight.shape\[0\] \(7\) must match x.shape\[-1\] \(8\)"):
        norm.rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual.shape"):
        norm.rms_norm(x, torch.ones(8), residual=torch.randn(4, 9))
    with pytest.raises(ValueError, match="weight must be a torch.Tensor"):
        norm.rms_norm(x, [1.0] * 8)
    with pytest.raises(ValueError, match="x's last dim must be even"):
        activation.silu_and_mul(torch.randn(3, 5))
    with pytest.raises(ValueError, match="x must have dtype"):
        activation.silu_and_mul(torch.ones(3, 4, dtype=torch.int64))
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    cache = rotary.rope_cos_sin_cache(8, 16)
    with pytest.raises(ValueError, match="positions must have dtype"):
        rotary.apply_rotary(q, k, torch.zeros(3), cache)
    with pytest.raises(ValueError, match=r"positions.shape\[0\]"):
        rotary.apply_rotary(q, k, torch.zeros(2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="k must have dtype"):
        rotary.apply_rotary(q, k.half(), torch.zeros(3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="cos_sin_cache.shape"):
        rotary.apply_rotary(q, k, torch.zeros(3, dtype=torch.long), rotary.rope_cos_sin_cache(16, 16))
    kc = torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match="slot_mapping must have dtype"):
        kv_cache.store_kv(k, k, kc, kc, torch.zeros(3))
    with pytest.raises(ValueError, match=r"k_cache.shape\[2:\]"):
        kv_cache.store_kv(k, k, torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="value.shape"):
        kv_cache.store_kv(k, k[:2], kc, kc, torch.zeros(3, dtype=torch.long))


@pytest.mark.gpu
def test_bad_device_is_named():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu"):
        norm.rms_norm(x, torch.ones(8))


def test_kiln_ops_ref_forces_reference(monkeypatch):
    from kiln.ops._dispatch import backend_for

    monkeypatch.setenv("KILN_OPS", "ref")
    assert backend_for(torch.zeros(1)) == "ref"
    monkeypatch.setenv("KILN_OPS", "bogus")
    with pytest.raises(ValueError, match="KILN_OPS"):
        backend_for(torch.zeros(1))
