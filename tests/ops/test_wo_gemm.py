"""Weight-only GEMMs (W8A16, W4A16): the Triton kernel matches the dequantize-and-matmul reference.

On a CPU-only machine the kernel runs under TRITON_INTERPRET=1 on tiny odd shapes; on a GPU at larger sizes.
"""

import pytest
import torch

from kiln.ops import wo_gemm
from kiln.ops.activation import silu_and_mul_ref
from kiln.ops.selfcheck import all_checks
from kiln.ops._counters import split_counters
from tests.conftest import DEVICE, requires_triton
from tests.ops.sm90 import ptxas_path, sm90_compile

BIG = DEVICE.type == "cuda"
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
M_VALUES = [1, 3, 17] if not BIG else [1, 4, 16, 300]


def fresh_gen():
    return torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def int8_operands(N, K, g):
    q = torch.randint(-127, 128, (N, K), device=DEVICE, dtype=torch.int8, generator=g)
    s = torch.rand(N, device=DEVICE, generator=g) * 0.02 + 1e-3
    return q, s


def int4_operands(N, K, G, g):
    q = torch.randint(0, 256, (N, K // 2), device=DEVICE, dtype=torch.uint8, generator=g)
    s = torch.rand(N, K // G, device=DEVICE, generator=g) * 0.02 + 1e-3
    z = torch.randint(0, 16, (N, K // G), device=DEVICE, dtype=torch.uint8, generator=g)
    return q, s, z


def poisoned(M, N, dtype):
    return torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", M_VALUES)
@pytest.mark.parametrize("NK", [(37, 83), (45, 96)] if not BIG else [(4096, 4096), (1003, 1231)])
def test_w8a16_triton_matches_dequantized_reference(dtype, M, NK):
    N, K = NK
    g = fresh_gen()
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=g)
    q, s = int8_operands(N, K, g)
    bias = torch.randn(N, device=DEVICE, dtype=dtype, generator=g)
    for b in (None, bias):
        out = poisoned(M, N, dtype)
        y = wo_gemm._wo_triton(x, q, s, None, 0, b, bits=8, out=out)
        assert not torch.isnan(out).any(), "an output element was not written"
        assert rel_err(y, wo_gemm.w8a16_linear_ref(x, q, s, b)) <= RTOL[dtype]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", M_VALUES)
@pytest.mark.parametrize("NKG", [(37, 96, 32), (45, 192, 64), (19, 256, 128)] if not BIG
                         else [(4096, 4096, 128), (1003, 2048, 64), (777, 1024, 32)])
def test_w4a16_triton_matches_dequantized_reference(dtype, M, NKG):
    N, K, G = NKG
    g = fresh_gen()
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=g)
    q, s, z = int4_operands(N, K, G, g)
    bias = torch.randn(N, device=DEVICE, dtype=dtype, generator=g)
    for zeros, b in ((z, None), (None, bias), (z, bias)):
        out = poisoned(M, N, dtype)
        y = wo_gemm._wo_triton(x, q, s, zeros, G, b, bits=4, out=out)
        assert not torch.isnan(out).any(), "an output element was not written"
        assert rel_err(y, wo_gemm.w4a16_linear_ref(x, q, s, zeros, G, b)) <= RTOL[dtype]


@requires_triton
def test_weight_only_triton_takes_strided_inputs_and_leading_dims(monkeypatch):
    monkeypatch.setenv("KILN_OPS", "triton")
    g = fresh_gen()
    N, K, G = 29, 128, 32
    x = torch.randn(2, K, 5, device=DEVICE, generator=g).transpose(1, 2)  # [2, 5, K], K not contiguous
    q8, s8 = int8_operands(N, K + 7, g)
    q8 = q8[:, :K]  # rows strided past K
    y8 = wo_gemm.w8a16_linear(x, q8, s8)
    assert y8.shape == (2, 5, N)
    assert rel_err(y8, wo_gemm.w8a16_linear_ref(x.contiguous(), q8.contiguous(), s8)) <= 1e-5
    q4, s4, z4 = int4_operands(N, K, G, g)
    s4_t = s4.T.contiguous().T  # non-contiguous scales
    y4 = wo_gemm.w4a16_linear(x, q4, s4_t, z4, G)
    assert rel_err(y4, wo_gemm.w4a16_linear_ref(x.contiguous(), q4, s4, z4, G)) <= 1e-5


@requires_triton
def test_weight_only_triton_fixed_configs_cover_gemv_and_dot_paths():
    """Explicit GPU-style tiles (BLOCK_K 128 = whole group, 64 < group; the int4 GEMV on bytes and on 32-bit words,
    each with both accumulation orders; the int4 dot on split even/odd halves and on joined nibbles, with split-K)
    run correctly in the interpreter too."""
    g = fresh_gen()
    N, K, G = 40, 256, 128
    q, s, z = int4_operands(N, K, G, g)
    for M, cfg in ((1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=128, USE_DOT=False)),
                   (1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=128, USE_DOT=False, REDUCE_EACH_TILE=False)),
                   (1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=128, USE_DOT=False, INT4_WORDS=True)),
                   (1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, USE_DOT=False, INT4_WORDS=True,
                            REDUCE_EACH_TILE=False)),
                   (5, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, USE_DOT=True)),
                   (5, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, USE_DOT=True, INT4_JOIN=True)),
                   (20, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, USE_DOT=True, INT4_JOIN=True, SPLIT_K=2))):
        x = torch.randn(M, K, device=DEVICE, generator=g)
        y = wo_gemm._wo_triton(x, q, s, z, G, None, bits=4, config=cfg)
        assert rel_err(y, wo_gemm.w4a16_linear_ref(x, q, s, z, G)) <= 1e-5
    with pytest.raises(ValueError, match="BLOCK_K"):
        wo_gemm._wo_triton(torch.randn(1, 96, device=DEVICE), *int4_operands(N, 96, 32, g), 32, None, bits=4,
                           config=dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, USE_DOT=False))


@requires_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_split_k_decode_tiles_match_reference(bits):
    """Decode-sized calls split K over extra programs (fp32 partials, summed by each tile's last split program, the
    bias once); every split count, including one that leaves a short last split, gives the reference result, writes
    every element, gives the same bits on a second call and leaves the arrival counters re-armed at 0 (int8 ignores
    INT4_WORDS)."""
    g = fresh_gen()
    N, K, G = (37, 320, 32) if not BIG else (4096, 4096, 128)
    ops = int8_operands(N, K, g) if bits == 8 else int4_operands(N, K, G, g)
    bias = torch.randn(N, device=DEVICE, generator=g)
    bk = 32 if not BIG else 128
    for M, cfg in ((1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=bk, USE_DOT=False)),
                   (1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=bk, USE_DOT=False, INT4_WORDS=True)),
                   (5, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk if not BIG else 64, USE_DOT=True))):
        x = torch.randn(M, K, device=DEVICE, generator=g)
        for split in (2, 3, 7):
            out = poisoned(M, N, torch.float32)
            if bits == 8:
                y = wo_gemm._wo_triton(x, *ops, None, 0, bias, bits=8, out=out, config=dict(cfg, SPLIT_K=split))
                ref = wo_gemm.w8a16_linear_ref(x, *ops, bias)
            else:
                y = wo_gemm._wo_triton(x, *ops, G, bias, bits=4, out=out, config=dict(cfg, SPLIT_K=split))
                ref = wo_gemm.w4a16_linear_ref(x, *ops, G, bias)
            assert not torch.isnan(out).any(), "an output element was not written"
            assert rel_err(y, ref) <= 1e-5, (M, split)
            assert not split_counters(DEVICE, 1).any(), "a split-K arrival counter was left armed"
            again = wo_gemm._wo_triton(x, *ops, *((None, 0) if bits == 8 else (G,)), bias, bits=bits,
                                       config=dict(cfg, SPLIT_K=split))
            assert torch.equal(again, y), (M, split)


@requires_triton
def test_split_k_without_counters_takes_whole_sums(monkeypatch):
    """While a CUDA graph is captured the counter buffer cannot grow (split_counters gives None): a split-K config
    then runs unsplit, with the same result."""
    g = fresh_gen()
    N, K, G = 37, 320, 32
    ops = int4_operands(N, K, G, g)
    x = torch.randn(1, K, device=DEVICE, generator=g)
    cfg = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, USE_DOT=False, INT4_WORDS=True, SPLIT_K=3)
    monkeypatch.setattr(wo_gemm, "split_counters", lambda device, n: None)
    y = wo_gemm._wo_triton(x, *ops, G, None, bits=4, out=poisoned(1, N, torch.float32), config=cfg)
    assert rel_err(y, wo_gemm.w4a16_linear_ref(x, *ops, G)) <= 1e-5


def test_split_counters_are_zeroed_shared_and_outgrown_buffers_stay_alive():
    """One zeroed counter buffer per device (and stream) serves every split-K call; asking for more counters than it
    holds makes a bigger zeroed one and keeps the old one referenced (a captured CUDA graph may still point at it)."""
    from kiln.ops import _counters

    a = split_counters(DEVICE, 8)
    assert a.dtype == torch.int32 and a.numel() >= 8 and not a.any()
    assert split_counters(DEVICE, 8).data_ptr() == a.data_ptr()
    b = split_counters(DEVICE, a.numel() + 1)
    assert b.numel() > a.numel() and not b.any()
    assert any(t is a for t in _counters._RETIRED)
    assert split_counters(DEVICE, 1).data_ptr() == b.data_ptr()


@pytest.mark.gpu
def test_split_counters_are_per_stream_and_split_gemvs_on_two_streams_stay_correct():
    """Kernels on two streams may overlap, so each stream counts split-K arrivals in its own buffer: int4 GEMVs that
    split K, launched alternately on two streams without waiting for each other, all give the reference result."""
    side = torch.cuda.Stream()
    main_buf = split_counters("cuda", 8)
    with torch.cuda.stream(side):
        assert split_counters("cuda", 8).data_ptr() != main_buf.data_ptr()
    g = fresh_gen()
    N, K, G = 1024, 4096, 128
    ops = int4_operands(N, K, G, g)
    xs = [torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(8)]
    refs = [wo_gemm.w4a16_linear_ref(x, *ops, G) for x in xs]
    cfg = dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, USE_DOT=False, INT4_WORDS=True, REDUCE_EACH_TILE=False,
               SPLIT_K=8, num_warps=2)
    side.wait_stream(torch.cuda.current_stream())
    outs = []
    for i, x in enumerate(xs):
        with torch.cuda.stream(side if i % 2 else torch.cuda.current_stream()):
            outs.append(wo_gemm._wo_triton(x, *ops, G, None, bits=4, config=cfg))
    torch.cuda.synchronize()
    for y, ref in zip(outs, refs):
        assert rel_err(y, ref) <= RTOL[torch.bfloat16]


@requires_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_gemv_prefetch_gives_the_same_bits_and_is_for_the_gemv_only(bits):
    """The prefetching GEMV (the default for one row) computes exactly what the plain loop does: same tiles, same
    order of operations, every split (a short last split masks its prefetch past the end)."""
    g = fresh_gen()
    N, K, G = 37, 320, 32
    ops = int8_operands(N, K, g) if bits == 8 else int4_operands(N, K, G, g)
    gs = 0 if bits == 8 else G
    x = torch.randn(1, K, device=DEVICE, dtype=torch.bfloat16, generator=g)
    base = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, USE_DOT=False, INT4_WORDS=bits == 4)
    if bits == 8:
        ops = (ops[0], ops[1], None)
    for split in (1, 3):
        cfg = dict(base, SPLIT_K=split)
        plain = wo_gemm._wo_triton(x, *ops, gs, None, bits=bits, config=dict(cfg, PREFETCH=False))
        fetched = wo_gemm._wo_triton(x, *ops, gs, None, bits=bits, config=dict(cfg, PREFETCH=True))
        assert torch.equal(plain, fetched), split
        ref = (wo_gemm.w8a16_linear_ref(x, ops[0], ops[1]) if bits == 8
               else wo_gemm.w4a16_linear_ref(x, *ops, G))
        assert rel_err(fetched, ref) <= RTOL[torch.bfloat16]
    with pytest.raises(ValueError, match="PREFETCH is for the one-row GEMV"):
        wo_gemm._wo_triton(torch.randn(3, K, device=DEVICE), *ops, gs, None, bits=bits,
                           config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, USE_DOT=True, PREFETCH=True))


@requires_triton
@pytest.mark.parametrize("glu", [False, True])
def test_int8_gemv_pipelined_loads_give_the_same_bits(glu):
    """The int8 GEMV with its loads pipelined by the compiler (``STAGES``, no register prefetch: the wide weights'
    tile) computes exactly what the prefetching loop does, with the SiLU-and-mul epilogue too and a ragged
    last K tile (masked copies), and matches the reference; the interpreter runs the same loop body that the GPU
    pipelines."""
    g = fresh_gen()
    N, K = (64, 330) if not BIG else (28672, 4100)  # a ragged last K tile
    q, s = int8_operands(N, K, g)
    x = torch.randn(1, K, device=DEVICE, dtype=torch.bfloat16, generator=g)
    bn, bk = (16, 32) if not BIG else wo_gemm.INT8_PIPELINED_TILE[:2]
    base = dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, SPLIT_K=1, num_warps=4)
    fetched = wo_gemm._wo_triton(x, q, s, None, 0, None, bits=8, config=dict(base, PREFETCH=True), glu=glu)
    piped = wo_gemm._wo_triton(x, q, s, None, 0, None, bits=8, config=dict(base, PREFETCH=False, STAGES=6), glu=glu)
    assert torch.equal(fetched, piped)
    ref = wo_gemm.w8a16_linear_ref(x, q, s)
    if glu:
        ref = silu_and_mul_ref(ref)
    assert rel_err(piped, ref) <= RTOL[torch.bfloat16]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("residual", [True, False])
def test_int8_gemv_folds_the_rms_norm_with_the_unfused_bits(monkeypatch, dtype, residual):
    """``wo_rms_norm_linear`` on one int8 decode row: one launch (the norm kernel is never called) that gives the
    bits of ``rms_norm`` then the GEMV (``KILN_WO_NORM_FOLD=0``), ragged K, with the residual sum returned; the
    composed reference agrees to the dtype's tolerance."""
    from kiln.ops import norm

    monkeypatch.setenv("KILN_OPS", "triton")  # CPU tensors take the Triton path (the interpreter)
    g = fresh_gen()
    N, K = (48, 130) if not BIG else (3072, 2048)  # BIG: the 1B qkv_proj
    weight = wo_gemm.WeightOnly(*int8_operands(N, K, g))
    x = torch.randn(1, K, device=DEVICE, dtype=dtype, generator=g)
    r = torch.randn(1, K, device=DEVICE, dtype=dtype, generator=g) if residual else None
    nw = (torch.rand(K, device=DEVICE, generator=g) + 0.5).to(dtype)
    unfused = norm.rms_norm

    def no_norm_kernel(*a, **k):
        raise AssertionError("the folded path called the norm kernel")

    monkeypatch.setattr(norm, "rms_norm", no_norm_kernel)
    got = wo_gemm.wo_rms_norm_linear(x, nw, 1e-5, weight, None, r)
    monkeypatch.setattr(norm, "rms_norm", unfused)
    monkeypatch.setenv("KILN_WO_NORM_FOLD", "0")
    want = wo_gemm.wo_rms_norm_linear(x, nw, 1e-5, weight, None, r)
    ref = wo_gemm.wo_rms_norm_linear_ref(x, nw, 1e-5, weight, None, r)
    if residual:
        assert torch.equal(got[1], want[1])
        got, want, ref = got[0], want[0], ref[0]
    assert got.shape == (1, N)
    if BIG:  # each kernel sums the row's squares in its own order: 1 / rms may move by an ulp
        assert rel_err(got, want) <= RTOL[dtype]
    else:
        assert torch.equal(got, want)
    assert rel_err(got, ref) <= RTOL[dtype]


@requires_triton
def test_int8_gemv_norm_prologue_over_split_k_and_its_errors(monkeypatch):
    """Split K: the first program stores the whole residual sum, every split normalises its own part of the row;
    the result is the unfused one.
    The prologue is for one int8 row only, and a wrong norm weight is a clear error; more rows, or a row longer than
    ``MAX_WO_NORM_K``, run the norm kernel and then the GEMV."""
    from kiln.ops.norm import rms_norm

    monkeypatch.setenv("KILN_OPS", "triton")  # the norm kernel too (the interpreter on a CPU)
    g = fresh_gen()
    N, K = 40, 200
    q, s = int8_operands(N, K, g)
    x = torch.randn(1, K, device=DEVICE, dtype=torch.bfloat16, generator=g)
    r = torch.randn(1, K, device=DEVICE, dtype=torch.bfloat16, generator=g)
    nw = torch.rand(K, device=DEVICE, generator=g).to(torch.bfloat16) + 0.5
    h, summed = rms_norm(x, nw, 1e-6, r)
    cfg = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, USE_DOT=False, SPLIT_K=3)
    ro = torch.full_like(x, float("nan"))
    y = wo_gemm._wo_triton(x, q, s, None, 0, None, bits=8, config=cfg, norm=(nw, 1e-6, r, ro))
    assert torch.equal(ro, summed)
    assert torch.equal(y, wo_gemm._wo_triton(h, q, s, None, 0, None, bits=8, config=cfg))
    with pytest.raises(ValueError, match="one-row int8 GEMV"):
        wo_gemm._wo_triton(x.expand(2, K), q, s, None, 0, None, bits=8, norm=(nw, 1e-6, None, None))
    with pytest.raises(ValueError, match="weight"):
        wo_gemm.wo_rms_norm_linear(x, nw[:-1], 1e-6, wo_gemm.WeightOnly(q, s))
    calls = []
    monkeypatch.setattr(wo_gemm, "_wo_triton", lambda *a, **k: calls.append(k.get("norm")) or torch.zeros(1))
    for rows, k in ((2, K), (1, wo_gemm.MAX_WO_NORM_K + 64)):
        xx = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16, generator=g)
        wo_gemm.wo_rms_norm_linear(xx, torch.ones(k, device=DEVICE, dtype=torch.bfloat16), 1e-6,
                                   wo_gemm.WeightOnly(*int8_operands(8, k, g)))
    assert calls == [None, None]  # the GEMV ran, without the prologue


@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_gemv_epilogues_scale_by_one_over_rms_and_add_the_residual(monkeypatch, dtype):
    """``wo_fused_linear`` on one int8 decode row (gains folded into the weight): the output times 1 / rms(x), with
    the bias, the SiLU-and-mul or the residual add, in one launch that never calls the norm kernel, against the fp32
    reference and against the unfused ops (a unit-gain RMSNorm, the linear, the add); the residual add has the
    unfused rounding exactly. Ragged N and K; the narrow weight is forced unsplit."""
    from kiln.ops import norm

    monkeypatch.setenv("KILN_OPS", "triton")
    g = fresh_gen()
    N, K = (40, 130) if not BIG else (3072, 2048)
    weight = wo_gemm.WeightOnly(*int8_operands(N, K, g))
    x = torch.randn(1, K, device=DEVICE, dtype=dtype, generator=g) * 3
    bias = torch.randn(N, device=DEVICE, dtype=dtype, generator=g)
    r = torch.randn(1, N, device=DEVICE, dtype=dtype, generator=g)
    unfused_norm = norm.rms_norm
    unit = torch.ones(K, device=DEVICE, dtype=dtype)
    xn = unfused_norm(x, unit, 1e-5)
    cases = [  # (kwargs, the unfused ops)
        (dict(bias=bias, rms_eps=1e-5), lambda: weight.linear(xn, bias)),
        (dict(rms_eps=1e-5, glu=True), lambda: silu_and_mul_ref(weight.linear(xn))),
        (dict(residual=r), lambda: weight.linear(x) + r),
        (dict(bias=bias, residual=r, rms_eps=1e-5), lambda: weight.linear(xn, bias) + r),
    ]

    def no_norm_kernel(*a, **k):
        raise AssertionError("the fused path called the norm kernel")

    for kwargs, unfused in cases:
        monkeypatch.setattr(norm, "rms_norm", no_norm_kernel)
        got = wo_gemm.wo_fused_linear(x, weight, **kwargs)
        monkeypatch.setattr(norm, "rms_norm", unfused_norm)
        ref = wo_gemm.wo_fused_linear_ref(x, weight, **kwargs)
        assert got.shape == ref.shape == (1, N // 2 if kwargs.get("glu") else N)
        assert rel_err(got, ref) <= RTOL[dtype], kwargs
        assert rel_err(got, unfused()) <= 2 * RTOL[dtype], kwargs
        # the unfused add's bits; not in bf16 under the interpreter (its fp32 -> bf16 cast truncates where torch's
        # rounds), nor in fp32 on a GPU (the scale's product and the add may contract into one FMA)
        if set(kwargs) == {"residual"} and (dtype == torch.bfloat16) == BIG:
            assert torch.equal(got, weight.linear(x) + r)


@requires_triton
def test_int8_gemv_epilogues_errors_and_fallbacks(monkeypatch):
    """Bad arguments are ValueErrors naming them; more rows and int4 weights in the usual packing run the unfused
    ops, which give what they would give composed by hand."""
    monkeypatch.setenv("KILN_OPS", "triton")
    g = fresh_gen()
    N, K = 24, 64
    weight = wo_gemm.WeightOnly(*int8_operands(N, K, g))
    x = torch.randn(1, K, device=DEVICE, dtype=torch.bfloat16, generator=g)
    r = torch.randn(1, N, device=DEVICE, dtype=torch.bfloat16, generator=g)
    with pytest.raises(ValueError, match="residual must have shape"):
        wo_gemm.wo_fused_linear(x, weight, residual=r[:, :-1])
    with pytest.raises(ValueError, match="residual"):
        wo_gemm.wo_fused_linear(x, weight, residual=r.float())
    with pytest.raises(ValueError, match="SiLU-and-mul"):
        wo_gemm.wo_fused_linear(x, weight, residual=r[:, : N // 2], glu=True)
    with pytest.raises(ValueError, match="rms_eps"):
        wo_gemm.wo_fused_linear(x, weight, rms_eps=-1.0)
    with pytest.raises(ValueError, match="one-row GEMVs"):
        wo_gemm._wo_triton(x.expand(2, K), *weight[:4], None, 8, rms_eps=1e-6)
    from kiln.ops.norm import rms_norm

    x2 = torch.randn(3, K, device=DEVICE, dtype=torch.bfloat16, generator=g)
    r2 = torch.randn(3, N, device=DEVICE, dtype=torch.bfloat16, generator=g)
    xn = rms_norm(x2, torch.ones(K, device=DEVICE, dtype=torch.bfloat16), 1e-6)
    assert torch.equal(wo_gemm.wo_fused_linear(x2, weight, residual=r2, rms_eps=1e-6), weight.linear(xn) + r2)
    q4, s4, z4 = int4_operands(N, K, 32, g)
    w4 = wo_gemm.WeightOnly(q4, s4, z4, 32, 4)
    xn1 = rms_norm(x, torch.ones(K, device=DEVICE, dtype=torch.bfloat16), 1e-6)
    assert torch.equal(wo_gemm.wo_fused_linear(x, w4, residual=r, rms_eps=1e-6), w4.linear(xn1) + r)


def test_int8_gemv_pipelines_wide_weights_only(monkeypatch):
    """Weights whose row tiles give every SM several CTAs (gate_up, LM head) take the pipelined tile, with no split
    and no register prefetch; so does a down_proj whose 16-row tiles give every SM one (the 8B's), and the gate_up
    feeding it then triggers the dependent launch after its K loop. The other narrow layers (qkv, o_proj, the 1B's
    down_proj) keep the register-prefetch tiles: there a pipeline's prologue is as long as the stream."""
    monkeypatch.setattr(wo_gemm, "interpreting", lambda: False)
    cfg = wo_gemm.wo_config
    for n, k in ((28672, 4096), (128256, 4096), (16384, 2048), (128256, 2048)):
        c = cfg(1, n, k, 8, 0, 132)
        assert (c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["STAGES"]) == wo_gemm.INT8_PIPELINED_TILE, (n, k)
        assert c["SPLIT_K"] == 1 and c["PREFETCH"] is False and "TRIGGER_LATE" not in c
    down = cfg(1, 4096, 14336, 8, 0, 132)
    assert (down["BLOCK_N"], down["BLOCK_K"], down["num_warps"], down["STAGES"]) == wo_gemm.INT8_LONG_K_TILE
    assert down["SPLIT_K"] == 1 and "TRIGGER_LATE" not in down
    assert cfg(1, 28672, 4096, 8, 0, 132, glu=True)["TRIGGER_LATE"] is True  # the 8B gate_up, before that down_proj
    assert "TRIGGER_LATE" not in cfg(1, 16384, 2048, 8, 0, 132, glu=True)  # the 1B's: its down_proj is not pipelined
    for n, k in ((6144, 4096), (4096, 4096), (3072, 2048), (2048, 2048), (2048, 8192)):
        assert "STAGES" not in cfg(1, n, k, 8, 0, 132), (n, k)
    assert "STAGES" not in cfg(1, 28672, 1024, 8, 0, 132)  # too short to fill the pipeline
    assert "STAGES" not in cfg(1, 28672, 4096, 4, 128, 132)  # int4 keeps its own GEMV
    assert "STAGES" not in cfg(4, 28672, 4096, 8, 0, 132)  # more rows: the dot tiles


def test_weight_only_split_k_heuristic_fills_the_gpu_for_decode_only(monkeypatch):
    monkeypatch.setattr(wo_gemm, "interpreting", lambda: False)  # the GPU tiles, also under the interpreter
    sms = 132
    assert wo_gemm.split_k_for(1, 4096, 4096, 1, 64, 128, sms) == 4  # 64 column tiles x 4 splits = 2 programs per SM
    assert wo_gemm.split_k_for(1, 128256, 2048, 1, 64, 128, sms) == 1  # an LM-head-sized N fills the GPU alone
    assert wo_gemm.split_k_for(256, 4096, 4096, 64, 128, 64, sms) == 1  # prefill-sized M: no split
    assert wo_gemm.split_k_for(8, 1024, 14336, 16, 64, 64, sms) == 16  # capped at 16
    assert wo_gemm.split_k_for(64, 4096, 4096, 64, 64, 64, sms) == 2  # batched decode: about one program per SM
    assert wo_gemm.split_k_for(64, 28672, 4096, 64, 64, 64, sms) == 1  # gate_up: enough column tiles
    assert wo_gemm.wo_config(64, 4096, 4096, 8, 0, sms)["BLOCK_M"] == 64  # one row tile for batched decode


def test_int4_gemv_config_four_programs_per_sm(monkeypatch):
    """The one-row int4 tile (session 14's sweep): 64 rows with 4 warps and K split for about four programs per SM,
    down to two K tiles a split; 2 warps where the row tiles alone give four per SM (an LM head); with the
    SiLU-and-mul epilogue (no split possible) 128 rows with 8 warps."""
    monkeypatch.setattr(wo_gemm, "interpreting", lambda: False)

    def pick(n, k, glu=False):
        c = wo_gemm.wo_config(1, n, k, 4, 128, 132, glu)
        return c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["SPLIT_K"]

    assert wo_gemm.split_k_for(1, 4096, 4096, 1, 64, 128, 132, programs_per_sm=4, min_k_tiles=2) == 8
    assert pick(4096, 4096) == (64, 128, 4, 8)  # 8B o_proj: 64 tiles x 8 = 512 programs, 4 K tiles each
    assert pick(2048, 2048) == (64, 128, 4, 8)  # 1B o_proj: capped at two K tiles a split
    assert pick(2048, 8192) == (64, 128, 4, 16)  # 1B down_proj: 16 splits at most
    assert pick(16384, 2048) == (64, 128, 4, 2)
    assert pick(128256, 2048) == (64, 128, 2, 1)  # LM head: 2004 row tiles, no split, 2 warps
    assert pick(28672, 4096, glu=True) == (128, 128, 8, 1)
    assert wo_gemm.wo_config(1, 4096, 4096, 4, 32, 132)["BLOCK_K"] == 32  # a K tile never straddles a group


def test_weight_only_dispatch_uses_reference_off_cuda_and_with_kiln_ops_ref(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, generator=g)
    q = torch.randint(-127, 128, (7, 64), dtype=torch.int8, generator=g)
    s = torch.rand(7, generator=g)
    monkeypatch.setenv("KILN_OPS", "ref")
    assert torch.equal(wo_gemm.w8a16_linear(x, q, s), wo_gemm.w8a16_linear_ref(x, q, s))
    monkeypatch.setenv("KILN_OPS", "auto")
    assert torch.equal(wo_gemm.w8a16_linear(x, q, s), wo_gemm.w8a16_linear_ref(x, q, s))  # CPU tensors -> ref


def test_int4_pack_unpack_round_trip_and_nibble_order():
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    codes = torch.randint(0, 16, (13, 70), dtype=torch.uint8, generator=g)
    packed = wo_gemm.pack_int4(codes)
    assert packed.shape == (13, 35) and packed.dtype == torch.uint8
    assert torch.equal(wo_gemm.unpack_int4(packed), codes)
    assert torch.equal(packed & 0xF, codes[:, 0::2]) and torch.equal(packed >> 4, codes[:, 1::2])
    every = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    assert torch.equal(wo_gemm.pack_int4(wo_gemm.unpack_int4(every)), every)
    with pytest.raises(ValueError, match="even number of columns"):
        wo_gemm.pack_int4(codes[:, :5])
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        wo_gemm.pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))


def test_dequantize_int4_weight_formula():
    codes = torch.tensor([[0, 15, 8, 3] * 8], dtype=torch.uint8)  # one row, K = 32, one group
    scales, zeros = torch.tensor([[0.5]]), torch.tensor([[3]], dtype=torch.uint8)
    w = wo_gemm.dequantize_int4_weight(wo_gemm.pack_int4(codes), scales, zeros, 32)
    assert torch.equal(w, (codes.float() - 3) * 0.5)
    w_sym = wo_gemm.dequantize_int4_weight(wo_gemm.pack_int4(codes), scales, None, 32)
    assert torch.equal(w_sym, (codes.float() - 8) * 0.5)


@pytest.mark.parametrize("call, match", [
    (lambda x, q4, s4, z4, q8, s8: wo_gemm.w4a16_linear(x, q4, s4, z4, 48), "group_size must be one of"),
    (lambda x, q4, s4, z4, q8, s8: wo_gemm.w4a16_linear(x[:, :96], q4[:, :48], s4[:, :3], z4[:, :3], 64),
     "not divisible by group_size"),
    (lambda x, q4, s4, z4, q8, s8: wo_gemm.w4a16_linear(x, q4, s4[:, :1], z4, 32), "scales must have shape"),
    (lambda x, q4, s4, z4, q8, s8: wo_gemm.w4a16_linear(x, q4, s4, z4[:, :1], 32), "zeros must have the shape"),
    (lambda x, q4, s4, z4, q8, s8: wo_gemm.w4a16_linear(x, q4[:, :10], s4, z4, 32), "two int4 codes per byte"),
    (lambda x, q4, s4, z4, q8, s8: wo_gemm.w4a16_linear(x, q8, s4, z4, 32), "qweight must have dtype"),
    (lambda x, q4, s4, z4, q8, s8: wo_gemm.w8a16_linear(x, q8, s8[:3]), "one value per output channel"),
    (lambda x, q4, s4, z4, q8, s8: wo_gemm.w8a16_linear(x[:, :5], q8, s8), "must equal qweight.shape"),
    (lambda x, q4, s4, z4, q8, s8: wo_gemm.w8a16_linear(x.long(), q8, s8), "x must have dtype"),
    (lambda x, q4, s4, z4, q8, s8: wo_gemm.w8a16_linear(x, q8, s8, torch.zeros(3)), "bias has 3 values"),
])
def test_weight_only_ops_reject_bad_input(call, match):
    x = torch.randn(2, 128)
    q4 = torch.zeros(6, 64, dtype=torch.uint8)
    s4, z4 = torch.ones(6, 4), torch.zeros(6, 4, dtype=torch.uint8)
    q8, s8 = torch.zeros(6, 128, dtype=torch.int8), torch.ones(6)
    with pytest.raises(ValueError, match=match):
        call(x, q4, s4, z4, q8, s8)


def test_weight_only_doctor_checks_are_registered_and_pass():
    checks = all_checks()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for name in ("w8a16_linear", "w4a16_linear", "w4a16_linear (row-interleaved)"):
        assert name in checks
        for dtype in DTYPES:
            err, backend = checks[name](DEVICE, dtype, g)
            assert err <= RTOL[dtype], (name, dtype, err, backend)


@pytest.mark.skipif(ptxas_path() is None, reason="needs Triton's bundled ptxas")
@pytest.mark.parametrize("bits, glu", [(8, False), (4, False), (8, True), (4, True)])
def test_default_batch1_tiles_compile_lean_for_sm90(monkeypatch, bits, glu):
    """The one-row GEMV tiles the heuristic picks, compiled for the H100 here (no GPU needed, the launch's 16-byte
    alignment and divisibility specialisations included): no register spills with the prefetched next tile and PDL
    (a spilling tile streams local memory beside its weights), also with the SiLU-and-mul epilogue, and for int4
    one LOP3 and one FFMA per code in the main loop: the magic exponent in a register (as an immediate ptxas emitted
    two LOP3s per code) and no FADD per code (the exponent bias and the zero point leave the sum once per word; the
    session-13 kernel subtracted them from every code: 1.25 FADD per code, 5.6 instructions per code at 128 codes
    per thread, now 4.9 there and ~6.7 at the 64 codes per thread of the default tile). int8 is compiled at the 8B
    gate_up's shape, whose pipelined tile must keep its loads as cp.async copies (LDGSTS: the point of ``STAGES``);
    the register-prefetch int8 tiles are compiled by the residency test below."""
    monkeypatch.setattr(wo_gemm, "interpreting", lambda: False)
    cfg = wo_gemm.wo_config(1, 28672 if bits == 8 else 4096, 4096 if bits == 8 else 14336, bits, 128, 132, glu)
    assert bits == 4 or cfg.get("STAGES")
    warps = cfg.pop("num_warps")
    consts = {**dict(BITS=bits, GROUP=128, HAS_ZERO=True, HAS_BIAS=False, UPCAST=False, PDL=True, PREFETCH=True,
                     REDUCE_EACH_TILE=True, INT4_WORDS=False, INT4_JOIN=False, M=1, stride_xk=1, GLU=glu), **cfg}
    sig = dict(ONE_BITS="i32", X="*bf16", W="*i8" if bits == 8 else "*i32", S="*fp32", Z="*u8", B="*bf16", Y="*fp32",
               Out="*bf16", Counters="*i32")
    regs, spills, loop = sm90_compile("kiln.ops.wo_gemm", "_wo_gemm_kernel", sig, consts, warps)
    assert spills == 0, (cfg, regs, spills)
    if bits == 8 and loop:  # (cuobjdump ships with Triton's ptxas; without it only the spills are checked)
        assert loop.get("LDGSTS", 0) > 0, loop
    if bits == 4 and loop:
        codes = cfg["BLOCK_N"] * cfg["BLOCK_K"] // (32 * warps)  # per thread per K step
        assert loop.get("LOP3", 0) <= 1.25 * codes, loop
        assert loop.get("FADD", 0) <= 0.6 * codes, loop
        assert sum(loop.values()) <= 7.0 * codes, loop


def test_int8_gemv_tile_fills_whole_waves():
    """The one-row int8 tile is the INT8_GEMV_TILES entry whose CTAs fill the most of their last wave (H100: 132
    SMs): the 8B o_proj / down_proj (4096 rows) fit one wave of 8-row tiles at 4 per SM, the 6144-row qkv_proj
    nearly two waves of 4-row tiles at 6 per SM, a 2048-row layer one wave of 4-row tiles at 4 per SM; the LM head
    is many waves either way (the first entry wins)."""
    pick = wo_gemm._int8_gemv_tile
    assert pick(4096, 132) == (8, 1024, 2)
    assert pick(6144, 132) == (4, 1024, 2)
    assert pick(2048, 132) == (4, 2048, 2)
    assert pick(3072, 132) == (4, 1024, 2)
    assert pick(28672, 132) == (8, 1024, 2)
    assert pick(128256, 132) == (8, 1024, 2)
    cfg = wo_gemm._wo_config(1, 4096, 4096, 8, 0, 132, False)
    assert (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["SPLIT_K"]) == (8, 1024, 2, 1)
    assert wo_gemm._wo_config(1, 4096, 512, 8, 0, 132, False)["BLOCK_K"] == 512  # K shorter than the tile


@pytest.mark.skipif(ptxas_path() is None, reason="needs Triton's bundled ptxas")
@pytest.mark.parametrize("tile", wo_gemm.INT8_GEMV_TILES)
def test_int8_gemv_tiles_residency_matches_their_register_use(monkeypatch, tile):
    """INT8_GEMV_TILES states how many CTAs of each tile an SM holds; that follows from the registers ptxas gives
    the tile (allocated per warp in 256-register units, 64K per SM). A kernel change that moves it must update the
    table, or the wave arithmetic picks tiles from wrong numbers."""
    bn, bk, warps, per_sm = tile
    consts = dict(BITS=8, GROUP=128, HAS_ZERO=False, HAS_BIAS=False, UPCAST=False, PDL=True, PREFETCH=True,
                  REDUCE_EACH_TILE=True, INT4_WORDS=False, INT4_JOIN=False, M=1, stride_xk=1, BLOCK_M=1,
                  BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, SPLIT_K=1, GLU=False)
    sig = dict(ONE_BITS="i32", X="*bf16", W="*i8", S="*fp32", Z="*u8", B="*bf16", Y="*fp32", Out="*bf16",
               Counters="*i32")
    regs, spills, _ = sm90_compile("kiln.ops.wo_gemm", "_wo_gemm_kernel", sig, consts, warps)
    per_warp = -(-regs * 32 // 256) * 256
    assert spills == 0 and 65536 // (per_warp * warps) == per_sm, (tile, regs)


@pytest.mark.skipif(ptxas_path() is None, reason="needs Triton's bundled ptxas")
@pytest.mark.parametrize("shape", ["qkv", "gate_up"])
def test_int8_gemv_epilogues_compile_lean_for_sm90(monkeypatch, shape):
    """The 8B decode layer's tiles with the 1 / rms epilogue (its squares summed in the K loop), compiled for
    sm_90: no spills, and the plain tile's residency (CTAs per SM) kept. (The residual add is a load and an add
    after the loop.)"""
    monkeypatch.setattr(wo_gemm, "interpreting", lambda: False)
    N, K, glu = {"qkv": (6144, 4096, False), "gate_up": (28672, 4096, True)}[shape]
    cfg = wo_gemm.wo_config(1, N, K, 8, 0, 132, glu=glu)
    warps = cfg.pop("num_warps")
    pipelined = "STAGES" in cfg
    consts = dict(BITS=8, GROUP=128, HAS_ZERO=False, HAS_BIAS=False, UPCAST=False, PDL=True,
                  PREFETCH=cfg.pop("PREFETCH", True), REDUCE_EACH_TILE=True, INT4_WORDS=False, INT4_JOIN=False, M=1,
                  stride_xk=1, GLU=glu, RMS_SCALE=True, **cfg)
    sig = dict(ONE_BITS="i32", X="*bf16", W="*i8", S="*fp32", Z="*u8", B="*bf16", Y="*bf16", Out="*bf16",
               Counters="*i32", R="*bf16", RO="*bf16", NW="*bf16", eps="fp32")
    regs, spills, _ = sm90_compile("kiln.ops.wo_gemm", "_wo_gemm_kernel", sig, consts, warps)
    base_regs, _, _ = sm90_compile("kiln.ops.wo_gemm", "_wo_gemm_kernel", sig,
                                   dict(consts, RMS_SCALE=False), warps)

    def per_sm(r):
        return 65536 // (-(-r * 32 // 256) * 256 * warps)

    assert spills == 0 and (pipelined or per_sm(regs) >= per_sm(base_regs)), (shape, regs, base_regs)


@pytest.mark.skipif(ptxas_path() is None, reason="needs Triton's bundled ptxas")
def test_int8_gemv_with_the_norm_prologue_compiles_lean_for_sm90(monkeypatch):
    """The 1B qkv_proj's tile with the RMSNorm folded in (the whole-row statistics, the residual sum, each activation
    normalised in the loop), compiled for sm_90: no spills, and no more registers than the plain tile's residency
    allows (H200, session 26: 158 against 156)."""
    monkeypatch.setattr(wo_gemm, "interpreting", lambda: False)
    cfg = wo_gemm.wo_config(1, 3072, 2048, 8, 0, 132)
    warps = cfg.pop("num_warps")
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    per_sm = next(t[3] for t in wo_gemm.INT8_GEMV_TILES if t[:3] == (bn, bk, warps))
    consts = dict(BITS=8, GROUP=128, HAS_ZERO=False, HAS_BIAS=False, UPCAST=False, PDL=True, PREFETCH=True,
                  REDUCE_EACH_TILE=True, INT4_WORDS=False, INT4_JOIN=False, M=1, stride_xk=1, GLU=False,
                  NORM_K=2048, HAS_RESIDUAL=True, **cfg)
    sig = dict(ONE_BITS="i32", X="*bf16", W="*i8", S="*fp32", Z="*u8", B="*bf16", Y="*fp32", Out="*bf16",
               Counters="*i32", R="*bf16", RO="*bf16", NW="*bf16", eps="fp32")
    regs, spills, _ = sm90_compile("kiln.ops.wo_gemm", "_wo_gemm_kernel", sig, consts, warps)
    per_warp = -(-regs * 32 // 256) * 256
    assert spills == 0 and 65536 // (per_warp * warps) >= per_sm, (cfg, regs)
