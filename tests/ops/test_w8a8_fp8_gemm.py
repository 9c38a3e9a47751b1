"""Activation-quantized GEMMs (kiln/ops/gemm.py): the per-token quantization kernel writes the reference's codes
and scales (int8 and fp8, with the SmoothQuant smoother and a static scale), the FP8 GEMM matches dequantize +
matmul, and ``w8a8_linear`` / ``fp8_linear`` match their references.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 on tiny shapes (fp8 ``tl.dot`` included: the
interpreter multiplies e4m3 exactly); on a GPU at full size, the real fp8 path only on cards with fp8.
"""

import pytest
import torch

from kiln.ops import gemm
from tests.conftest import DEVICE, requires_triton
from tests.ops.sm90 import ptxas_path, sm90_compile

BIG = DEVICE.type == "cuda"
FP8 = gemm.FP8_DTYPE
needs_fp8 = pytest.mark.skipif(BIG and not gemm.fp8_supported(DEVICE), reason="no fp8 on this card")


def fresh_gen():
    return torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@requires_triton
@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_activation_kernel_matches_reference(qdtype, dtype):
    g = fresh_gen()
    M, K = (5, 83) if not BIG else (300, 4096)
    x = (torch.randn(M, 2 * K, device=DEVICE, generator=g) * 3).to(dtype)[:, ::2]  # strided rows
    x[1] = 0  # an all-zero row: finite scale, zero codes
    smooth = torch.rand(K, device=DEVICE, generator=g) + 0.5
    for sm, static in ((None, None), (smooth, None), (None, torch.tensor([0.01], device=DEVICE))):
        out = torch.full((M, K), 0x55, dtype=torch.uint8, device=DEVICE).view(qdtype)
        q, s = gemm._quant_act_triton(x, qdtype, sm, static, out=out)
        qr, sr = gemm.quantize_activation_ref(x, qdtype, sm, static)
        assert q.dtype == qdtype and s.dtype == torch.float32 and s.shape == (M,)
        assert torch.isfinite(s).all() and (q[1].float() == 0).all()
        assert torch.allclose(s, sr, rtol=1e-6, atol=0)
        if BIG:  # a GPU reciprocal may round one code differently
            assert (q.float() - qr.float()).abs().max() <= (1.0 if qdtype == torch.int8 else 32.0)
        else:
            assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
        if static is not None:  # the static scale saturates: codes at the format's limit
            assert q.float().abs().max() == (127.0 if qdtype == torch.int8 else 448.0)


def test_quantize_activation_reference_error_bounds():
    g = fresh_gen()
    x = torch.randn(7, 64, device=DEVICE, generator=g) * 5  # the generator lives on DEVICE (cuda on a GPU)
    q, s = gemm.quantize_activation_ref(x, torch.int8)
    assert ((q.float() * s[:, None] - x).abs() <= s[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(dim=1) == 127).all()
    q8, s8 = gemm.quantize_activation_ref(x, FP8)
    assert ((q8.float() * s8[:, None] - x).abs() <= x.abs() / 16 + s8[:, None] * 2.0**-9).all()
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn, got torch.int16"):
        gemm.quantize_activation(x, torch.int16)
    with pytest.raises(ValueError, match="smooth has 3 values but x has K=64"):
        gemm.quantize_activation(x, torch.int8, torch.ones(3, device=DEVICE))


@requires_triton
@needs_fp8
@pytest.mark.parametrize("shape", [(1, 17, 40), (37, 45, 83), (16, 32, 64)] if not BIG
                         else [(1, 4096, 4096), (64, 14336, 4096), (777, 1003, 1232)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_triton_matches_dequantized_reference(shape, out_dtype):
    M, N, K = shape
    g = fresh_gen()
    a = (torch.randn(M, K, device=DEVICE, generator=g) * 20).to(FP8)
    b = (torch.randn(N, K, device=DEVICE, generator=g) * 20).to(FP8)
    bias = torch.randn(N, device=DEVICE, generator=g)
    for sa, sb, bi in ((torch.rand(M, device=DEVICE, generator=g), torch.rand(N, device=DEVICE, generator=g), bias),
                       (torch.rand(1, device=DEVICE, generator=g), torch.rand(1, device=DEVICE, generator=g), None)):
        out = torch.full((M, N), float("nan"), device=DEVICE, dtype=out_dtype)
        c = gemm._fp8_gemm_triton(a, b, sa, sb, bi, out_dtype, out=out)
        assert not torch.isnan(out).any(), "an output element was not written"
        ref = gemm.fp8_gemm_ref(a, b, sa, sb, bi, out_dtype)
        # Hopper's fp8 wgmma accumulates K in reduced precision (Triton's default "fast accumulation"): 1e-2 there
        assert rel_err(c, ref) <= (1e-5 if out_dtype == torch.float32 and not BIG else 1e-2)


@requires_triton
def test_fp8_gemm_kernel_structure_with_fp32_products():
    """The same kernel with the operands upcast to fp32 (how a card without fp8 dot could check it)."""
    g = fresh_gen()
    M, N, K = (19, 23, 70) if not BIG else (300, 257, 1000)
    a = (torch.randn(M, K, device=DEVICE, generator=g) * 8).to(FP8)
    b = (torch.randn(N, K, device=DEVICE, generator=g) * 8).to(FP8)
    sa, sb = torch.rand(M, device=DEVICE, generator=g), torch.rand(N, device=DEVICE, generator=g)
    c = gemm._fp8_gemm_triton(a, b, sa, sb, None, torch.float32, upcast=True)
    assert rel_err(c, gemm.fp8_gemm_ref(a, b, sa, sb)) <= 1e-5


@requires_triton
def test_fp8_gemm_split_k_matches_reference():
    """Decode-sized calls split K (fp32 partials, ordered sum, the bias once), as the INT8 GEMM does; checked with
    fp32 products so it runs anywhere, and with real fp8 products where the card has them."""
    g = fresh_gen()
    M, N, K = (5, 23, 70) if not BIG else (64, 2048, 8192)
    a = (torch.randn(M, K, device=DEVICE, generator=g) * 8).to(FP8)
    b = (torch.randn(N, K, device=DEVICE, generator=g) * 8).to(FP8)
    sa, sb = torch.rand(M, device=DEVICE, generator=g), torch.rand(N, device=DEVICE, generator=g)
    bias = torch.randn(N, device=DEVICE, generator=g)
    ref = gemm.fp8_gemm_ref(a, b, sa, sb, bias)
    for split in (2, 3, 5):
        out = torch.full((M, N), float("nan"), device=DEVICE)
        c = gemm._fp8_gemm_triton(a, b, sa, sb, bias, torch.float32, out=out, upcast=True, split_k=split)
        assert not torch.isnan(out).any(), "an output element was not written"
        assert rel_err(c, ref) <= 1e-5, split
        if BIG:
            c = gemm._fp8_gemm_triton(a, b, sa, sb, bias, torch.float32, split_k=split)
            assert rel_err(c, ref) <= 1e-2, split


@pytest.mark.gpu
@requires_triton
def test_fp8_gemm_on_fp8_hardware_uses_real_fp8_dot():
    if not gemm.fp8_supported(DEVICE):
        pytest.skip("needs compute capability >= 8.9")
    g = fresh_gen()
    x = torch.randn(64, 4096, device=DEVICE, generator=g, dtype=torch.bfloat16)
    w = (torch.randn(4096, 4096, device=DEVICE, generator=g) * 20).to(FP8)
    s = torch.rand(4096, device=DEVICE, generator=g) * 1e-2
    assert rel_err(gemm.fp8_linear(x, w, s), gemm.fp8_linear_ref(x, w, s)) <= 1e-2


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_and_fp8_linear_match_references(dtype, monkeypatch):
    monkeypatch.setenv("KILN_OPS", "triton")
    g = fresh_gen()
    M, N, K = (6, 45, 96) if not BIG else (64, 4096, 4096)
    x = torch.randn(2, M // 2, K, device=DEVICE, generator=g).to(dtype)
    qw = torch.randint(-127, 128, (N, K), device=DEVICE, dtype=torch.int8, generator=g)
    ws = torch.rand(N, device=DEVICE, generator=g) * 1e-2
    bias = torch.randn(N, device=DEVICE, generator=g).to(dtype)
    smooth = torch.rand(K, device=DEVICE, generator=g) + 0.5
    y = gemm.w8a8_linear(x, qw, ws, bias, smooth)
    assert y.shape == (2, M // 2, N) and y.dtype == dtype
    # on a GPU a reciprocal rounding differently may move one activation code by a step
    tol = (1e-5 if not BIG else 1e-3) if dtype == torch.float32 else 1e-2
    assert rel_err(y, gemm.w8a8_linear_ref(x, qw, ws, bias, smooth)) <= tol
    if BIG and not gemm.fp8_supported(DEVICE):
        return
    fw = (torch.randn(N, K, device=DEVICE, generator=g) * 20).to(FP8)
    y8 = gemm.fp8_linear(x, fw, ws, bias)
    assert rel_err(y8, gemm.fp8_linear_ref(x, fw, ws, bias)) <= (1e-5 if dtype == torch.float32 and not BIG else 1e-2)
    act = torch.tensor([0.02], device=DEVICE)
    assert rel_err(gemm.fp8_linear(x, fw, ws, None, act), gemm.fp8_linear_ref(x, fw, ws, None, act)) <= 1e-2


def test_fp8_gemm_refuses_cards_without_fp8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not gemm.fp8_supported("cuda")
    assert gemm.fp8_supported("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert gemm.fp8_supported("cuda")


@requires_triton
@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_quant_kernel_has_the_bits_of_the_norm_then_the_quantizer(qdtype, dtype):
    """``rms_norm_quant`` (one launch) writes exactly what ``rms_norm`` followed by ``quantize_activation`` write
    (two launches; compiled in fp32, within an ulp of the scale and a code step): the same codes, scales and residual
    sum, with and without a residual and a smoother, a row of zeros included; its reference is the two references
    composed."""
    from kiln.ops import norm

    g = fresh_gen()
    M, H = (5, 83) if not BIG else (64, 4096)
    x = (torch.randn(M, H, device=DEVICE, generator=g) * 3).to(dtype)
    res = torch.randn(M, H, device=DEVICE, generator=g).to(dtype)
    x[1], res[1] = 0, 0
    w = (torch.rand(H, device=DEVICE, generator=g) + 0.5).to(dtype)
    smooth = torch.rand(H, device=DEVICE, generator=g) + 0.5
    for r in (None, res):
        for sm in (None, smooth):
            fused = norm._rms_norm_quant_triton(x, w, 1e-5, r, qdtype, sm)
            normed = norm._rms_norm_triton(x, w, 1e-5, r)
            q, s = gemm._quant_act_triton(normed[0] if r is not None else normed, qdtype, sm, None)
            if dtype == torch.float32 and DEVICE.type == "cuda":
                # compiled, the norm's fp32 sum of squares follows each kernel's register layout (the fused kernel's
                # int8 store vectorises differently), so the fp32 row can move by an ulp; 16-bit rows round it away
                assert (fused[1] - s).abs().max() <= 1e-6 * s.abs().max()
                step = 1.0 if qdtype == torch.int8 else 0.125 * q.float().abs() + 2.0 ** -9  # one code step
                assert ((fused[0].float() - q.float()).abs() <= step).all()
            else:
                assert torch.equal(fused[0].view(torch.uint8), q.view(torch.uint8)), (r is None, sm is None)
                assert torch.equal(fused[1], s)
            if r is not None:
                assert torch.equal(fused[2], normed[1])
            ref = norm.rms_norm_quant_ref(x, w, 1e-5, r, qdtype, sm)
            composed = gemm.quantize_activation_ref(
                norm.rms_norm_ref(x, w, 1e-5, r)[0] if r is not None else norm.rms_norm_ref(x, w, 1e-5), qdtype, sm)
            assert torch.equal(ref[0].view(torch.uint8), composed[0].view(torch.uint8)) and torch.equal(ref[1],
                                                                                                    composed[1])
            # kernel vs reference: the norm's fp32 sum order (and, under the interpreter, its fp32 -> bf16 rounding
            # toward zero) may move the row's largest value by a bf16 ulp or two
            tol = 1e-5 if dtype == torch.float32 else 2.0 ** -6
            assert (fused[1] - ref[1]).abs().max() <= tol * ref[1].abs().max()
    assert norm.rms_norm_quant(x, w, 1e-5, dtype=qdtype)[0].dtype == qdtype


def test_rms_norm_quant_bad_inputs_name_the_argument():
    from kiln.ops import norm

    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="x must have 2 dims"):
        norm.rms_norm_quant(x[None], torch.ones(8))
    with pytest.raises(ValueError, match="weight.shape"):
        norm.rms_norm_quant(x, torch.ones(7))
    with pytest.raises(ValueError, match="int8 or float8"):
        norm.rms_norm_quant(x, torch.ones(8), dtype=torch.int16)
    with pytest.raises(ValueError, match="smooth has 3 values"):
        norm.rms_norm_quant(x, torch.ones(8), smooth=torch.ones(3))
    with pytest.raises(ValueError, match="residual.shape"):
        norm.rms_norm_quant(x, torch.ones(8), residual=torch.randn(4, 9))


@requires_triton
@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_quantize_kernel_has_the_bits_of_the_activation_then_the_quantizer(qdtype, dtype):
    """``silu_and_mul_quantize`` (one launch) writes exactly what ``silu_and_mul`` followed by
    ``quantize_activation`` write: the same codes and scales, with and without a smoother, over several K tiles
    and a ragged tail, a zero row included; its reference is the two references composed."""
    from kiln.ops import activation

    g = fresh_gen()
    M, inner = (4, 150) if not BIG else (64, 14336)
    x = (torch.randn(M, 2 * inner, device=DEVICE, generator=g) * 3).to(dtype)
    x[2] = 0
    smooth = torch.rand(inner, device=DEVICE, generator=g) + 0.5
    for sm in (None, smooth):
        q, s = gemm._quant_act_triton(x, qdtype, sm, None, glu=True)
        q2, s2 = gemm._quant_act_triton(activation._silu_and_mul_triton(x), qdtype, sm, None)
        assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2), sm is None
        qr, sr = gemm.quantize_activation_ref(activation.silu_and_mul_ref(x), qdtype, sm)
        # the CPU path is the references composed (on the CPU: torch's CUDA SiLU may round differently)
        xc, smc = x.cpu(), sm.cpu() if sm is not None else None
        ref = gemm.silu_and_mul_quantize(xc, qdtype, smc)
        qc, sc = gemm.quantize_activation_ref(activation.silu_and_mul_ref(xc), qdtype, smc)
        assert torch.equal(ref[0].view(torch.uint8), qc.view(torch.uint8)) and torch.equal(ref[1], sc)
        tol = 1e-5 if dtype == torch.float32 else 2.0 ** -6  # the interpreter rounds fp32 -> bf16 toward zero
        assert (s - sr).abs().max() <= tol * sr.abs().max()
    with pytest.raises(ValueError, match="must be even"):
        gemm.silu_and_mul_quantize(x[:, :-1])
    with pytest.raises(ValueError, match=f"smooth has {inner + 1} values"):
        gemm.silu_and_mul_quantize(x, qdtype, torch.ones(inner + 1, device=DEVICE))


@pytest.mark.skipif(ptxas_path() is None, reason="needs Triton's bundled ptxas")
@pytest.mark.parametrize("fp8", [False, True])
def test_fused_quantizers_compile_for_sm90_without_spills(fp8):
    """The fused quantizers compiled for the H100/H200 here (CI has no GPU; the interpreter does not compile):
    the norm with its residual and smoother over an 8B row (4096), and the SiLU-and-mul quantizer of down_proj's
    input, both for int8 and e4m3 codes, build for sm_90a and spill nothing."""
    q, qmax = ("*fp8e4nv", 448.0) if fp8 else ("*i8", 127.0)
    sig = dict(X="*bf16", R="*bf16", W="*bf16", SMOOTH="*fp32", Q=q, S="*fp32", RO="*bf16", eps="fp32")
    consts = dict(HAS_RESIDUAL=True, HAS_SMOOTH=True, IS_FP8=fp8, MANUAL_FP8=False, QMAX=qmax, BLOCK=4096, PDL=True)
    assert sm90_compile("kiln.ops.norm", "_rms_norm_quant_kernel", sig, consts, 4)[1] == 0
    sig = dict(X="*bf16", SMOOTH="*fp32", SSCALE="*fp32", Q=q, S="*fp32")
    consts = dict(HAS_SMOOTH=True, STATIC=False, IS_FP8=fp8, MANUAL_FP8=False, QMAX=qmax, BLOCK_K=1024, GLU=True)
    assert sm90_compile("kiln.ops.gemm", "_quant_act_kernel", sig, consts, 8)[1] == 0
