"""INT8 GEMM: the Triton kernel is bit-exact against an int32/int64 reference; the rescale epilogue matches.

On a CPU-only machine the kernel runs under TRITON_INTERPRET=1 on tiny shapes; on a GPU at full size.
"""

import pytest
import torch

from kiln.ops import gemm
from kiln.ops._dispatch import interpreting
from tests.conftest import DEVICE, requires_triton

BIG = DEVICE.type == "cuda"
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def fresh_gen():
    return torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())


def exact_i32(a, b):
    """Independent reference: int64 matmul on the CPU (or fp64 on the GPU, exact for these magnitudes)."""
    if a.is_cuda:
        return (a.double() @ b.double().T).round().to(torch.int32)
    return (a.long() @ b.long().T).to(torch.int32)


def rel_err(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def rand_i8(shape, g, lo=-128):
    return torch.randint(lo, 128, shape, device=DEVICE, dtype=torch.int8, generator=g)


SHAPES = ([(1, 4096, 4096), (16, 4096, 11008), (2048, 2048, 2048), (777, 1003, 1231), (3, 5, 7)] if BIG
          else [(1, 17, 5), (37, 45, 83), (64, 64, 128), (33, 70, 300), (16, 32, 32)])


@requires_triton
@pytest.mark.parametrize("schedule", ["tile", "tma"])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_gemm_triton_is_bit_exact_against_int32_reference(shape, schedule):
    """Both schedules: one tile per program (pointer loads) and persistent with TMA descriptors."""
    M, N, K = shape
    g = fresh_gen()
    a, b = rand_i8((M, K), g), rand_i8((N, K), g)
    c = gemm._int8_gemm_triton(a, b, None, None, None, torch.int32, schedule=schedule)
    assert c.dtype == torch.int32 and c.shape == (M, N)
    assert torch.equal(c, exact_i32(a, b))
    assert torch.equal(gemm.int8_gemm_i32_ref(a, b), exact_i32(a, b))


@requires_triton
def test_int8_gemm_triton_extreme_values_and_strided_inputs():
    g = fresh_gen()
    M, N, K = (300, 257, 1000) if BIG else (19, 23, 70)
    # all -128: the largest magnitude the int32 accumulator sees
    a = torch.full((M, K), -128, dtype=torch.int8, device=DEVICE)
    b = torch.full((N, K), -128, dtype=torch.int8, device=DEVICE)
    assert torch.equal(gemm._int8_gemm_triton(a, b, None, None, None, torch.int32), exact_i32(a, b))
    # non-contiguous views: a transposed buffer and every other row of b
    a_t = rand_i8((K, M), g).T
    b_s = rand_i8((2 * N, K + 3), g)[::2, :K]
    for schedule in ("tile", "tma"):
        got = gemm._int8_gemm_triton(a_t, b_s, None, None, None, torch.int32, schedule=schedule)
        assert torch.equal(got, exact_i32(a_t.contiguous(), b_s.contiguous())), schedule


@requires_triton
@pytest.mark.parametrize("schedule", ["tile", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_row,per_col,with_bias", [(True, True, True), (False, True, False),
                                                       (True, False, True), (False, False, False)])
def test_int8_gemm_triton_rescale_matches_reference(dtype, per_row, per_col, with_bias, schedule):
    g = fresh_gen()
    M, N, K = (1000, 768, 512) if BIG else (21, 40, 48)
    a, b = rand_i8((M, K), g), rand_i8((N, K), g, lo=-127)
    sa = torch.rand(M if per_row else 1, device=DEVICE, generator=g) * 0.02 + 1e-3
    sb = torch.rand(N if per_col else 1, device=DEVICE, generator=g) * 0.02 + 1e-3
    bias = torch.randn(N, device=DEVICE, generator=g).to(dtype) if with_bias else None
    out = gemm._int8_gemm_triton(a, b, sa, sb, bias, dtype, schedule=schedule)
    ref = gemm.int8_gemm_ref(a, b, sa, sb, bias, dtype)
    assert out.dtype == dtype and out.shape == (M, N)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err <= RTOL[dtype], err
    if dtype == torch.float32:
        # the same fp32 operations in the same order: at most an ulp or so apart (FMA contraction)
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)


def test_int8_gemm_dispatch_and_reference_on_cpu():
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-128, 128, (9, 50), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (7, 50), dtype=torch.int8, generator=g)
    ref = (a.long() @ b.long().T).int()
    assert torch.equal(gemm.int8_gemm_i32(a, b), ref)
    sa, sb = torch.tensor([0.5]), torch.rand(7) + 0.5
    bias = torch.randn(7)
    out = gemm.int8_gemm(a, b, sa, sb, bias, out_dtype=torch.float32)
    torch.testing.assert_close(out, ref.double().mul(0.5).mul(sb.double()).add(bias.double()).float(),
                               rtol=1e-6, atol=1e-4)


def test_int8_gemm_rejects_bad_input():
    a = torch.zeros(4, 8, dtype=torch.int8)
    b = torch.zeros(3, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="a must have dtype"):
        gemm.int8_gemm_i32(a.float(), b)
    with pytest.raises(ValueError, match=r"b.shape\[1\]"):
        gemm.int8_gemm_i32(a, torch.zeros(3, 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="a_scale"):
        gemm.int8_gemm(a, b, torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="b_scale"):
        gemm.int8_gemm(a, b, torch.ones(1), torch.ones(2))
    with pytest.raises(ValueError, match="bias"):
        gemm.int8_gemm(a, b, torch.ones(1), torch.ones(3), bias=torch.ones(4))
    with pytest.raises(ValueError, match="out_dtype"):
        gemm.int8_gemm(a, b, torch.ones(1), torch.ones(3), out_dtype=torch.int32)
    with pytest.raises(ValueError, match="overflow"):
        gemm.int8_gemm_i32(torch.zeros(1, gemm.MAX_K + 1, dtype=torch.int8),
                           torch.zeros(1, gemm.MAX_K + 1, dtype=torch.int8))


@requires_triton
def test_int8_gemm_doctor_check_passes():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for dtype, tol in RTOL.items():
        err, backend = gemm.DOCTOR_CHECKS["int8_gemm"](DEVICE, dtype, g)
        assert err <= tol, (dtype, err)
        assert backend in ("ref", "triton")


@pytest.mark.gpu
def test_int8_gemm_full_size_8192_on_gpu_is_bit_exact():
    g = fresh_gen()
    a, b = rand_i8((8192, 8192), g), rand_i8((8192, 8192), g)
    assert not interpreting()
    assert gemm._tma_ok(a, b)  # the library path takes the persistent TMA kernel at this size on Hopper
    assert torch.equal(gemm.int8_gemm_i32(a, b), exact_i32(a, b))
    for schedule in ("tile", "tma"):
        assert torch.equal(gemm._int8_gemm_triton(a, b, None, None, None, torch.int32, schedule=schedule),
                           exact_i32(a, b)), schedule


@requires_triton
@pytest.mark.parametrize("K", [96, 83])  # even K tiles / a ragged last tile (padded K, split past the end)
def test_int8_gemm_split_k_matches_reference(K):
    """Decode-sized calls split K over extra programs: fp32 partials with the scales applied, summed in split order
    with the bias added once. Every split count (including ones that leave a short or empty-looking last split)
    gives the reference result and writes every element; the raw int32 product never splits."""
    g = fresh_gen()
    M, N = (5, 45) if not BIG else (64, 2048)
    K = K if not BIG else 8192 + K
    a, b = rand_i8((M, K), g), rand_i8((N, K), g, lo=-127)
    sa = torch.rand(M, device=DEVICE, generator=g) + 0.01
    sb = torch.rand(N, device=DEVICE, generator=g) + 0.01
    bias = torch.randn(N, device=DEVICE, generator=g)
    for split in (2, 3, 7):
        for dtype in (torch.float32, torch.bfloat16):
            got = gemm._int8_gemm_triton(a, b, sa, sb, bias, dtype, split_k=split)
            assert not torch.isnan(got).any()
            assert rel_err(got, gemm.int8_gemm_ref(a, b, sa, sb, bias, dtype)) <= RTOL[dtype], (split, dtype)
    assert torch.equal(gemm._int8_gemm_triton(a, b, None, None, None, torch.int32, split_k=3), exact_i32(a, b))


def test_decode_sized_int8_gemm_splits_k_to_fill_the_gpu(monkeypatch):
    """The count the launcher picks for batch-64 decode on a 132-SM card: a 2048-wide layer (16 tiles of 64x128)
    splits its 8192-deep K 8 ways; an LM-head-wide N fills the GPU alone; prefill-sized M never splits."""
    tile = gemm.fixed_config(64).kwargs
    pick = lambda M, N, K: gemm.split_k_for(M, N, K, tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"], 132)  # noqa: E731
    assert pick(64, 2048, 8192) == 8
    assert pick(64, 128256, 2048) == 1
    assert pick(256, 2048, 8192) == 1
