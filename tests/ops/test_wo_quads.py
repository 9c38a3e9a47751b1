"""Row-interleaved int4 weights (``interleave_int4_rows``): the layout, the one-row quads GEMV and the joined dot that
read it, against the dequantize-and-matmul reference.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 on tiny shapes; on a GPU at Llama sizes with the
default tiles (split K, PDL, prefetch).
"""

import pytest
import torch

from kiln.ops import wo_gemm
from kiln.ops.activation import silu_and_mul_ref
from tests.conftest import DEVICE, requires_triton
from tests.ops.sm90 import ptxas_path, sm90_compile

BIG = DEVICE.type == "cuda"
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def operands(N, K, G, dtype, zeros=True, bias=False, M=1, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randint(0, 256, (N, K // 2), device=DEVICE, dtype=torch.uint8, generator=g)
    s = torch.rand(N, K // G, device=DEVICE, generator=g) * 0.02 + 1e-3
    z = torch.randint(0, 16, (N, K // G), device=DEVICE, dtype=torch.uint8, generator=g) if zeros else None
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=g)
    b = torch.randn(N, device=DEVICE, dtype=dtype, generator=g) if bias else None
    return x, q, s, z, b


def reference(x, q, s, z, G, b, glu):
    y = wo_gemm.w4a16_linear_ref(x, q, s, z, G, b)
    return silu_and_mul_ref(y) if glu else y


def test_interleave_layout_round_trip_and_bad_shapes():
    q = torch.randint(0, 256, (12, 16), dtype=torch.uint8)
    words = q.view(torch.int32)  # [12, 4]: word j of row n
    quads = wo_gemm.interleave_int4_rows(q, 4)
    assert quads.shape == (3, 4, 4) and quads.dtype == torch.int32
    for n in range(12):
        for j in range(4):
            assert quads[n // 4, j, n % 4] == words[n, j]
    assert torch.equal(wo_gemm.deinterleave_int4_rows(quads), q)
    assert wo_gemm.int4_weight_shape(quads) == wo_gemm.int4_weight_shape(q) == (12, 32)
    assert torch.equal(wo_gemm.dequantize_int4_weight(quads, torch.ones(12, 1), None, 32),
                       wo_gemm.dequantize_int4_weight(q, torch.ones(12, 1), None, 32))
    with pytest.raises(ValueError, match="divisible by 8"):
        wo_gemm.interleave_int4_rows(q[:10], 8)
    with pytest.raises(ValueError, match="uint8"):
        wo_gemm.interleave_int4_rows(q.view(torch.int8), 4)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("NKG, zeros, bias", [((40, 384, 128), True, False), ((48, 192, 64), False, True),
                                              ((24, 96, 32), True, True)] if not BIG else
                         [((6144, 4096, 128), True, False), ((2000, 2048, 64), False, True),
                          ((1032, 1024, 32), True, True)])
def test_quads_gemv_matches_reference(dtype, glu, split, NKG, zeros, bias):
    """One row: tiles that leave a partial last tile of quads (40 rows = 5 tiles of 8), the symmetric layout, a
    bias, K split with the in-kernel sum, and the SiLU-and-mul epilogue (gate quads paired with up quads N/2
    further), each run twice (the split-K counters must be re-armed)."""
    N, K, G = NKG
    x, q, s, z, b = operands(N, K, G, dtype, zeros, bias)
    quads = wo_gemm.interleave_int4_rows(q, 4)
    cfg = None if BIG and split == 1 else dict(BLOCK_Q=2, BLOCK_W=min(4, G // 8), SPLIT_K=split, num_warps=4)
    if BIG and split > 1:
        cfg = dict(wo_gemm.quads_config(N, K, 4, G, glu=glu), SPLIT_K=split)
    ref = reference(x, q, s, z, G, b, glu)
    first = None
    for _ in range(2):
        out = torch.full(ref.shape, float("nan"), device=DEVICE, dtype=dtype)
        y = wo_gemm._wo_triton(x, quads, s, z, G, b, 4, out=out, config=cfg, glu=glu)
        assert not torch.isnan(out).any(), "an output element was not written"
        assert rel_err(y, ref) <= RTOL[dtype] * (3 if glu and BIG else 1)  # a GPU's exp in the SiLU
        assert first is None or torch.equal(y, first), "split-K sums must give the same bits every call"
        first = y.clone()


@requires_triton
@pytest.mark.parametrize("split", [3] if not BIG else [1, 3])  # (one split runs the same epilogue function)
def test_quads_gemv_epilogues_scale_by_one_over_rms_and_add_the_residual(monkeypatch, split):
    """``wo_fused_linear`` on row-interleaved int4 words (gains folded into the weight): the 1 / rms scale (the row
    read again by the program that finishes the sum: with split K, the last to arrive), the bias, the SiLU-and-mul
    or the residual add, against the fp32 reference and the unfused ops; the norm kernel is never called."""
    from kiln.ops import norm

    monkeypatch.setenv("KILN_OPS", "triton")
    N, K, G = (48, 192, 64) if not BIG else (6144, 4096, 128)
    x, q, s, z, b = operands(N, K, G, torch.bfloat16, zeros=True, bias=True, seed=3)
    x = x * 3
    quads = wo_gemm.WeightOnly(wo_gemm.interleave_int4_rows(q, 4), s, z, G, 4)
    plain = wo_gemm.WeightOnly(q, s, z, G, 4)
    r = torch.randn(1, N, device=DEVICE, dtype=torch.bfloat16)
    cfg = dict(BLOCK_Q=2, BLOCK_W=4, SPLIT_K=split, num_warps=4) if not BIG else dict(
        wo_gemm.quads_config(N, K, 4, G), SPLIT_K=split)
    real = wo_gemm._int4_quads_gemv
    monkeypatch.setattr(wo_gemm, "_int4_quads_gemv", lambda *a, **k: real(*a[:7], cfg, *a[8:], **k))
    unfused_norm = norm.rms_norm
    xn = unfused_norm(x, torch.ones(K, device=DEVICE, dtype=torch.bfloat16), 1e-5)

    def no_norm_kernel(*a, **k):
        raise AssertionError("the fused path called the norm kernel")

    for kwargs, unfused in ((dict(bias=b, rms_eps=1e-5), lambda: plain.linear(xn, b)),
                            (dict(rms_eps=1e-5, glu=True), lambda: silu_and_mul_ref(plain.linear(xn))),
                            (dict(bias=b, residual=r, rms_eps=1e-5), lambda: plain.linear(xn, b) + r)):
        monkeypatch.setattr(norm, "rms_norm", no_norm_kernel)
        got = wo_gemm.wo_fused_linear(x, quads, **kwargs)
        monkeypatch.setattr(norm, "rms_norm", unfused_norm)
        ref = wo_gemm.wo_fused_linear_ref(x, plain, **kwargs)
        assert rel_err(got, ref) <= RTOL[torch.bfloat16], kwargs
        assert rel_err(got, unfused()) <= 2 * RTOL[torch.bfloat16], kwargs
    with pytest.raises(ValueError, match="one-row GEMVs"):  # the plain packing has no such epilogue
        wo_gemm._wo_triton(x, q, s, z, G, None, 4, rms_eps=1e-5)


@requires_triton
@pytest.mark.parametrize("M, glu", [(3, False), (5, True), (17, False)] if not BIG else
                         [(4, False), (16, True), (64, False), (300, False)])
def test_quads_joined_dot_matches_reference(M, glu):
    """More rows read the same words into the joined dot tile; with up to 16 rows also with the SiLU-and-mul."""
    N, K, G = (40, 256, 64) if not BIG else (4096, 4096, 128)
    x, q, s, z, b = operands(N, K, G, torch.float32, bias=True, M=M)
    y = wo_gemm._wo_triton(x, wo_gemm.interleave_int4_rows(q, 4), s, z, G, b, 4, glu=glu)
    assert rel_err(y, reference(x, q, s, z, G, b, glu)) <= RTOL[torch.float32] * (3 if glu and BIG else 1)


def test_public_ops_take_interleaved_weights_on_every_backend():
    """``w4a16_linear`` / ``wo_glu_linear`` / ``WeightOnly`` accept the interleaved words wherever they run (the
    reference dequantizes them; the GPU and the interpreter run the kernels)."""
    N, K, G = 16, 64, 32
    x, q, s, z, _ = operands(N, K, G, torch.float32, M=1)
    quads = wo_gemm.interleave_int4_rows(q, 4)
    ref = wo_gemm.w4a16_linear_ref(x, q, s, z, G)
    assert rel_err(wo_gemm.w4a16_linear(x, quads, s, z, G), ref) <= 1e-5
    weight = wo_gemm.WeightOnly(quads, s, z, G, 4)
    assert rel_err(weight.linear(x), ref) <= 1e-5
    assert rel_err(wo_gemm.wo_glu_linear(x, weight), silu_and_mul_ref(ref)) <= 3e-5  # a GPU's exp


@pytest.mark.parametrize("call, match", [
    (lambda x, quads, s: wo_gemm.w4a16_linear(x[:, :32], quads, s[:, :1], None, 32), "expected shape"),
    (lambda x, quads, s: wo_gemm.w4a16_linear(x, quads.to(torch.int16), s, None, 32), "int32"),
    (lambda x, quads, s: wo_gemm.w4a16_linear(x, quads[..., :3], s, None, 32), "bias|rows|scales"),
    (lambda x, quads, s: wo_gemm.wo_glu_linear(x, wo_gemm.WeightOnly(quads[:3], s[:12], None, 32, 4)),
     "gate rows a multiple"),
])
def test_interleaved_weights_reject_bad_input(call, match):
    x = torch.randn(1, 64)
    quads = wo_gemm.interleave_int4_rows(torch.randint(0, 256, (16, 32), dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=match):
        call(x, quads, torch.rand(16, 2))


def test_quads_config_splits_k_for_small_linears_only():
    """About six programs per SM: the 8B LM head (2004 tiles of 64 rows) runs whole sums; o_proj (64 tiles) and
    down_proj split K (the fastest splits of session 19's sweep on the H100); with the SiLU-and-mul epilogue a
    program takes 32 gate and 32 up rows, at about 16 per SM down to four K steps a split (session 28, in the H200
    engine: the 8B gate_up at 4 splits, the 1B's at 4, not 8)."""
    cfg = wo_gemm.quads_config(128256, 4096, 4, 128, 132, interp=False)
    assert (cfg["BLOCK_Q"], cfg["BLOCK_W"], cfg["SPLIT_K"], cfg["num_warps"]) == (16, 16, 1, 2)
    assert wo_gemm.quads_config(4096, 4096, 4, 128, 132, interp=False)["SPLIT_K"] == 12
    assert wo_gemm.quads_config(4096, 14336, 4, 128, 132, interp=False)["SPLIT_K"] == 12
    glu = wo_gemm.quads_config(28672, 4096, 4, 128, 132, glu=True, interp=False)
    assert (glu["BLOCK_Q"], glu["SPLIT_K"]) == (8, 4)
    assert wo_gemm.quads_config(16384, 2048, 4, 128, 132, glu=True, interp=False)["SPLIT_K"] == 4
    assert wo_gemm.quads_config(4096, 4096, 4, 32, 132, interp=False)["BLOCK_W"] == 4  # a step inside a group


@pytest.mark.skipif(ptxas_path() is None, reason="needs Triton's bundled ptxas")
@pytest.mark.parametrize("N, K, glu", [(4096, 14336, False), (28672, 4096, True), (128256, 4096, False)])
def test_quads_gemv_compiles_lean_for_sm90(N, K, glu):
    """The default quads tiles compiled for the H100 here: no spills, and under 4.2 SASS instructions per code in
    the main loop (session 19: 3.7-3.8; the usual packing's GEMV takes ~6.7, which made it issue-bound)."""
    cfg = wo_gemm.quads_config(N, K, 4, 128, 132, glu, interp=False)
    warps = cfg.pop("num_warps")
    sig = dict(ONE_BITS="i32", X="*bf16", W="*i32", S="*fp32", Z="*u8", B="*bf16", P="*fp32", Y="*bf16",
               Counters="*i32")
    consts = dict(R=4, GROUP=128, HAS_ZERO=True, HAS_BIAS=False, PDL=True, GLU=glu, **cfg)
    regs, spills, loop = sm90_compile("kiln.ops.wo_gemm", "_int4_quads_gemv_kernel", sig, consts, warps)
    assert spills == 0, (cfg, regs)
    codes = cfg["BLOCK_Q"] * 4 * cfg["BLOCK_W"] * 8 * (2 if glu else 1) // (32 * warps)
    if loop:
        assert sum(loop.values()) <= 4.2 * codes, loop


@requires_triton
@pytest.mark.parametrize("rows", [0, 4])
def test_dequantize_int4_triton_is_exact_on_both_layouts(rows):
    N, K, G = (72, 384, 64) if not BIG else (4096, 4096, 128)
    _, q, s, z, _ = operands(N, K, G, torch.float32)
    qw = wo_gemm.interleave_int4_rows(q, rows) if rows else q
    for zeros in (z, None):
        ref = wo_gemm.dequantize_int4_weight(q, s, zeros, G)
        assert torch.equal(wo_gemm.dequantize_int4_triton(qw, s, zeros, G, torch.float32), ref)
        half = wo_gemm.dequantize_int4_triton(qw, s, zeros, G, torch.bfloat16).float()
        assert ((half - ref).abs() <= ref.abs() * 2**-7).all()  # one bf16 step (the interpreter may truncate)


@requires_triton
@pytest.mark.parametrize("rows", [0, 4])
@pytest.mark.parametrize("glu", [False, True])
def test_many_rows_dequantize_in_slices_then_float_gemm(monkeypatch, rows, glu):
    """From INT4_DEQUANT_MIN_M rows the weight is dequantized to x's dtype (in slices of bounded bytes: 64 rows
    here, so 200 rows take four, the last partial) and multiplied by the float GEMM; with the SiLU-and-mul whole."""
    monkeypatch.setattr(wo_gemm, "INT4_DEQUANT_SLICE_BYTES", 64 * 256 * 4)
    N, K, G = 200, 256, 64
    x, q, s, z, b = operands(N, K, G, torch.float32, bias=True, M=wo_gemm.INT4_DEQUANT_MIN_M)
    qw = wo_gemm.interleave_int4_rows(q, rows) if rows else q
    out = torch.full((x.shape[0], N // 2 if glu else N), float("nan"), device=DEVICE)
    y = wo_gemm._wo_triton(x, qw, s, z, G, b, 4, out=out, glu=glu)
    assert not torch.isnan(out).any()
    assert rel_err(y, reference(x, q, s, z, G, b, glu)) <= 1e-5
