"""The weight-only GEMM with the SiLU-and-mul epilogue (``wo_glu_linear``) matches the unfused ops.

A decode step's gate/up projection computes gate and up rows in the same program and applies the activation before
storing; the result must be what ``silu_and_mul(linear(x))`` gives (the same 16-bit rounding points) on the int8
GEMV, the int4 word GEMV and the tl.dot tiles of a few rows, including a ragged last pair of rows.
"""

import pytest
import torch

from kiln.ops import gemv, wo_gemm
from kiln.ops.wo_gemm import WeightOnly
from tests.conftest import DEVICE, requires_triton

BIG = DEVICE.type == "cuda"
# three 16-bit roundings in the chain (gate / up, silu, the product); the interpreter may round them differently
RTOL = {torch.float32: 1e-5, torch.float16: 6e-3, torch.bfloat16: 3e-2}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def weight(bits, N, K, G, g):
    if bits == 8:
        q = torch.randint(-127, 128, (N, K), device=DEVICE, dtype=torch.int8, generator=g)
        return WeightOnly(q, torch.rand(N, device=DEVICE, generator=g) * 0.02 + 1e-3)
    q = torch.randint(0, 256, (N, K // 2), device=DEVICE, dtype=torch.uint8, generator=g)
    s = torch.rand(N, K // G, device=DEVICE, generator=g) * 0.02 + 1e-3
    z = torch.randint(0, 16, (N, K // G), device=DEVICE, dtype=torch.uint8, generator=g)
    return WeightOnly(q, s, z, G, 4)


@requires_triton
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3])
def test_glu_epilogue_matches_silu_and_mul_of_the_linear(monkeypatch, bits, dtype, M):
    monkeypatch.setenv("KILN_OPS", "triton")
    g = torch.Generator(device=DEVICE).manual_seed(bits * 7 + M)
    inner, K, G = (37, 128, 32) if not BIG else (7168, 4096, 128)  # 37: the last program has one real pair
    w = weight(bits, 2 * inner, K, G, g)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=g)
    bias = torch.randn(2 * inner, device=DEVICE, dtype=dtype, generator=g)
    for b in (None, bias):
        y = wo_gemm.wo_glu_linear(x, w, b)
        assert y.shape == (M, inner) and y.dtype == dtype
        assert rel_err(y, wo_gemm.wo_glu_linear_ref(x, w, b)) <= RTOL[dtype]


@requires_triton
@pytest.mark.parametrize("bits", [8, 4])
def test_glu_epilogue_tiles_write_every_output_once(bits):
    """Explicit tiles (the GPU's 2- and 8-row int8 tiles, int4 words, a dot tile; a split-K request is ignored, the
    epilogue needs the whole sum) write every element of a poisoned output and agree with the reference."""
    g = torch.Generator(device=DEVICE).manual_seed(bits)
    inner, K, G = 21, 256, 64
    w = weight(bits, 2 * inner, K, G, g)
    for M, cfg in ((1, dict(BLOCK_M=1, BLOCK_N=2, BLOCK_K=64, USE_DOT=False)),
                   (1, dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=64, USE_DOT=False, INT4_WORDS=True, SPLIT_K=3)),
                   (5, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, USE_DOT=True, INT4_JOIN=bits == 4))):
        x = torch.randn(M, K, device=DEVICE, generator=g)
        out = torch.full((M, inner), float("nan"), device=DEVICE)
        y = wo_gemm._wo_triton(x, *w[:4], None, bits, out=out, config=cfg, glu=True)
        assert not torch.isnan(out).any(), cfg
        assert rel_err(y, wo_gemm.wo_glu_linear_ref(x, w)) <= 1e-5, cfg
    with pytest.raises(ValueError, match="BLOCK_N must be >= 2"):
        wo_gemm._wo_triton(x, *w[:4], None, bits, config=dict(BLOCK_M=1, BLOCK_N=1, BLOCK_K=64, USE_DOT=False),
                           glu=True)


@requires_triton
def test_glu_runs_the_separate_ops_for_many_rows_and_prefill(monkeypatch):
    monkeypatch.setenv("KILN_OPS", "triton")
    launches = []
    real = wo_gemm._wo_triton
    monkeypatch.setattr(wo_gemm, "_wo_triton", lambda *a, **k: launches.append(k.get("glu", False)) or real(*a, **k))
    g = torch.Generator(device=DEVICE).manual_seed(3)
    w = weight(8, 24, 64, 32, g)
    for rows, prefill in ((gemv.MAX_M + 1, False), (2, True)):
        x = torch.randn(rows, 64, device=DEVICE, generator=g)
        if prefill:
            with gemv.cublas_only():
                y = wo_gemm.wo_glu_linear(x, w)
        else:
            y = wo_gemm.wo_glu_linear(x, w)
        assert rel_err(y, wo_gemm.wo_glu_linear_ref(x, w)) <= 1e-5
    assert launches and not any(launches)
    wo_gemm.wo_glu_linear(torch.randn(1, 64, device=DEVICE, generator=g), w)
    assert launches[-1] is True


@pytest.mark.parametrize("call, match", [
    (lambda w, x: wo_gemm.wo_glu_linear(x, WeightOnly(w.qweight[:5], w.scales[:5])), "even number of rows"),
    (lambda w, x: wo_gemm.wo_glu_linear(x[:, :7], w), "must equal qweight.shape"),
    (lambda w, x: wo_gemm.wo_glu_linear(x, WeightOnly(w.qweight, w.scales, bits=3)), "bits must be 8 or 4"),
])
def test_glu_rejects_bad_input(call, match):
    w = WeightOnly(torch.zeros(6, 64, dtype=torch.int8, device=DEVICE), torch.ones(6, device=DEVICE))
    with pytest.raises(ValueError, match=match):
        call(w, torch.randn(2, 64, device=DEVICE))
