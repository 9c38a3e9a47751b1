"""The decode GEMV (kiln.ops.gemv) and its fused prologues vs fp32 references; rope_and_store_kv vs its reference.

On a CPU the kernels run under TRITON_INTERPRET=1 on tiny odd shapes; on a GPU the ``gpu`` tests add the real
Llama-3.2-1B / Llama-3.1-8B decode shapes and CUDA-graph capture.
"""

import pytest
import torch

from kiln.ops import gemv, kv_cache, rotary
from tests.conftest import DEVICE, requires_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative-to-max tolerances: fp32 differs by summation order only; 16-bit by one rounding of the output (the
# interpreter rounds bf16 by truncation, hence a couple of ulps)
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _gemv_on(monkeypatch):
    """These tests exercise the Triton GEMV (the default; ``KILN_GEMV=off`` turns it off)."""
    monkeypatch.setenv("KILN_GEMV", "on")


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def fresh_gen():
    return torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())


def strided(t):
    """The same values as a non-contiguous view (every other column of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_kernel_matches_fp32_reference(dtype, M, with_bias):
    g = fresh_gen()
    N, K = 37, 83  # odd: masked rows and a K tail
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=g)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype, generator=g)
    b = torch.randn(N, device=DEVICE, dtype=dtype, generator=g) if with_bias else None
    y, _ = gemv._launch(strided(x), w, b, gemv.PROLOGUE_NONE, K)
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel_err(y, gemv.linear_ref(x, w, b)) <= RTOL[dtype]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=32, USE_DOT=False),   # several K steps
                                 dict(BLOCK_M=4, BLOCK_N=8, BLOCK_K=64, USE_DOT=False),
                                 dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, USE_DOT=True)])
def test_gemv_kernel_multi_step_k_and_even_k(dtype, cfg):
    g = fresh_gen()
    for K in (96, 128):  # tail tile, then K a multiple of BLOCK_K (the unmasked path)
        M, N = min(3, cfg["BLOCK_M"]), 21
        x = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=g)
        w = torch.randn(N, K, device=DEVICE, dtype=dtype, generator=g)
        y, _ = gemv._launch(x, w, None, gemv.PROLOGUE_NONE, K, config=cfg)
        assert rel_err(y, gemv.linear_ref(x, w)) <= RTOL[dtype]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_silu_mul_prologue_matches_reference(dtype, M, with_bias):
    g = fresh_gen()
    N, inner = 29, 70
    gu = torch.randn(M, 2 * inner, device=DEVICE, dtype=dtype, generator=g) * 3
    w = torch.randn(N, inner, device=DEVICE, dtype=dtype, generator=g)
    b = torch.randn(N, device=DEVICE, dtype=dtype, generator=g) if with_bias else None
    y, _ = gemv._launch(strided(gu), w, b, gemv.PROLOGUE_SILU_MUL, inner)
    assert rel_err(y, gemv.silu_mul_linear_ref(gu, w, b)) <= RTOL[dtype]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 9])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_prologue_matches_reference(dtype, M, with_residual):
    g = fresh_gen()
    N, K = 33, 90
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=g)
    r = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=g) if with_residual else None
    nw = torch.rand(K, device=DEVICE, dtype=dtype, generator=g) + 0.5
    w = torch.randn(N, K, device=DEVICE, dtype=dtype, generator=g)
    b = torch.randn(N, device=DEVICE, dtype=dtype, generator=g)
    x_before = x.clone()
    cfg = dict(BLOCK_M=16 if M > 4 else 4 if M > 1 else 1, BLOCK_N=16, BLOCK_K=32, USE_DOT=M > 4)
    y, s = gemv._launch(strided(x), w, b, gemv.PROLOGUE_RMS_NORM, K, residual=r, norm_weight=nw, eps=1e-5,
                        config=cfg)
    assert torch.equal(x, x_before)
    ref = gemv.rms_norm_linear_ref(x, nw, 1e-5, w, b, r)
    if with_residual:
        y_ref, s_ref = ref
        assert rel_err(s, s_ref) <= (0 if dtype == torch.float32 else RTOL[dtype])
    else:
        y_ref = ref
        assert s is None
    assert rel_err(y, y_ref) <= RTOL[dtype]


def test_public_ops_fall_back_to_torch_off_the_fast_path(device, monkeypatch):
    """fp32, many rows, KILN_GEMV=off: same results through F.linear / the unfused ops, same shapes."""
    g = fresh_gen()
    x = torch.randn(2, 3, 40, device=device, generator=g)
    w = torch.randn(24, 40, device=device, generator=g)
    b = torch.randn(24, device=device, generator=g)
    torch.testing.assert_close(gemv.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    gu = torch.randn(20, 80, device=device, generator=g)
    torch.testing.assert_close(gemv.silu_mul_linear(gu, w), gemv.silu_mul_linear_ref(gu, w), rtol=1e-5, atol=1e-5)
    nw = torch.rand(40, device=device, generator=g)
    r = torch.randn_like(x)
    y, s = gemv.rms_norm_linear(x, nw, 1e-6, w, b, residual=r)
    y_ref, s_ref = gemv.rms_norm_linear_ref(x, nw, 1e-6, w, b, residual=r)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref)
    monkeypatch.setenv("KILN_GEMV", "off")
    xh = x[:1, :1].to(torch.bfloat16)
    assert not gemv.use_gemv(xh, w.to(torch.bfloat16))
    monkeypatch.setenv("KILN_GEMV", "bogus")
    with pytest.raises(ValueError, match="KILN_GEMV"):
        gemv.use_gemv(xh, w.to(torch.bfloat16))


def test_gemv_config_fills_the_gpu():
    for (N, K) in [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048), (4096, 14336)]:
        c = gemv.gemv_config(1, N, K, 132)
        assert -(-N // c["BLOCK_N"]) >= 2 * 132 and c["BLOCK_N"] * c["BLOCK_K"] <= gemv.TILE_ELEMS
        assert K % c["BLOCK_K"] == 0  # the real shapes take the unmasked path
    assert gemv.gemv_config(9, 2048, 2048)["USE_DOT"]


# ------------------------------------------------------------------------------------------------ rope + KV
@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [None, 16])
def test_rope_and_store_kv_matches_reference(dtype, is_neox, rotary_dim):
    g = fresh_gen()
    T, hq, hk, d, nb, bs = 7, 6, 2, 32, 5, 4
    rot = rotary_dim or d
    cache = rotary.rope_cos_sin_cache(rot, 256, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                                                           "original_max_position_embeddings": 64}, device=DEVICE)
    qkv = torch.randn(T, (hq + 2 * hk) * d, device=DEVICE, dtype=dtype, generator=g)
    q = qkv[:, : hq * d].view(T, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(T, hk, d)
    v = qkv[:, (hq + hk) * d:].view(T, hk, d)
    pos = torch.randint(0, 256, (T,), device=DEVICE, generator=g)
    slots = torch.randperm(nb * bs, device=DEVICE, generator=g)[:T]
    slots[3] = -1  # a padding token: rotated, not stored
    kc = torch.randn(nb, bs, hk, d, device=DEVICE, dtype=dtype, generator=g)
    vc = torch.randn_like(kc)
    q2, k2, v2, kc2, vc2 = q.clone(), k.clone(), v.clone(), kc.clone(), vc.clone()
    kv_cache.rope_and_store_kv_ref(q2, k2, v2, pos, cache, kc2, vc2, slots, is_neox)
    kv_cache._rope_and_store_kv_triton(q, k, v, pos, cache, kc, vc, slots, is_neox)
    tol = RTOL[dtype]
    assert rel_err(q, q2) <= tol and rel_err(k, k2) <= tol and torch.equal(v, v2)
    assert rel_err(kc, kc2) <= tol and torch.equal(vc, vc2)


# ------------------------------------------------------------------------------------------------ GPU, full size
SHAPES = {"1b": dict(h=2048, inter=8192, qkv=3072, vocab=128256), "8b": dict(h=4096, inter=14336, qkv=6144,
                                                                          vocab=128256)}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["1b", "8b"])
@pytest.mark.parametrize("M", [1, 2, 4, 8, 16])
def test_gemv_full_size_decode_shapes_on_gpu(shape, M):
    s = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(M)
    dt = torch.bfloat16
    h, inter = s["h"], s["inter"]
    for N, K in [(s["qkv"], h), (h, h), (2 * inter, h), (h, inter), (s["vocab"], h)]:
        x = torch.randn(M, K, device="cuda", dtype=dt, generator=g)
        w = torch.randn(N, K, device="cuda", dtype=dt, generator=g) * K ** -0.5
        assert gemv.use_gemv(x, w) == (N <= gemv.MAX_GEMV_N), "wide outputs stay on cuBLAS (measured faster)"
        assert rel_err(gemv.linear(x, w), gemv.linear_ref(x, w)) <= 1e-2, (N, K)
    gu = torch.randn(M, 2 * inter, device="cuda", dtype=dt, generator=g)
    wd = torch.randn(h, inter, device="cuda", dtype=dt, generator=g) * inter ** -0.5
    assert rel_err(gemv.silu_mul_linear(gu, wd), gemv.silu_mul_linear_ref(gu, wd)) <= 1e-2
    x, r = (torch.randn(M, h, device="cuda", dtype=dt, generator=g) for _ in range(2))
    nw = torch.rand(h, device="cuda", dtype=dt, generator=g) + 0.5
    wq = torch.randn(s["qkv"], h, device="cuda", dtype=dt, generator=g) * h ** -0.5
    y, summed = gemv.rms_norm_linear(x, nw, 1e-5, wq, None, r)
    y_ref, s_ref = gemv.rms_norm_linear_ref(x, nw, 1e-5, wq, None, r)
    assert rel_err(y, y_ref) <= 1e-2 and torch.equal(summed, s_ref)


@pytest.mark.gpu
def test_gemv_is_cuda_graph_capturable():
    dt = torch.bfloat16
    x = torch.randn(1, 2048, device="cuda", dtype=dt)
    w = torch.randn(3072, 2048, device="cuda", dtype=dt)
    nw = torch.rand(2048, device="cuda", dtype=dt)
    r = torch.randn_like(x)
    wd = torch.randn(2048, 4096, device="cuda", dtype=dt)
    gu = torch.randn(1, 8192, device="cuda", dtype=dt)

    def step():
        return gemv.linear(x, w), gemv.rms_norm_linear(x, nw, 1e-5, w, None, r)[0], gemv.silu_mul_linear(gu, wd)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    x.copy_(torch.randn_like(x))
    gu.copy_(torch.randn_like(gu))
    graph.replay()
    torch.cuda.synchronize()
    for got, ref in zip(outs, step()):
        assert torch.equal(got, ref)


# ------------------------------------------------------------------------------------------------ in the model
@requires_triton
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_through_fused_kernels_follows_the_reference_ops(tmp_path, monkeypatch, family):
    """A tiny fp16 model decodes greedily (M = 1 and 2 rows: the GEMV, both prologues, rope + KV store) to the
    same tokens with the Triton kernels (interpreted on a CPU) as with the PyTorch references."""
    pytest.importorskip("transformers")
    from kiln.llm import LLM, SamplingParams
    from tests.llm.conftest import make_checkpoint

    make_checkpoint(tmp_path / family, family, seed=3)
    prompts = [[0, 5, 9, 33, 100, 7, 12], [0, 3, 200]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    calls = {"gemv": [], "rope": 0}
    launch, rope = gemv._launch, kv_cache._rope_and_store_kv_triton

    def counting_launch(x2, weight, bias, prologue, K, **kw):
        calls["gemv"].append(prologue)
        return launch(x2, weight, bias, prologue, K, **kw)

    def counting_rope(*a):
        calls["rope"] += 1
        return rope(*a)

    monkeypatch.setattr(gemv, "_launch", counting_launch)
    monkeypatch.setattr(kv_cache, "_rope_and_store_kv_triton", counting_rope)
    tokens = {}
    for mode in ("ref", "triton"):
        monkeypatch.setenv("KILN_OPS", mode)
        llm = LLM(str(tmp_path / family), dtype="float16", max_num_seqs=2, block_size=8)
        tokens[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert tokens["triton"] == tokens["ref"]
    assert set(calls["gemv"]) == {gemv.PROLOGUE_NONE, gemv.PROLOGUE_SILU_MUL, gemv.PROLOGUE_RMS_NORM}
    assert calls["rope"] > 0


def test_linear_bad_inputs_name_the_argument():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight.shape\[1\] \(7\) must match x.shape\[-1\] \(8\)"):
        gemv.linear(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match="weight must have dtype"):
        gemv.linear(x, torch.randn(4, 8).half())
    with pytest.raises(ValueError, match=r"bias.shape\[0\] \(3\) must match weight.shape\[0\] \(4\)"):
        gemv.linear(x, torch.randn(4, 8), torch.randn(3))
    with pytest.raises(ValueError, match="x must have dtype"):
        gemv.linear(x.long(), torch.randn(4, 8))


def test_gemv_is_on_by_default_and_cublas_only_turns_it_off_for_a_block(monkeypatch):
    """Decode-sized bf16 rows take the GEMV unless KILN_GEMV=off or inside ``cublas_only()`` (prefill steps)."""
    monkeypatch.delenv("KILN_GEMV", raising=False)
    monkeypatch.setenv("KILN_OPS", "triton")  # CPU tensors count as the Triton path, so the routing is visible here
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    assert gemv.use_gemv(x, w)
    with gemv.cublas_only():
        assert not gemv.use_gemv(x, w)
        with gemv.cublas_only():
            assert not gemv.use_gemv(x, w)
        assert not gemv.use_gemv(x, w)
    assert gemv.use_gemv(x, w)
