"""Weight-only quantized GEMMs: float activations times int8 (W8A16) or packed int4 (W4A16) weights.

Layouts follow ``nn.Linear``: ``x`` is the activation [..., K] (fp32/fp16/bf16) and the weight is [N, K] with K
contiguous, so ``out = x @ dequant(w).T + bias`` in x's dtype.

- ``w8a16_linear(x, qweight, scale, bias=None)``: ``qweight`` int8 [N, K], ``scale`` float [N] (per output
  channel, symmetric): ``w = qweight * scale[:, None]``.
- ``w4a16_linear(x, qweight, scales, zeros=None, group_size=128, bias=None)``: ``qweight`` uint8 [N, K/2] holds
  two 4-bit codes per byte (``pack_int4``: even k in the low nibble, odd k in the high nibble); ``scales`` float
  [N, K/G] and ``zeros`` uint8 [N, K/G] (codes 0..15; None means 8, i.e. symmetric signed int4) per group of
  ``G = group_size`` (32, 64 or 128) consecutive k: ``w[n, k] = (code[n, k] - zeros[n, k // G]) * scales[n, k // G]``.

The references dequantize to fp32 and multiply in fp32, rounding once to x's dtype. The Triton kernel (one kernel
for both widths) dequantizes in registers and, below ``INT4_DEQUANT_MIN_M`` rows, never materialises a float weight:

- int4: a K tile is one contiguous [BLOCK_N, BLOCK_K/2] block of packed bytes (vector loads, each byte read
  once). Low nibbles multiply the even activations x[k0 + 2j], high nibbles the odd ones x[k0 + 2j + 1], so
  nothing is interleaved in registers (the dot path runs two half-K dots). A K tile lies inside one group: one
  scale and one zero point per output row per tile, the scale applied to the tile's partial sum.
- Codes become floats without I2F (a quarter-rate instruction on sm_80/90, which would cost as much as the
  weight stream in a GEMV): ``code | bits(2^23)`` is the float ``2^23 + code``, and subtracting ``2^23 + zero``
  gives ``code - zero`` exactly; int8 uses ``1.5 * 2^23`` the same way (one integer op, one float op).
- int8's per-channel scale is applied once, at the end.
- The one-row int4 GEMV (``INT4_WORDS``, its default) reads the same bytes as 32-bit words: word j of a tile holds
  k = 8j + b in nibble b. Each nibble, shifted to bits 15..18 or 19..22, becomes the float ``2^E + code`` with one
  masked OR of an exponent (``_biased_nibble``), and the ``2^E`` and zero-point terms leave the sum once per word
  (``_int4_word_gemv_tile``): one LOP3 and one FFMA per code. The byte path's per-byte integer work made it
  ALU-bound (~40% of the copy bandwidth on an H100, where the int8 GEMV reached 95%).

- Row-interleaved int4 (``interleave_int4_rows``, what the engine runs on a GPU): the same words stored
  [N / R, K / 8, R], R rows of one word column side by side. The one-row GEMV (``_int4_quads_gemv_kernel``) loads
  them [Q, W * R] at a time, so each thread holds one word column for many rows and its eight activations are
  loaded, converted and folded into the bias terms once for all of them: ~3.7 sm_90 instructions per code against
  6.7 for the usual packing, where a 16-byte load gives a thread four columns of one row (H100, Llama-3.1-8B LM
  head 147 -> 104 us; the 8B decode step's linears 2.64 -> ~1.96 ms). Batched calls read the same words into the
  joined dot tile (``_quads_dot_words``, ``_int4_words_to_tile``). Files keep the usual packing;
  ``kiln.quant.llm`` interleaves at load.
- Many rows (``INT4_DEQUANT_MIN_M``, prefill): the one place a float weight is materialised. Dequantizing inside
  the dot tiles is ALU-bound, so the int4 weight (either layout) is dequantized to x's dtype once, in bounded
  slices, and multiplied by the float GEMM: 2-6x faster than the dot from 128 rows on the H100.

One row (batch-1 decode) takes a CUDA-core GEMV path (no tensor-core padding of M to 16, the weight stream is
the whole cost); more rows take ``tl.dot`` tiles, so any M works. The GEMV (int8, or int4 on words) issues its
first weight tile before anything else and then always loads the next tile before reducing the current one
(``PREFETCH``; int4 also prefetches the next group's zero points and scales and the next tile's activations, which
otherwise cost each K step a dependent round trip to L2); with programmatic dependent launch
(``_dispatch.pdl_enabled``) that first tile goes out while the previous kernel is still finishing, and only the
activations wait (``gdc_wait``).

The one-row int8 GEMV picks its tile by how fully the row tiles fill whole waves of resident CTAs
(``INT8_GEMV_TILES``): a batch-1 GEMV lasts as long as its last wave. Wide weights (a gate/up, an LM head) take
a pipelined tile instead (``_int8_pipelined_tile``): ``STAGES`` makes the K loop ``tl.range(...,
num_stages=STAGES)``, so Triton keeps STAGES - 1 weight tiles in flight as ``cp.async`` copies in shared memory, not
in registers, and the stream reaches 90-100% of the copy bandwidth where the register prefetch held 72-85%.

``wo_glu_linear`` runs a fused [gate | up] weight with the SiLU-and-mul in the epilogue (``GLU``): each program
takes HALF gate rows and the HALF up rows they pair with (row n and row n + N/2, no weight reordering) and stores
silu(gate) * up, so a decode step's MLP needs no separate activation kernel. ``wo_rms_norm_linear`` folds the
RMSNorm (and residual add) in front of a one-row int8 GEMV into its prologue (``NORM_K``), for rows of at most
``MAX_WO_NORM_K``, with the unfused bits. ``wo_fused_linear`` serves weights that already hold the norm's gain
(weight-only engines fold it in at build): the GEMV multiplies its output by ``1 / rms(x)``, from squares of the
activation tiles its K loop loads anyway (``RMS_SCALE``; the int4 quads GEMV reads the row again, ``RMS_ROW``), and
adds a residual in its epilogue (``ADD_RESIDUAL``), so a decode layer runs no norm kernel at all
(``LlamaDecoderLayer._folded_forward``).

Decode-sized calls (M <= 64) split K over extra programs (``SPLIT_K``) where the output tiles leave SMs idle: a
4096-row weight makes only 64 column tiles, half an H100's SMs, and a GEMV is memory-bound, so it needs every SM
streaming. Each split writes an fp32 partial [SPLIT_K, M, N] (scales applied: they are linear), and the last split
program of each output tile to finish sums them in split order (deterministic), adds the bias and rounds once
(``split_k.sum_partials_if_last``): one launch per linear. A separate sum kernel cost a launch and a gap per split
linear, 96 per step of an int4 8B decode (inside a decode CUDA graph, those gaps are part of every token's time).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._dispatch import FLOAT_DTYPES, backend_for, check_tensor, interpreting, pdl_launch_args
from ._triton import cdiv, direct, next_power_of_2, tl, triton
from .activation import silu_and_mul, silu_and_mul_ref, silu_mul_f32
from ._counters import last_to_arrive, rearm, split_counters
from .norm import residual_sum, rms_normalize
from .split_k import split_k_for, sum_partials_if_last, sum_partials_in_order

SUPPORTED_GROUP_SIZES = (32, 64, 128)
# from this many rows (prefill, large decode batches) an int4 weight is dequantized to the activation dtype once and
# multiplied by the float GEMM: dequantizing in the dot tiles is ALU-bound. H100, session 19
# (scripts/gpu/quads_sweep.py --m): at M = 128 dequantize + cuBLAS beat the dot on all ten Llama-1B/8B linears
# (8B qkv_proj 45 against 116 us, down_proj 112 against 384-414), at M = 64 on six of ten
INT4_DEQUANT_MIN_M = 128
# the float copy is made in slices of at most this many bytes (a decode graph's memory pool holds one)
INT4_DEQUANT_SLICE_BYTES = 256 * 2**20
# the bits of 1.0f, passed to the int4 GEMV as a run-time value so that its magic-number exponents live in registers:
# the LOP3 that masks a nibble then also ORs in the exponent (with both constants immediate, ptxas emits two LOP3s
# per code; sm_90 SASS of the 128x128 word tile: 824 -> 712 instructions per loop step, bit-identical results)
ONE_BITS_VALUE = 0x3F800000


# ------------------------------------------------------------------------------------------------ int4 packing
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], [N, K] with K even -> uint8 [N, K/2]: byte j = code[2j] | code[2j + 1] << 4."""
    check_tensor("codes", codes, ndim=2, dtypes=(torch.uint8,))
    if codes.shape[1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"int4 codes must be in [0, 15], got a maximum of {int(codes.max())}")
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: uint8 [N, K/2] -> uint8 codes [N, K]."""
    check_tensor("packed", packed, ndim=2, dtypes=(torch.uint8,))
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], 2 * packed.shape[1])


def interleave_int4_rows(qweight: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """Packed uint8 [N, K/2] -> int32 words [N / rows, K / 8, rows]: word j (k = 8j .. 8j + 7) of row
    ``q * rows + i`` at [q, j, i]. The one-row int4 GEMV reads this layout ``[Q, W * rows]`` at a time, so one
    thread holds a word column of many rows and loads, converts and sums its eight activations once for all of
    them (see ``_int4_quads_gemv_kernel``). The bytes are the same; only their order changes."""
    check_tensor("qweight", qweight, ndim=2, dtypes=(torch.uint8,))
    n, half = qweight.shape
    if rows < 1 or n % rows or half % 4:
        raise ValueError(f"interleaving int4 rows in groups of {rows} needs N divisible by {rows} and K by 8, "
                         f"got a packed weight of shape {tuple(qweight.shape)}")
    words = qweight.contiguous().view(torch.int32)
    return words.view(n // rows, rows, half // 4).transpose(1, 2).contiguous()


def deinterleave_int4_rows(words: torch.Tensor) -> torch.Tensor:
    """The inverse of ``interleave_int4_rows``: int32 [N / R, K / 8, R] -> packed uint8 [N, K/2]."""
    check_tensor("qweight", words, ndim=3, dtypes=(torch.int32,))
    nq, kw, rows = words.shape
    return words.transpose(1, 2).contiguous().view(torch.uint8).view(nq * rows, kw * 4)


def int4_weight_shape(qweight: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a packed int4 weight: uint8 [N, K/2], or row-interleaved int32 words [N / R, K / 8, R]."""
    if qweight.dim() == 3:
        return qweight.shape[0] * qweight.shape[2], qweight.shape[1] * 8
    return qweight.shape[0], qweight.shape[1] * 2


# ------------------------------------------------------------------------------------------------ checks
def _check_x_bias(x, n, bias):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dim ([..., K])")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        if bias.shape[0] != n:
            raise ValueError(f"bias has {bias.shape[0]} values but the weight has N={n} output rows")


def _check_w8(x, qweight, scale, bias):
    check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int8,))
    _check_x_bias(x, qweight.shape[0], bias)
    check_tensor("qweight", qweight, device=x.device)
    N, K = qweight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x.shape[-1] ({x.shape[-1]}) must equal qweight.shape[1] ({K}): qweight is [N, K]")
    check_tensor("scale", scale, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    if scale.shape[0] != N:
        raise ValueError(f"scale must have one value per output channel (N={N}), got {scale.shape[0]}")


def _check_w4(x, qweight, scales, zeros, group_size, bias):
    check_tensor("qweight", qweight, ndim=(2, 3))
    if qweight.dim() == 2:
        check_tensor("qweight", qweight, dtypes=(torch.uint8,))
    else:
        check_tensor("qweight (row-interleaved words)", qweight, dtypes=(torch.int32,))
    N, Kw = int4_weight_shape(qweight)
    _check_x_bias(x, N, bias)
    check_tensor("qweight", qweight, device=x.device)
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")
    K = x.shape[-1]
    if Kw != K:
        expected = f"[N, {K // 2}]" if qweight.dim() == 2 else f"[N / R, {K // 8}, R]"
        raise ValueError(f"qweight packs two int4 codes per byte: expected shape {expected} for K={K}, "
                         f"got {tuple(qweight.shape)}")
    if K % group_size:
        raise ValueError(f"K={K} is not divisible by group_size={group_size}")
    check_tensor("scales", scales, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    if tuple(scales.shape) != (N, K // group_size):
        raise ValueError(f"scales must have shape [N, K / group_size] = {[N, K // group_size]}, "
                         f"got {list(scales.shape)}")
    if zeros is not None:
        check_tensor("zeros", zeros, ndim=2, dtypes=(torch.uint8,), device=x.device)
        if zeros.shape != scales.shape:
            raise ValueError(f"zeros must have the shape of scales {list(scales.shape)}, got {list(zeros.shape)}")


# ------------------------------------------------------------------------------------------------ public ops
def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias``: x [..., K] float, qweight int8 [N, K], scale [N] -> [..., N]."""
    _check_w8(x, qweight, scale, bias)
    if backend_for(x, qweight, scale) == "triton":
        return _wo_triton(x, qweight, scale, None, 0, bias, bits=8)
    return w8a16_linear_ref(x, qweight, scale, bias)


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 group_size: int = 128, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant_int4(qweight, scales, zeros).T + bias``: x [..., K] float, qweight uint8 [N, K/2] (packed),
    scales [N, K/G], zeros uint8 [N, K/G] or None (symmetric, zero point 8) -> [..., N] in x's dtype."""
    _check_w4(x, qweight, scales, zeros, group_size, bias)
    if backend_for(x, qweight, scales) == "triton":
        return _wo_triton(x, qweight, scales, zeros, group_size, bias, bits=4)
    return w4a16_linear_ref(x, qweight, scales, zeros, group_size, bias)


class WeightOnly(NamedTuple):
    """A weight-only quantized weight as the kernels take it: int8 [N, K] with a per-channel scale [N] (``bits=8``),
    or packed int4 [N, K/2] with group ``scales`` and ``zeros`` [N, K/G] (``bits=4``)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int = 0
    bits: int = 8

    def check(self, x: torch.Tensor, bias: torch.Tensor | None) -> None:
        if self.bits == 8:
            _check_w8(x, self.qweight, self.scales, bias)
        elif self.bits == 4:
            _check_w4(x, self.qweight, self.scales, self.zeros, self.group_size, bias)
        else:
            raise ValueError(f"weight-only bits must be 8 or 4, got {self.bits!r}")

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.bits == 8:
            return w8a16_linear(x, self.qweight, self.scales, bias)
        return w4a16_linear(x, self.qweight, self.scales, self.zeros, self.group_size, bias)

    def linear_ref(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.bits == 8:
            return w8a16_linear_ref(x, self.qweight, self.scales, bias)
        return w4a16_linear_ref(x, self.qweight, self.scales, self.zeros, self.group_size, bias)


def wo_glu_linear(x: torch.Tensor, weight: WeightOnly, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu_and_mul(weight.linear(x, bias))`` for a fused [gate | up] weight [2I, K]: x [..., K] -> [..., I]; a
    decode step's input takes one launch (``wo_fused_linear`` with ``glu``, which says how)."""
    return wo_fused_linear(x, weight, bias, glu=True)


# The longest row whose RMSNorm the one-row int8 GEMV folds in (``wo_rms_norm_linear``): each program reads the row
# whole. H200, session 26 (scripts/gpu/int8_pipe_ab.py, greedy graph replay): folding the input norm into the 1B's
# qkv_proj (K = 2048) took its int8-wo step from 0.608-0.610 to 0.587-0.590 ms; the 8B's (K = 4096) went from 2.573 to
# 2.646-2.691 ms. The post-attention norm stays a kernel: folded into the pipelined gate_up GEMV it cost the 1B step
# 40 us (0.608 -> 0.649 ms; 0.70 ms while the residual sum was stored inside the K loop, which then no longer
# pipelined; the 8B's, in that version, 0.43 ms). Engines built since session 27 fold the norm gains into the weights
# and take ``wo_fused_linear`` instead, which adds nothing to the K loop; this fold serves norms of other gains.
MAX_WO_NORM_K = 2048


def wo_norm_fold_enabled() -> bool:
    """``KILN_WO_NORM_FOLD=0`` keeps the RMSNorm kernel in front of the int8 GEMVs (A/B timing)."""
    v = os.environ.get("KILN_WO_NORM_FOLD", "1").lower()
    if v not in ("0", "1", "on", "off"):
        raise ValueError(f"KILN_WO_NORM_FOLD must be 0 or 1, got {v!r}")
    return v in ("1", "on")


def wo_rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: WeightOnly,
                       bias: torch.Tensor | None = None, residual: torch.Tensor | None = None):
    """``weight.linear(rms_norm(x, norm_weight, eps, residual), bias)``. Without ``residual`` returns y; with it
    ``(y, x + residual)`` like ``rms_norm``.

    One int8 decode row with K <= ``MAX_WO_NORM_K`` takes one launch: every GEMV program reads the whole row for its
    ``1 / rms`` (the first one also stores the residual sum) and normalises each activation as it loads it, with the
    norm kernel's roundings, so the bits are the unfused ops'. That takes the norm kernel and its round trip out of
    the decode layer, as the float GEMV's prologue does (``gemv.rms_norm_linear``). Everything else runs the norm
    kernel, then the linear."""
    from .gemv import decode_sized
    from .norm import _check_norm_args, rms_norm

    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if (weight.bits == 8 and rows == 1 and K <= MAX_WO_NORM_K and wo_norm_fold_enabled()
            and decode_sized(x, norm_weight, *(() if residual is None else (residual,)))):
        _check_norm_args(x, norm_weight, eps, residual)  # (the unfused ops below check their own arguments)
        weight.check(x, bias)
        x2 = x.reshape(1, K)
        r2 = None if residual is None else residual.reshape(1, K).contiguous()
        ro = None if residual is None else torch.empty_like(x2)
        y = _wo_triton(x2, *weight[:4], bias, 8, norm=(norm_weight, eps, r2, ro)).view(*x.shape[:-1], -1)
        return y if residual is None else (y, ro.view(x.shape))
    out = rms_norm(x, norm_weight, eps, residual)
    y = weight.linear(out if residual is None else out[0], bias)
    return y if residual is None else (y, out[1])


def wo_rms_norm_linear_ref(x, norm_weight, eps, weight: WeightOnly, bias=None, residual=None):
    from .norm import rms_norm_ref

    out = rms_norm_ref(x, norm_weight, eps, residual)
    y = weight.linear_ref(out if residual is None else out[0], bias)
    return y if residual is None else (y, out[1])


def wo_glu_linear_ref(x, weight: WeightOnly, bias=None):
    return silu_and_mul_ref(weight.linear_ref(x, bias))


def wo_fused_linear(x: torch.Tensor, weight: WeightOnly, bias: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None, rms_eps: float | None = None,
                    glu: bool = False) -> torch.Tensor:
    """``[residual +] f(x / rms(x))``, f = ``weight.linear(., bias)`` (``silu_and_mul`` of it with ``glu``), where
    ``rms_eps`` (the norm's eps) says x is an RMSNorm's input whose gain was folded into the weight's columns at
    build time (``kiln.quant.llm.fold_norm_gains_``), and ``residual`` [..., N] is added to the output.
    int4 weights take the same epilogues in the quads GEMV (row-interleaved words), which reads the row again for
    its squares after the K loop: a split-K program has seen only part of it.

    With ``glu`` alone, decode-sized inputs (``gemv.decode_sized``: at most 16 rows on the Triton path, GEMVs
    enabled) take one launch: each program computes I-aligned pairs of gate and up rows of a fused [gate | up]
    weight [2I, K] and applies the SiLU-and-mul in its epilogue, with the unfused ops' rounding (gate and up rounded
    to x's dtype, silu rounded before the product). That saves the activation kernel and its round trip per layer.

    Why: with the gain in the weight, ``W (x / rms(x)) = (W x) / rms(x)``, so one decode row (a decode_sized
    x of one row) takes the norm as one multiply in the GEMV's epilogue (``RMS_SCALE``; the sum of squares comes
    from the activation tiles the K loop loads anyway), and the previous linear adds the residual in its own
    epilogue (``ADD_RESIDUAL``, the unfused ops' rounding). A decode layer then runs no RMSNorm kernel. H200,
    session 27 (scripts/gpu/int8_pipe_ab.py, greedy graph replay): 1B / 8B int8-wo step 0.588 / 2.560 ms with the
    norm kernels (and session 26's qkv prologue), 0.550 / 2.477 ms without; re-reading the row after the loop for
    its squares instead gave 0.553 / 2.504. The output's rounding differs from normalising x first (x / rms(x) is not
    rounded to x's dtype here); ``wo_fused_linear_ref`` computes it in fp32. Anything else runs the unfused ops
    (an RMSNorm of unit gain, the linear, the add)."""
    from .gemv import decode_sized
    from .norm import rms_norm

    weight.check(x, bias)
    N = int4_weight_shape(weight.qweight)[0] if weight.bits == 4 else weight.qweight.shape[0]
    n_out = N // 2 if glu else N
    if glu and (N % 2 or (weight.qweight.dim() == 3 and (N // 2) % weight.qweight.shape[2])):
        raise ValueError(f"a [gate | up] weight needs an even number of rows (row-interleaved: gate rows a multiple "
                         f"of the interleave), got {N} rows, weight shape {tuple(weight.qweight.shape)}")
    if glu and residual is not None:
        raise ValueError("wo_fused_linear adds a residual to a plain linear's output, not to a SiLU-and-mul's")
    if rms_eps is not None and (not isinstance(rms_eps, (int, float)) or isinstance(rms_eps, bool) or rms_eps < 0):
        raise ValueError(f"rms_eps must be a non-negative float, got {rms_eps!r}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        if residual.shape != (*x.shape[:-1], n_out):
            raise ValueError(f"residual must have shape {(*x.shape[:-1], n_out)} (x's rows, the output's width), "
                             f"got {tuple(residual.shape)}")
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    gemv = weight.bits == 8 or weight.qweight.dim() == 3  # int8, or int4 as row-interleaved words (the quads GEMV)
    epilogue = rms_eps is not None or residual is not None
    if K > 0 and (glu or epilogue) and decode_sized(x, *(() if residual is None else (residual,))):
        if not epilogue:  # the SiLU-and-mul alone: up to decode_sized's rows
            return _wo_triton(x, *weight[:4], bias, weight.bits, glu=True)
        if gemv and rows == 1:
            add = None if residual is None else residual.reshape(1, n_out).contiguous()
            return _wo_triton(x, *weight[:4], bias, weight.bits, glu=glu, rms_eps=rms_eps, add=add)
    if rms_eps is not None:
        x = rms_norm(x, torch.ones(K, dtype=x.dtype, device=x.device), rms_eps)
    y = silu_and_mul(weight.linear(x, bias)) if glu else weight.linear(x, bias)
    return y if residual is None else y + residual


def wo_fused_linear_ref(x, weight: WeightOnly, bias=None, residual=None, rms_eps=None, glu=False):
    """``wo_fused_linear`` in fp32: the product, times ``1 / rms(x)``, plus the bias, rounded once to x's dtype."""
    w = (dequantize_int8_weight(weight.qweight, weight.scales) if weight.bits == 8 else
         dequantize_int4_weight(weight.qweight, weight.scales, weight.zeros, weight.group_size))
    xf = x.float()
    y = xf @ w.T
    if rms_eps is not None:
        y = y * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + rms_eps)
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if glu:
        y = silu_and_mul_ref(y)
    return y if residual is None else y + residual


# ------------------------------------------------------------------------------------------------ reference
def dequantize_int8_weight(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] and per-channel scale [N] -> fp32 [N, K]."""
    return qweight.float() * scale.float()[:, None]


def dequantize_int4_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                           group_size: int) -> torch.Tensor:
    """Packed uint8 [N, K/2] (or row-interleaved words), scales [N, K/G], zeros [N, K/G] or None -> fp32 [N, K]."""
    if qweight.dim() == 3:
        qweight = deinterleave_int4_rows(qweight)
    codes = unpack_int4(qweight).float()
    N, K = codes.shape
    z = torch.full_like(scales, 8.0, dtype=torch.float32) if zeros is None else zeros.float()
    g = codes.view(N, K // group_size, group_size)
    return ((g - z[..., None]) * scales.float()[..., None]).view(N, K)


def w8a16_linear_ref(x, qweight, scale, bias=None):
    """The specification: dequantize to fp32, fp32 matmul, round once to x's dtype."""
    w = dequantize_int8_weight(qweight, scale)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def w4a16_linear_ref(x, qweight, scales, zeros=None, group_size=128, bias=None):
    """The specification: dequantize to fp32, fp32 matmul, round once to x's dtype."""
    w = dequantize_int4_weight(qweight, scales, zeros, group_size)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


# ------------------------------------------------------------------------------------------------ Triton
# fp32 <-> small integers without I2F (a quarter-rate conversion on sm_80/90, as slow as the weight stream in a
# GEMV): a 4-bit code OR'ed into the mantissa of 2^23 is the float 2^23 + code, and 1.5 * 2^23 plus a signed
# int8 is the float 1.5 * 2^23 + q; one integer op and one float subtract give the exact value.

@triton.jit
def _int8_to_f32(q):
    """int8 codes -> the same integers in fp32 (exact)."""
    return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _nibble_minus(word, SHIFT: tl.constexpr, zf):
    """The 4-bit code at bits [SHIFT, SHIFT + 4) of int32 ``word`` (packed bytes or words) minus the zero point,
    exact fp32 (``zf = 2^23 + zero``, broadcast against ``word``): the magic-number conversion, no I2F."""
    return (((word >> SHIFT) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zf


@triton.jit
def _group_zero_scale(Z, S, offs_n, n_mask, g, stride_zn, stride_sn, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr):
    """Group ``g``'s zero point (8 when symmetric) and scale of each output row, as fp32 [BLOCK_N]."""
    if HAS_ZERO:
        zero = tl.load(Z + offs_n.to(tl.int64) * stride_zn + g, mask=n_mask, other=0).to(tl.float32)
    else:
        zero = tl.full([BLOCK_N], 8.0, tl.float32)
    return zero, tl.load(S + offs_n.to(tl.int64) * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)


@triton.jit
def _biased_nibble(src, SHIFT: tl.constexpr, exp_bits):
    """The 4-bit code at bits [SHIFT, SHIFT + 4) of int32 ``src`` [BN, W] as the fp32 ``2^E + code``, E = 23 - SHIFT.

    Masking the nibble in place and OR-ing in the exponent of ``2^E`` (``exp_bits``, in a register) makes the
    nibble's lowest bit the float's unit: one LOP3, no shift, no I2F. The ``2^E`` is not subtracted here: the caller
    folds ``2^E * x`` (the same for every row) and the zero point out of the sum once per word column."""
    return ((src & (0xF << SHIFT)) | exp_bits).to(tl.float32, bitcast=True)


@triton.jit
def _x_word_columns(x_rows, kw, k_hi, m_mask, stride_xk):
    """The activations a K tile of int4 words multiplies: x[kw + b] for b = 0..7, eight fp32 [1, W] (zero past
    ``k_hi``)."""
    x_mask = m_mask[:, None] & (kw < k_hi)[None, :]
    return (tl.load(x_rows + (kw + 0)[None, :] * stride_xk, mask=x_mask, other=0.0).to(tl.float32),
            tl.load(x_rows + (kw + 1)[None, :] * stride_xk, mask=x_mask, other=0.0).to(tl.float32),
            tl.load(x_rows + (kw + 2)[None, :] * stride_xk, mask=x_mask, other=0.0).to(tl.float32),
            tl.load(x_rows + (kw + 3)[None, :] * stride_xk, mask=x_mask, other=0.0).to(tl.float32),
            tl.load(x_rows + (kw + 4)[None, :] * stride_xk, mask=x_mask, other=0.0).to(tl.float32),
            tl.load(x_rows + (kw + 5)[None, :] * stride_xk, mask=x_mask, other=0.0).to(tl.float32),
            tl.load(x_rows + (kw + 6)[None, :] * stride_xk, mask=x_mask, other=0.0).to(tl.float32),
            tl.load(x_rows + (kw + 7)[None, :] * stride_xk, mask=x_mask, other=0.0).to(tl.float32))


@triton.jit
def _int4_word_gemv_tile(word, zero, xs, one_bits):
    """One K tile of the one-row int4 GEMV from 32-bit words (each holds k = 8j + b in nibble b, b = 0..7) and the
    eight activations ``xs`` of each word column: sum over b of (code_b - zero) * x[8j + b] -> fp32 partials of
    ``word``'s shape, unscaled. ``zero`` and ``xs`` broadcast against ``word``: [BN, 1] and [1, W] for the usual
    packing ([BN, W] words, ``_x_word_columns``), [Q, 1, R] and [1, W, 1] for row-interleaved words.

    Each code costs one LOP3 and one FFMA. Four shifts of the word (3 and 11 left, 5 right, a rotation by 19) bring
    every nibble to bits 15..18 or 19..22, where ``_biased_nibble`` reads it as ``2^8 + code`` or ``2^4 + code``.
    The biases and the zero point are taken out by the partial's initial value,
    ``-(sum_b 2^E_b x_b + zero * sum_b x_b)``, one FFMA per word: the previous kernel subtracted ``2^E + zero`` from
    every code, one FADD per code. The price is rounding: the running sum carries terms up to ~2^8 |x| for a
    result of ~8 |x| per code, about 5 bits of fp32's 24 (with fp32 activations ~1e-6 relative error; with bf16
    ones, whose products are exact, far below the output's rounding)."""
    e8 = one_bits + (8 << 23)  # the biased exponents of 2^8 and 2^4
    e4 = one_bits + (4 << 23)
    uw = word.to(tl.uint32, bitcast=True)
    w3 = word << 3  # nibbles 3, 4 at bits 15, 19
    w11 = word << 11  # nibbles 1, 2
    w5 = word >> 5  # nibbles 5, 6 (arithmetic: the sign lands above bit 22, never read)
    r19 = ((uw << 19) | (uw >> 13)).to(tl.int32, bitcast=True)  # nibble 7 at bit 15, nibble 0 at bit 19
    bias = 256.0 * (xs[1] + xs[3] + xs[5] + xs[7]) + 16.0 * (xs[0] + xs[2] + xs[4] + xs[6])
    xsum = xs[0] + xs[1] + xs[2] + xs[3] + xs[4] + xs[5] + xs[6] + xs[7]
    part = -(zero * xsum + bias)
    part += _biased_nibble(w3, 15, e8) * xs[3]
    part += _biased_nibble(w3, 19, e4) * xs[4]
    part += _biased_nibble(w11, 15, e8) * xs[1]
    part += _biased_nibble(w11, 19, e4) * xs[2]
    part += _biased_nibble(w5, 15, e8) * xs[5]
    part += _biased_nibble(w5, 19, e4) * xs[6]
    part += _biased_nibble(r19, 15, e8) * xs[7]
    part += _biased_nibble(r19, 19, e4) * xs[0]
    return part


@triton.jit
def _word_nibbles_minus_zero(word, zf):
    """All eight codes of int32 words minus the zero point, joined as [..., 2, 2, 2] where element [..., a, b, c] is
    nibble 4a + 2b + c: reshaped to [..., 8] they run in k order (k = 8j + b)."""
    return tl.join(tl.join(tl.join(_nibble_minus(word, 0, zf), _nibble_minus(word, 16, zf)),
                           tl.join(_nibble_minus(word, 8, zf), _nibble_minus(word, 24, zf))),
                   tl.join(tl.join(_nibble_minus(word, 4, zf), _nibble_minus(word, 20, zf)),
                           tl.join(_nibble_minus(word, 12, zf), _nibble_minus(word, 28, zf))))


@triton.jit
def _quads_dot_words(W, pid_n, N, k0, k_hi, stride_wq, R: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GLU: tl.constexpr):
    """The dot path's K tile of row-interleaved words as [BK / 8, BN] (column n = the tile's n-th output row, as
    ``offs_n`` orders them; with ``GLU`` its gate rows, then their up rows). Loaded as [BN / R, BK / 8, R]: each
    quad's (word, row) pairs are contiguous, whole 16-byte vectors and 128-byte lines."""
    QN: tl.constexpr = BLOCK_N // R
    a = tl.arange(0, QN)
    if GLU:
        HQ: tl.constexpr = QN // 2
        own = pid_n * HQ + a % HQ
        q = tl.where(a < HQ, own, own + N // (2 * R))
        q_mask = own < N // (2 * R)
    else:
        q = pid_n * QN + a
        q_mask = q < N // R
    jw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    i = tl.arange(0, R)
    word = tl.load(W + q[:, None, None].to(tl.int64) * stride_wq + (jw * R)[None, :, None] + i[None, None, :],
                   mask=q_mask[:, None, None] & (8 * jw < k_hi)[None, :, None], other=0)
    return tl.reshape(tl.permute(word, (1, 0, 2)), (BLOCK_K // 8, BLOCK_N))


@triton.jit
def _int4_words_to_tile(word, zf, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """int4 words [BK / 8, BN] (word j of column n holds k = 8j + b in nibble b) and ``zf = 2^23 + zero`` [BN] ->
    the fp32 tile ``code - zero`` [BK, BN] (row 8j + b), for tl.dot."""
    w = tl.reshape(_word_nibbles_minus_zero(word, zf[None, :]), (BLOCK_K // 8, BLOCK_N, 8))
    return tl.reshape(tl.permute(w, (0, 2, 1)), (BLOCK_K, BLOCK_N))


@triton.jit
def _gemv_weight_tile(w_rows, k0, k_hi, n_mask, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight's K tile at ``k0`` for the int8 paths and the int4 GEMV: int8 codes [BN, BK], or int4 as 32-bit
    words [BN, BK / 8] (fully masked past ``k_hi``: no traffic)."""
    if BITS == 8:
        kk = k0 + tl.arange(0, BLOCK_K)
        tile = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < k_hi)[None, :], other=0)
    else:
        offs_w = tl.arange(0, BLOCK_K // 8)
        tile = tl.load(w_rows + (k0 // 8 + offs_w)[None, :],
                       mask=n_mask[:, None] & ((k0 + 8 * offs_w) < k_hi)[None, :], other=0)
    return tile


@triton.jit
def _wo_gemm_kernel(X, W, S, Z, B, Y, Out, Counters, R, RO, NW, M, N, K, k_per_split, stride_xm, stride_xk,
                    stride_wn, stride_sn, stride_zn, stride_ym, stride_ys, stride_om, ONE_BITS, eps, BITS: tl.constexpr,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
                    SPLIT_K: tl.constexpr,
                    REDUCE_EACH_TILE: tl.constexpr = True, INT4_WORDS: tl.constexpr = False,
                    INT4_JOIN: tl.constexpr = False, PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False,
                    GLU: tl.constexpr = False, QUADS: tl.constexpr = 0, STAGES: tl.constexpr = None,
                    NORM_K: tl.constexpr = 0, HAS_RESIDUAL: tl.constexpr = False, RMS_SCALE: tl.constexpr = False,
                    ADD_RESIDUAL: tl.constexpr = False, TRIGGER_LATE: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    dt = X.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    HALF: tl.constexpr = BLOCK_N // 2
    if GLU:  # a fused [gate | up] weight: the program takes HALF gate rows and the HALF up rows they pair with
        r = tl.arange(0, BLOCK_N)
        pair = pid_n * HALF + r % HALF
        offs_n = tl.where(r < HALF, pair, pair + N // 2)
        n_mask = pair < N // 2
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)  # int4: the K tile's bytes, each holding k = 2j (low nibble) and 2j + 1 (high)
    offs_w = tl.arange(0, BLOCK_K // 8)  # int4 words (INT4_WORDS): word j holds k = 8j + b in nibble b
    m_mask = offs_m < M
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # int8 GEMV: per-element partial sums, reduced once
    accn = tl.zeros([BLOCK_N], dtype=tl.float32)  # int4 GEMV: one scaled partial per group tile...
    acc4 = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)  # ...or scaled per element, reduced once
    accw = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)  # the same for the word path
    k_lo = pid_k * k_per_split  # a multiple of BLOCK_K: a K tile never straddles an int4 group
    k_hi = tl.minimum(K, k_lo + k_per_split)
    # the GEMV (PREFETCH: one row, int8 or int4 words) issues its first weight tile before anything else and, with
    # PDL, before the previous kernel has finished; each step then loads the next tile before reducing this one
    if PREFETCH:
        w_pf = _gemv_weight_tile(w_rows, k_lo, k_hi, n_mask, BITS, BLOCK_K)
        if INT4_WORDS:  # the group's zero points and scales are weights too
            z_pf, s_pf = _group_zero_scale(Z, S, offs_n, n_mask, k_lo // GROUP, stride_zn, stride_sn, HAS_ZERO,
                                           BLOCK_N)
    if PDL:  # the activations are the previous kernel's output
        tl.extra.cuda.gdc_wait()
        if not TRIGGER_LATE:
            tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH and INT4_WORDS:
        x_pf = _x_word_columns(x_rows, k_lo + 8 * offs_w, k_hi, m_mask, stride_xk)
    if NORM_K > 0:  # RMSNorm prologue (one row, int8): 1 / rms from the whole row; the first program stores x + r
        kn = tl.arange(0, NORM_K)
        xr = tl.load(X + kn, mask=kn < K, other=0.0)
        if HAS_RESIDUAL:
            xr = residual_sum(xr, tl.load(R + kn, mask=kn < K, other=0.0), dt)
            if pid_n == 0 and pid_k == 0:  # (not in the K loop: a store there would keep it from pipelining)
                tl.store(RO + kn, xr, mask=kn < K)
        xr = xr.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xr * xr, axis=0) / K + eps)
    ssq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)  # RMS_SCALE: the row's squares, reduced once
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        if BITS == 8:
            kk = k0 + offs_k
            xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_mask[:, None] & (kk < k_hi)[None, :], other=0.0)
            if RMS_SCALE:
                ssq += xt.to(tl.float32) * xt.to(tl.float32)
            if NORM_K > 0:  # each activation normalised as it is loaded
                if HAS_RESIDUAL:
                    xt = residual_sum(xt, tl.load(R + kk[None, :], mask=(kk < k_hi)[None, :], other=0.0), dt)
                nw = tl.load(NW + kk, mask=kk < k_hi, other=0.0).to(tl.float32)
                xt = rms_normalize(xt, rstd, nw[None, :], dt)
            if PREFETCH:  # (the activations are not prefetched: the 8 x 1024 tile would spill)
                wq = w_pf
                w_pf = _gemv_weight_tile(w_rows, k0 + BLOCK_K, k_hi, n_mask, BITS, BLOCK_K)
            else:
                wq = _gemv_weight_tile(w_rows, k0, k_hi, n_mask, BITS, BLOCK_K)
            if USE_DOT:
                if UPCAST:  # the interpreter multiplies 16-bit dot operands as raw integers; fp32 stays exact
                    acc += tl.dot(xt.to(tl.float32), tl.trans(wq.to(tl.float32)), input_precision="ieee")
                else:
                    acc += tl.dot(xt, tl.trans(wq.to(dt)))  # int8 codes are exact in 16-bit floats
            else:  # BLOCK_M == 1: [1, BK] activations broadcast over the [BN, BK] weight tile
                acc1 += _int8_to_f32(wq) * xt.to(tl.float32)
        elif USE_DOT and INT4_JOIN:
            # the packed bytes as [BK/2, BN] (k pairs down, columns across), both nibbles joined into the [BK, BN]
            # tile (row k = 2j + t): one contiguous activation tile and one dot per K tile, nothing transposed
            # (the split-even/odd path below gathers x at stride 2 and transposes two half tiles)
            kk = k0 + offs_k
            xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_mask[:, None] & (kk < k_hi)[None, :], other=0.0)
            zero, s = _group_zero_scale(Z, S, offs_n, n_mask, k0 // GROUP, stride_zn, stride_sn, HAS_ZERO, BLOCK_N)
            zf = zero + 8388608.0  # 2^23 + zero: the magic-number conversion's offset
            if QUADS > 0:  # row-interleaved words [N / QUADS, K / 8, QUADS]
                word = _quads_dot_words(W, pid_n, N, k0, k_hi, stride_wn, QUADS, BLOCK_N, BLOCK_K, GLU)
                w = _int4_words_to_tile(word, zf, BLOCK_K, BLOCK_N)
            else:
                jb = k0 // 2 + offs_j
                byte = tl.load(W + offs_n[None, :].to(tl.int64) * stride_wn + jb[:, None],
                               mask=(2 * jb < k_hi)[:, None] & n_mask[None, :], other=0).to(tl.int32)
                lo = _nibble_minus(byte, 0, zf[None, :])
                hi = _nibble_minus(byte, 4, zf[None, :])
                w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_K, BLOCK_N))
            if UPCAST:
                part = tl.dot(xt.to(tl.float32), w, input_precision="ieee")
            else:  # codes minus zero are small integers: exact in 16 bits
                part = tl.dot(xt, w.to(dt))
            acc += part * s[None, :]
        elif INT4_WORDS:  # the GEMV (one row) on 32-bit words: one LOP3 per code, see _int4_word_gemv_tile
            kw = k0 + 8 * offs_w  # K tiles are whole words: 8 | 32 | group size
            if PREFETCH:  # everything the next tile reads is in flight while this one computes
                word, zero, s, xs = w_pf, z_pf, s_pf, x_pf
                k1 = k0 + BLOCK_K
                w_pf = _gemv_weight_tile(w_rows, k1, k_hi, n_mask, BITS, BLOCK_K)
                z_pf, s_pf = _group_zero_scale(Z, S, offs_n, n_mask & (k1 < k_hi), k1 // GROUP, stride_zn, stride_sn,
                                               HAS_ZERO, BLOCK_N)
                x_pf = _x_word_columns(x_rows, kw + BLOCK_K, k_hi, m_mask, stride_xk)
            else:
                word = _gemv_weight_tile(w_rows, k0, k_hi, n_mask, BITS, BLOCK_K)
                zero, s = _group_zero_scale(Z, S, offs_n, n_mask, k0 // GROUP, stride_zn, stride_sn, HAS_ZERO,
                                            BLOCK_N)
                xs = _x_word_columns(x_rows, kw, k_hi, m_mask, stride_xk)
            part = _int4_word_gemv_tile(word, zero[:, None], xs, ONE_BITS)
            if REDUCE_EACH_TILE:
                accn += tl.sum(part, axis=1) * s
            else:
                accw += part * s[:, None]
        else:
            # contiguous packed bytes (vector loads, each byte once) and the even / odd activations apart: the
            # low nibbles meet x[k0 + 2j], the high ones x[k0 + 2j + 1]; no interleaving in registers
            ke = k0 + 2 * offs_j
            k_mask = ke < k_hi  # K and every split bound are even: ke + 1 < k_hi too
            xm = m_mask[:, None] & k_mask[None, :]
            xe = tl.load(x_rows + ke[None, :] * stride_xk, mask=xm, other=0.0)
            xo = tl.load(x_rows + (ke + 1)[None, :] * stride_xk, mask=xm, other=0.0)
            byte = tl.load(w_rows + (k0 // 2 + offs_j)[None, :], mask=n_mask[:, None] & k_mask[None, :],
                           other=0).to(tl.int32)
            # a K tile lies inside one group (BLOCK_K divides GROUP): one scale, one zero per row
            zero, s = _group_zero_scale(Z, S, offs_n, n_mask, k0 // GROUP, stride_zn, stride_sn, HAS_ZERO, BLOCK_N)
            zf = zero + 8388608.0  # 2^23 + zero: the magic-number conversion's offset
            w_lo = _nibble_minus(byte, 0, zf[:, None])
            w_hi = _nibble_minus(byte, 4, zf[:, None])
            if USE_DOT:
                if UPCAST:
                    part = tl.dot(xe.to(tl.float32), tl.trans(w_lo), input_precision="ieee")
                    part += tl.dot(xo.to(tl.float32), tl.trans(w_hi), input_precision="ieee")
                else:  # codes minus zero are small integers: exact in 16 bits
                    part = tl.dot(xe, tl.trans(w_lo.to(dt)))
                    part += tl.dot(xo, tl.trans(w_hi.to(dt)))
                acc += part * s[None, :]
            elif REDUCE_EACH_TILE:
                accn += tl.sum(w_lo * xe.to(tl.float32) + w_hi * xo.to(tl.float32), axis=1) * s
            else:
                acc4 += (w_lo * xe.to(tl.float32) + w_hi * xo.to(tl.float32)) * s[:, None]
    if PDL and TRIGGER_LATE:
        tl.extra.cuda.gdc_launch_dependents()
    if not USE_DOT:
        if BITS == 8:
            acc = tl.sum(acc1, axis=1)[None, :]
        elif REDUCE_EACH_TILE:
            acc = accn[None, :]
        elif INT4_WORDS:
            acc = tl.sum(accw, axis=1)[None, :]
        else:
            acc = tl.sum(acc4, axis=1)[None, :]
    if BITS == 8:
        acc = acc * tl.load(S + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if RMS_SCALE:  # x is an RMSNorm's input and the norm's gain is in W: y = (W x) / rms(x) (one row, whole K)
        acc = acc * tl.rsqrt(tl.sum(ssq, axis=1)[:, None] / K + eps)
    if HAS_BIAS and SPLIT_K == 1:  # split K: added once, after the sum
        acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + pid_k.to(tl.int64) * stride_ys + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if GLU:  # SiLU-and-mul epilogue: gate and up rounded to the dtype as the GEMM's output would be, then its math
        g, u = tl.split(tl.permute(tl.reshape(acc.to(dt).to(tl.float32), (BLOCK_M, 2, HALF)), (0, 2, 1)))
        offs_o = pid_n * HALF + tl.arange(0, HALF)
        tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_o[None, :], silu_mul_f32(g, u, dt).to(dt),
                 mask=m_mask[:, None] & (offs_o < N // 2)[None, :])
    elif SPLIT_K > 1:  # fp32 partials, summed by the tile's last split program to finish
        tl.store(y_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])
        sum_partials_if_last(Y, Out, B, Counters, pid_m * tl.num_programs(1) + pid_n, offs_m, offs_n, m_mask, n_mask,
                             stride_ys, stride_ym, stride_om, SPLIT_K, HAS_BIAS)
    elif ADD_RESIDUAL:  # y = residual + linear, each rounded as the unfused ops round them (R: contiguous [M, N])
        r = tl.load(R + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                    other=0.0)
        tl.store(y_ptrs, residual_sum(acc.to(dt), r, dt), mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(y_ptrs, acc.to(dt), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _quads_weights(W_q, Z, S, rows, q_mask, k0, k_hi, stride_zn, stride_sn, QQ: tl.constexpr, BLOCK_W: tl.constexpr,
                   R: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
    """What the K step at ``k0`` reads of the weight (nothing at or past ``k_hi``): words [QQ, W, R] and the group's
    zero points and scales [QQ, R]. The words are loaded as [QQ, W * R], whose inner dim is contiguous in memory:
    16-byte loads, threads across word columns, each thread's quads repeated down its registers."""
    live = k0 < k_hi
    m = q_mask[:, None] & live
    jr = tl.arange(0, BLOCK_W * R)
    word = tl.reshape(tl.load(W_q + (k0 // 8) * R + jr[None, :], mask=m, other=0), (QQ, BLOCK_W, R))
    g = k0 // GROUP
    if HAS_ZERO:
        zero = tl.load(Z + rows.to(tl.int64) * stride_zn + g, mask=m, other=0).to(tl.float32)
    else:
        zero = tl.full([QQ, R], 8.0, tl.float32)
    scale = tl.load(S + rows.to(tl.int64) * stride_sn + g, mask=m, other=0).to(tl.float32)
    return word, zero, scale


@triton.jit
def _quads_x(X, j, k0, k_hi):
    """The eight activations of each word column of the K step at ``k0``, fp32 [1, W, 1] each."""
    live = k0 < k_hi
    kx = (k0 // 8 + j) * 8
    return (tl.load(X + kx + 0, mask=live, other=0).to(tl.float32)[None, :, None],
            tl.load(X + kx + 1, mask=live, other=0).to(tl.float32)[None, :, None],
            tl.load(X + kx + 2, mask=live, other=0).to(tl.float32)[None, :, None],
            tl.load(X + kx + 3, mask=live, other=0).to(tl.float32)[None, :, None],
            tl.load(X + kx + 4, mask=live, other=0).to(tl.float32)[None, :, None],
            tl.load(X + kx + 5, mask=live, other=0).to(tl.float32)[None, :, None],
            tl.load(X + kx + 6, mask=live, other=0).to(tl.float32)[None, :, None],
            tl.load(X + kx + 7, mask=live, other=0).to(tl.float32)[None, :, None])


@triton.jit
def _quads_epilogue(y, rows, row_mask, X, B, RES, Y, pid, N, K, eps, HAS_BIAS: tl.constexpr, GLU: tl.constexpr,
                    BLOCK_Q: tl.constexpr, R: tl.constexpr, RMS_ROW: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    """Whole sums ``y`` of the program's rows (flat): + bias, rounded once to Y's dtype; with ``GLU`` the first half
    are gate rows and the second the up rows they pair with, stored as silu(gate) * up with the unfused ops'
    rounding (gate and up rounded first). ``RMS_ROW`` (a power of two >= K): the sums are first scaled by
    1 / rms(x), x's row read again (from L2: the whole K, which a split-K program has not seen); ``ADD_RESIDUAL``:
    ``RES`` [N] is added to the rounded output, as the unfused add rounds it."""
    dt = Y.dtype.element_ty
    if RMS_ROW > 0:
        kn = tl.arange(0, RMS_ROW)
        xr = tl.load(X + kn, mask=kn < K, other=0.0).to(tl.float32)
        y = y * tl.rsqrt(tl.sum(xr * xr, axis=0) / K + eps)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_mask, other=0.0).to(tl.float32)
    if GLU:
        g, u = tl.split(tl.permute(tl.reshape(y.to(dt).to(tl.float32), (2, BLOCK_Q * R)), (1, 0)))
        offs_o = pid * BLOCK_Q * R + tl.arange(0, BLOCK_Q * R)
        tl.store(Y + offs_o, silu_mul_f32(g, u, dt).to(dt), mask=offs_o < N // 2)
    elif ADD_RESIDUAL:
        tl.store(Y + rows, residual_sum(y.to(dt), tl.load(RES + rows, mask=row_mask, other=0.0), dt), mask=row_mask)
    else:
        tl.store(Y + rows, y.to(dt), mask=row_mask)


@triton.jit
def _int4_quads_gemv_kernel(X, W, S, Z, B, P, Y, Counters, RES, N, K, k_per_split, stride_wq, stride_zn, stride_sn,
                            ONE_BITS, eps, BLOCK_Q: tl.constexpr, BLOCK_W: tl.constexpr, R: tl.constexpr,
                            GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                            SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr, GLU: tl.constexpr,
                            RMS_ROW: tl.constexpr = 0, ADD_RESIDUAL: tl.constexpr = False):
    """The one-row int4 GEMV on row-interleaved words (``interleave_int4_rows``: W int32 [N / R, K / 8, R]).

    Program (p, s) takes BLOCK_Q quads of R rows (with ``GLU``, BLOCK_Q quads of gate rows and the BLOCK_Q up quads
    they pair with) and the s-th K range. Each thread holds one word column of many rows, so the eight activations
    of a column are loaded, converted and folded into the bias terms once per R rows per quad, where the usual
    layout's 16-byte loads give a thread four columns of one row (sm_90 SASS: ~3.7 instructions per code against
    6.7). Partials [Q, W, R] are scaled per K step and reduced once at the end. With ``SPLIT_K`` > 1 each program
    stores an fp32 partial in ``P`` [SPLIT_K, N] and the tile's last program to arrive sums them in split order,
    then runs the epilogue (bias, rounding, SiLU-and-mul); the sum order is fixed, so the bits are reproducible.
    The loads stay prefetched in registers: pipelined into shared memory like the int8 GEMV's wide tiles, they were
    slower on every Llama linear on the H200 (session 25; branch ``exp/int4-quads-stages``)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    STEP: tl.constexpr = BLOCK_W * 8
    QQ: tl.constexpr = 2 * BLOCK_Q if GLU else BLOCK_Q
    NQ = N // R
    t = tl.arange(0, QQ)
    if GLU:  # gate quads, then the up quads N / 2 rows further
        own = pid * BLOCK_Q + t % BLOCK_Q
        q = tl.where(t < BLOCK_Q, own, own + NQ // 2)
        q_mask = own < NQ // 2
    else:
        q = pid * BLOCK_Q + t
        q_mask = q < NQ
    i = tl.arange(0, R)
    rows = q[:, None] * R + i[None, :]
    W_q = W + q[:, None].to(tl.int64) * stride_wq
    j = tl.arange(0, BLOCK_W)
    k_lo = pid_k * k_per_split  # a multiple of STEP, which divides the group size
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros([QQ, BLOCK_W, R], dtype=tl.float32)
    if PREFETCH:  # the first weights go out before the previous kernel has finished (PDL)
        w_nx, z_nx, s_nx = _quads_weights(W_q, Z, S, rows, q_mask, k_lo, k_hi, stride_zn, stride_sn, QQ, BLOCK_W,
                                          R, GROUP, HAS_ZERO)
    if PDL:  # the activations are the previous kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH:
        x_nx = _quads_x(X, j, k_lo, k_hi)
    for k0 in range(k_lo, k_hi, STEP):
        if PREFETCH:  # everything the next step reads is in flight while this one computes
            word, zero, scale, xs = w_nx, z_nx, s_nx, x_nx
            w_nx, z_nx, s_nx = _quads_weights(W_q, Z, S, rows, q_mask, k0 + STEP, k_hi, stride_zn, stride_sn, QQ,
                                              BLOCK_W, R, GROUP, HAS_ZERO)
            x_nx = _quads_x(X, j, k0 + STEP, k_hi)
        else:
            word, zero, scale = _quads_weights(W_q, Z, S, rows, q_mask, k0, k_hi, stride_zn, stride_sn, QQ, BLOCK_W,
                                               R, GROUP, HAS_ZERO)
            xs = _quads_x(X, j, k0, k_hi)
        acc += _int4_word_gemv_tile(word, zero[:, None, :], xs, ONE_BITS) * scale[:, None, :]
    y = tl.reshape(tl.sum(acc, axis=1), (QQ * R,))
    rows = tl.reshape(rows, (QQ * R,))
    row_mask = tl.reshape(q_mask[:, None] & (i < R)[None, :], (QQ * R,))
    if SPLIT_K == 1:
        _quads_epilogue(y, rows, row_mask, X, B, RES, Y, pid, N, K, eps, HAS_BIAS, GLU, BLOCK_Q, R, RMS_ROW,
                        ADD_RESIDUAL)
    else:
        part = P + rows.to(tl.int64)
        tl.store(part + pid_k.to(tl.int64) * N, y, mask=row_mask)
        if last_to_arrive(Counters + pid, SPLIT_K):
            y = sum_partials_in_order(part, row_mask, N, SPLIT_K)
            _quads_epilogue(y, rows, row_mask, X, B, RES, Y, pid, N, K, eps, HAS_BIAS, GLU, BLOCK_Q, R, RMS_ROW,
                            ADD_RESIDUAL)
            rearm(Counters + pid)


@triton.jit
def _int4_dequant_kernel(W, S, Z, Out, N, K, stride_wn, stride_zn, stride_sn, stride_on, QUADS: tl.constexpr,
                         GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Out [N, K] = (code - zero) * scale in Out's dtype, from int4 words: the usual packing read as int32 [N, K / 8]
    (``QUADS`` = 0) or row-interleaved words [N / QUADS, K / 8, QUADS]. A block of BLOCK_W words (8 * BLOCK_W k)
    lies inside one group: one zero point and one scale per row."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    jw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    n_mask = offs_n < N
    mask = n_mask[:, None] & (jw < K // 8)[None, :]
    if QUADS > 0:
        ptrs = (W + (offs_n // QUADS).to(tl.int64)[:, None] * stride_wn + (jw * QUADS)[None, :]
                + (offs_n % QUADS)[:, None])
    else:
        ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + jw[None, :]
    word = tl.load(ptrs, mask=mask, other=0)
    g = tl.program_id(1) * BLOCK_W * 8 // GROUP
    zero, scale = _group_zero_scale(Z, S, offs_n, n_mask, g, stride_zn, stride_sn, HAS_ZERO, BLOCK_N)
    codes = _word_nibbles_minus_zero(word, (zero + 8388608.0)[:, None])  # [BN, BW, 2, 2, 2]
    w = tl.reshape(codes, (BLOCK_N, BLOCK_W * 8)) * scale[:, None]
    kk = tl.program_id(1) * BLOCK_W * 8 + tl.arange(0, BLOCK_W * 8)
    tl.store(Out + offs_n.to(tl.int64)[:, None] * stride_on + kk[None, :], w.to(Out.dtype.element_ty),
             mask=n_mask[:, None] & (kk < K)[None, :])


def dequantize_int4_triton(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                           group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The int4 weight (usual packing or row-interleaved words) as a float [N, K] of ``dtype``, in one pass: many
    rows (prefill) multiply it with the float GEMM (``w4a16_linear``'s large-M path)."""
    N, K = int4_weight_shape(qweight)
    quads = qweight.shape[2] if qweight.dim() == 3 else 0
    words = qweight if quads else qweight.contiguous().view(torch.int32)
    out = torch.empty(N, K, device=qweight.device, dtype=dtype)
    bw = min(16, group_size // 8) if not interpreting() else min(4, group_size // 8)
    bn = 32 if not interpreting() else 8
    direct(_int4_dequant_kernel)[(cdiv(N, bn), cdiv(K // 8, bw))](
        words, scales, zeros if zeros is not None else scales, out, N, K, words.stride(0),
        zeros.stride(0) if zeros is not None else 0, scales.stride(0), out.stride(0), QUADS=quads, GROUP=group_size,
        HAS_ZERO=zeros is not None, BLOCK_N=bn, BLOCK_W=bw, num_warps=4)
    return out


@functools.lru_cache(maxsize=4096)
def _wo_config_cached(M: int, N: int, K: int, bits: int, group_size: int, sms: int, interp: bool,
                      glu: bool) -> tuple:
    return tuple(_wo_config(M, N, K, bits, group_size, sms, interp, glu).items())


def wo_config(M: int, N: int, K: int, bits: int, group_size: int, sms: int = 132, glu: bool = False) -> dict:
    """Tiles: one row -> CUDA-core GEMV tiles; more rows -> tl.dot tiles growing with M; split-K for M <= 64
    (``split_k_for``; never with ``glu``, whose epilogue needs whole sums). For int4, BLOCK_K divides the group size
    so every K tile has one scale per output row. Cached per shape: no per-call Python work beyond a dict lookup."""
    return dict(_wo_config_cached(M, N, K, bits, group_size, sms, interpreting(), glu))


# One-row int8 GEMV tiles: (BLOCK_N, BLOCK_K, warps, CTAs resident per SM). A batch-1 GEMV is as fast as its last
# wave of CTAs: on the H100 (scripts/gpu/wo_gemv_bench.py --sweep, session 12) 8 rows x 1024 k with 2 warps took the
# 8B o_proj and down_proj from 9.3 / 26.9 us (8 x 1024, 4 warps: 512 tiles in 3 CTAs per SM, 1.3 waves) to 7.2 /
# 21.7 us (one wave of 4 per SM; 61 -> 78% and 74 -> 91% of the copy bandwidth), where 4 rows suit the 6144-row
# qkv_proj (1536 tiles, 6 per SM: 1.9 waves), and 4 x 2048 the 1B's 2048-row down_proj (512 tiles, 4 per SM: 7.6
# us against 8.8 for 4 x 1024 at 6 per SM). Residency follows from ptxas's 242, 156 and 244 registers per thread
# at 64 threads (checked in tests/ops/test_wo_gemm.py).
INT8_GEMV_TILES = ((8, 1024, 2, 4), (4, 1024, 2, 6), (4, 2048, 2, 4))
# One-row int8 tiles with the loads pipelined into shared memory (BLOCK_N, BLOCK_K, warps, STAGES), for weights whose
# row tiles alone give every SM several CTAs. H200, session 25 (scripts/gpu/pipelined_gemv_sweep.py: 16/32 rows x
# 256/512 k, 4/6 stages, splits 1, a, 2a; engine layouts, gate_up with its SiLU-and-mul epilogue), us against the
# register prefetch: 8B gate_up 36.9 -> 31.3, lm_head 148.4 -> 120.5, down_proj 16.8 -> 16.1; 1B gate_up 13.7 ->
# 11.3, lm_head 87.9 -> 62.7. The narrow layers lost (1B qkv_proj 3.4 -> 4.3 us, o_proj 2.9 -> 3.4: a pipeline's
# prologue is as long as their whole stream), and so did the int4 quads GEMV on every linear (its per-step work is
# the cost, not bytes in flight; branch exp/int4-quads-stages), which keeps its register prefetch.
# In the engine (decode_step_probe.py's graph replay, int8-wo) it took the 8B step from 2.794 to 2.585 ms and the 1B
# from 0.696 to 0.612. The 8B down_proj's pipelined tile (16 x 512, 16.8 -> 16.1 us alone) made the 8B step 0.26 ms
# slower in the engine, so it was left out: under PDL the register-prefetch kernel's first weight tile goes out
# while gate_up finishes, where a pipelined kernel issues nothing before its gdc_wait.
INT8_PIPELINED_TILE = (32, 256, 4, 6)  # for weights with at least 3 row tiles per SM (gate_up, LM head)
# The pipelined tile for a weight much longer than wide (down_proj, K > 2 N) whose 16-row tiles alone give every SM
# one: (BLOCK_N, BLOCK_K, warps, STAGES). Alone it streamed the 8B down_proj in 16.1 us against 16.8 (session 25),
# yet made the engine's step 0.26 ms slower: launched early under PDL, its CTAs (48 KB of shared memory each) took
# SMs that gate_up's last wave still needed. With gate_up's PDL trigger after its K loop (``TRIGGER_LATE``, set
# where its down_proj takes this tile) the pair gained 14, 14 and 11 us per 8B step in three H200 calls (sessions
# 26-28, scripts/gpu/int8_pipe_ab.py ``late:glu,down:16x512x6``); the 1B's 2048-row down_proj (128 tiles for 132
# SMs) lost 10-13 us that way and keeps the register-prefetch tile.
INT8_LONG_K_TILE = (16, 512, 4, 6)


def _int8_long_k_pipelined(N: int, K: int, sms: int) -> bool:
    """Whether a one-row int8 weight [N, K] takes ``INT8_LONG_K_TILE`` (see there)."""
    bn, bk, _, stages = INT8_LONG_K_TILE
    return K > 2 * N and cdiv(N, bn) >= sms and K >= bk * stages


def _int8_gemv_tile(N: int, sms: int) -> tuple[int, int, int]:
    """The INT8_GEMV_TILES entry whose waves are fullest (to 0.1; the first one on ties): (BLOCK_N, BLOCK_K, warps)."""
    def fill(tile):
        waves = cdiv(N, tile[0]) / (tile[3] * sms)
        return waves / -(-waves // 1)

    best = max(INT8_GEMV_TILES, key=lambda t: (round(fill(t), 1), -INT8_GEMV_TILES.index(t)))
    return best[:3]


def _int8_pipelined_tile(N: int, K: int, sms: int) -> tuple[int, int, int, int] | None:
    """``INT8_PIPELINED_TILE`` where the weight suits it, else None: it wants several CTAs per SM from row tiles
    alone (no split K) and enough K steps to fill its pipeline."""
    bn, bk, _, stages = INT8_PIPELINED_TILE
    return INT8_PIPELINED_TILE if cdiv(N, bn) >= 3 * sms and K >= bk * stages else None


def _wo_config(M, N, K, bits, group_size, sms, interp, glu=False):
    kp = max(16, next_power_of_2(K))
    if interp:  # tiny tiles: the interpreter runs every program in Python
        bm = 1 if M == 1 else 16
        bk = min(32, kp) if bits == 8 else 32
        return dict(BLOCK_M=bm, BLOCK_N=32, BLOCK_K=bk, USE_DOT=M > 1, SPLIT_K=1, num_warps=4,
                    INT4_WORDS=bits == 4 and M == 1, INT4_JOIN=bits == 4 and M > 1)
    if M == 1:
        # int8: the tile of INT8_GEMV_TILES whose row tiles best fill whole waves of resident CTAs (see there).
        # int4 on 32-bit words of the usual packing (the engine on a GPU interleaves rows: quads_config), reduced
        # once (H100, scripts/gpu/wo_ab.py --sweep, session 14): 64 rows x one group of
        # 128 k with 4 warps (64 codes per thread, ~128 registers), K split for about four programs per SM down to
        # two K tiles a split; with the SiLU-and-mul epilogue, which cannot split K, 128 rows with 8 warps. Against
        # session 13's 64 rows / 2 warps at two programs per SM the step's linears went 2.85 -> 2.70 ms (8B) and
        # 0.594 -> 0.530 ms (1B). Where the row tiles alone give four programs per SM (an LM head), 2 warps (128
        # codes per thread) stream better: 1B LM head 69.9 against 76.1 us
        if bits == 8:
            pipelined = _int8_pipelined_tile(N, K, sms)
            if pipelined is None and _int8_long_k_pipelined(N, K, sms):
                pipelined = INT8_LONG_K_TILE
            if pipelined is not None:
                bn, bk, warps, stages = pipelined
                # a fused [gate | up] weight [2I, H] feeds a down_proj [H, I]: PDL's trigger waits for the K loop
                # where that one is pipelined (INT8_LONG_K_TILE)
                late = glu and _int8_long_k_pipelined(K, N // 2, sms)
                return dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, SPLIT_K=1, num_warps=warps,
                            PREFETCH=False, STAGES=stages, **({"TRIGGER_LATE": True} if late else {}))
            bn, bk, warps = _int8_gemv_tile(N, sms)
            bk = min(bk, kp)
            split = split_k_for(M, N, K, 1, bn, bk, sms)
            extra = {}
        else:
            bk = min(128, group_size)
            bn, warps = (128, 8) if glu else (64, 2 if cdiv(N, 64) >= 4 * sms else 4)
            split = split_k_for(M, N, K, 1, bn, bk, sms, programs_per_sm=4, min_k_tiles=2)
            extra = dict(INT4_WORDS=True, REDUCE_EACH_TILE=False)
        return dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, SPLIT_K=1 if glu else split, num_warps=warps,
                    **extra)
    # batched decode (M <= 64) takes all its rows in one tile: every column tile re-reads the activations, so
    # two row tiles would double that L2 traffic; split-K then fills the SMs
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 128 else 128
    bn = 64 if M <= 64 else 128
    bk = 64 if bits == 8 else min(64, group_size)
    # int4: both nibbles joined into one [BK, BN] tile and one dot (3-5x the split even/odd path at M = 64 on an
    # H100: scripts/gpu/wo_gemv_bench.py --batch 64)
    extra = dict(INT4_JOIN=True) if bits == 4 else {}
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=True, SPLIT_K=split_k_for(M, N, K, bm, bn, bk, sms),
                num_warps=4 if bm <= 32 else 8, num_stages=3 if bm <= 64 else 4, **extra)


def quads_config(N: int, K: int, rows: int, group_size: int, sms: int = 132, glu: bool = False,
                 interp: bool | None = None) -> dict:
    """Tiles of the one-row GEMV on row-interleaved int4 words (``_int4_quads_gemv_kernel``): 64 rows (BLOCK_Q quads
    of ``rows``; with the SiLU-and-mul epilogue 32 gate and 32 up rows) x one group of at most 128 k per step with 2
    warps (128 codes per thread), and K split for about six programs per SM down to two
    steps per split. H100, session 19 (``scripts/gpu/quads_sweep.py``: 8-32 quads, 2 or 4 warps, splits 1-16, on
    the ten Llama-1B/8B linears): within 4% of the fastest config on every linear. A split kernel holds ~160
    registers, six CTAs per SM: splits past that one wave got slower (8B down_proj 14.9 us at 12 splits, 20.0 at
    16); the epilogue's kernel holds 128. The epilogue's kernel asks for about 16 programs per SM down to four
    steps a split: in the engine (H200, session 28, ``scripts/gpu/int8_pipe_ab.py --quant int4-wo``, greedy graph
    replay) the 8B gate_up at 4 splits took the step from 2.215 to 2.150 ms (2 splits before; 8 gave 2.194), and
    the 1B's keeps its 4 (8 gave 0.569 against 0.546 ms)."""
    interp = interpreting() if interp is None else interp
    return dict(_quads_config_cached(N, K, rows, group_size, sms, glu, interp))


@functools.lru_cache(maxsize=4096)
def _quads_config_cached(N, K, rows, group_size, sms, glu, interp) -> tuple:
    """``quads_config`` per shape, cached: a decode step's GEMV pays a dict lookup, not the split arithmetic."""
    bw = min(16, group_size // 8) if not interp else min(4, group_size // 8)
    bq = max(1, (32 if glu else 64) // rows) if not interp else 2  # GLU: 32 gate and 32 up rows
    rows_per_program = bq * rows * (2 if glu else 1)
    split = 1 if interp else split_k_for(1, N, K, 1, rows_per_program, 8 * bw, sms,
                                         programs_per_sm=16 if glu else 6, min_k_tiles=4 if glu else 2)
    return tuple(dict(BLOCK_Q=bq, BLOCK_W=bw, SPLIT_K=split, num_warps=2 if not interp else 4, PREFETCH=True).items())


def _int4_quads_gemv(x2, words, scales, zeros, group_size, bias, y, config, glu, rms_eps=None, add=None):
    """One row times row-interleaved int4 words [N / R, K / 8, R] (``_int4_quads_gemv_kernel``) into ``y``;
    ``rms_eps`` / ``add`` as ``_wo_triton``'s. ``config`` may set ``PDL`` (default ``pdl_enabled()``): the A/B of
    a launch without programmatic dependent launch (scripts/gpu/int8_pipe_ab.py ``q4nopdl``)."""
    N, K = int4_weight_shape(words)
    R = words.shape[2]
    if glu and (N // 2) % R:
        raise ValueError(f"the SiLU-and-mul epilogue pairs gate and up quads: N / 2 = {N // 2} must be a multiple "
                         f"of the interleave {R}")
    sms = _num_sms(x2.device.index or 0) if x2.is_cuda else 132
    cfg = dict(config) if config else quads_config(N, K, R, group_size, sms, glu)
    bq, bw, split = cfg["BLOCK_Q"], cfg["BLOCK_W"], cfg.get("SPLIT_K", 1)
    step = 8 * bw
    if group_size % step:
        raise ValueError(f"a K step of {bw} words ({step} k) must divide group_size ({group_size})")
    k_per_split = cdiv(cdiv(K, split), step) * step
    split = cdiv(K, k_per_split)  # no empty splits
    tiles = cdiv(N // 2, bq * R) if glu else cdiv(N, bq * R)
    counters = split_counters(x2.device, tiles) if split > 1 else y
    if counters is None:  # a CUDA graph capture with the counter buffer too small: whole sums, no split
        split, k_per_split, counters = 1, K, y
    partials = torch.empty(split, N, dtype=torch.float32, device=x2.device) if split > 1 else y
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    dummy = scales
    _int4_quads_gemv_kernel[(tiles, split)](
        x2, words, scales, zeros if zeros is not None else dummy, bias if bias is not None else dummy, partials, y,
        counters, add if add is not None else dummy, N, K, k_per_split, words.stride(0),
        zeros.stride(0) if zeros is not None else 0, scales.stride(0), ONE_BITS_VALUE, float(rms_eps or 0.0),
        BLOCK_Q=bq, BLOCK_W=bw, R=R, GROUP=group_size, HAS_ZERO=zeros is not None,
        HAS_BIAS=bias is not None, SPLIT_K=split, PREFETCH=cfg.get("PREFETCH", True), GLU=glu,
        RMS_ROW=next_power_of_2(K) if rms_eps is not None else 0, ADD_RESIDUAL=add is not None,
        num_warps=cfg.get("num_warps", 2), **pdl_launch_args(cfg.get("PDL")))
    return y


def _int4_dequant_linear(x2, qweight, scales, zeros, group_size, bias, y, glu):
    """``y = x2 @ dequant(w).T + bias`` (``glu``: silu(gate) * up) for many rows: the weight dequantized to x's dtype
    (``dequantize_int4_triton``) in slices of at most INT4_DEQUANT_SLICE_BYTES, each multiplied by the float GEMM.
    The slices bound the float copy (a Llama-3.1-8B LM head whole would be 1 GB) where a decode graph's pool holds
    it; a GLU weight goes whole (its SiLU-and-mul pairs rows N/2 apart)."""
    N, K = int4_weight_shape(qweight)
    b = bias.to(x2.dtype) if bias is not None else None
    if glu:
        w = dequantize_int4_triton(qweight, scales, zeros, group_size, x2.dtype)
        y.copy_(silu_and_mul(F.linear(x2, w, b)))
        return
    quads = qweight.shape[2] if qweight.dim() == 3 else 1
    rows = max(quads, INT4_DEQUANT_SLICE_BYTES // (K * x2.element_size()) // 64 * 64)
    for a in range(0, N, rows):
        e = min(N, a + rows)
        w = dequantize_int4_triton(qweight[a // quads:e // quads] if quads > 1 else qweight[a:e], scales[a:e],
                                   zeros[a:e] if zeros is not None else None, group_size, x2.dtype)
        part = F.linear(x2, w, b[a:e] if b is not None else None)
        if a == 0 and e == N:
            y.copy_(part)
        else:
            y[:, a:e] = part


def _wo_triton(x, qweight, scales, zeros, group_size, bias, bits, out=None, config=None, glu=False, norm=None,
               rms_eps=None, add=None):
    """Launch the kernel; ``out`` [M, N] (tests pass a poisoned buffer), ``config`` overrides ``wo_config`` (or
    ``quads_config``). ``glu``: the weight is a fused [gate | up] [2I, K] and the output is silu(gate) * up [M, I]
    (one launch). int4 weights may be row-interleaved words (``interleave_int4_rows``): one row then takes the
    quads GEMV, more rows the joined dot reading the same words. ``norm`` = (norm weight [K], eps, residual [1, K]
    or None, residual out [1, K] or None): the one-row int8 GEMV normalises its input itself (``NORM_K``).
    ``rms_eps``: scale the output by 1 / rms(x); ``add`` [M, N]: return ``add + linear`` instead; both for one
    row: the int8 GEMV (``RMS_SCALE``, ``ADD_RESIDUAL``; it then takes whole K sums) or the int4 quads GEMV
    (``RMS_ROW``, ``ADD_RESIDUAL``, in the program that finishes each sum)."""
    K = x.shape[-1]
    quads = qweight.shape[2] if qweight.dim() == 3 else 0
    N = int4_weight_shape(qweight)[0] if bits == 4 else qweight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if (quads and not qweight.is_contiguous()) or qweight.stride(-1) != 1:
        qweight = qweight.contiguous()
    n_out = N // 2 if glu else N
    if (rms_eps is not None or add is not None) and (M != 1 or (bits == 4 and not quads)):
        raise ValueError("the 1 / rms and residual epilogues are for one-row GEMVs (int8, or row-interleaved int4 "
                         f"words); got {M} rows of {'row-interleaved ' if quads else ''}int{bits} weights")
    y = out if out is not None else torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.view(*x.shape[:-1], n_out)
    if K == 0:  # an empty sum: just the bias
        y0 = bias.expand(M, N).to(x.dtype) if bias is not None else torch.zeros(M, N, dtype=x.dtype, device=x.device)
        y.copy_(silu_and_mul(y0) if glu else y0)
        return y.view(*x.shape[:-1], n_out)
    if scales.dim() == 2 and scales.stride(1) != 1:
        scales = scales.contiguous()
    if zeros is not None and zeros.stride(1) != 1:
        zeros = zeros.contiguous()
    if bits == 4 and config is None and M >= INT4_DEQUANT_MIN_M:  # many rows: dequantize once, float GEMM
        _int4_dequant_linear(x2, qweight, scales, zeros, group_size, bias, y, glu)
        return y.view(*x.shape[:-1], n_out)
    if quads and M == 1 and not (config or {}).get("USE_DOT", False):
        _int4_quads_gemv(x2, qweight, scales, zeros, group_size, bias, y, config, glu, rms_eps, add)
        return y.view(*x.shape[:-1], n_out)
    sms = _num_sms(x.device.index or 0) if x.is_cuda else 132
    cfg = dict(config) if config else wo_config(M, N, K, bits, group_size, sms, glu)
    if quads:
        if not (cfg["USE_DOT"] and cfg.get("INT4_JOIN", False)):
            raise ValueError("row-interleaved int4 words take the quads GEMV (one row) or the joined dot "
                             "(USE_DOT=True, INT4_JOIN=True)")
        cfg["QUADS"] = quads
    cfg.setdefault("SPLIT_K", 1)
    num_warps = cfg.pop("num_warps", 4)
    num_stages = cfg.pop("num_stages", None)
    if bits == 4 and group_size % cfg["BLOCK_K"]:
        raise ValueError(f"BLOCK_K ({cfg['BLOCK_K']}) must divide group_size ({group_size})")
    if not cfg["USE_DOT"] and cfg["BLOCK_M"] != 1:
        raise ValueError("the CUDA-core path takes one row per program (BLOCK_M=1)")
    words = bits == 4 and not cfg["USE_DOT"] and cfg.get("INT4_WORDS", False)
    if words and not quads:  # the same bytes read as int32 words (K is a multiple of the group size, so of 8)
        if cfg["BLOCK_K"] < 8:
            raise ValueError(f"the int4 word GEMV needs BLOCK_K >= 8, got {cfg['BLOCK_K']}")
        if qweight.data_ptr() % 4 or qweight.stride(0) % 4:
            qweight = qweight.contiguous()
        qweight = qweight.view(torch.int32)
    if glu:
        if cfg["BLOCK_N"] < 2:
            raise ValueError(f"the SiLU-and-mul epilogue pairs gate and up rows: BLOCK_N must be >= 2, got "
                             f"{cfg['BLOCK_N']}")
        cfg["SPLIT_K"] = 1  # the epilogue needs the whole sum
    if rms_eps is not None or add is not None:
        if cfg["USE_DOT"]:
            raise ValueError("the 1 / rms and residual epilogues are for the one-row GEMV tiles (USE_DOT=False)")
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        cfg["SPLIT_K"] = 1  # both need the whole sum (a narrow weight loses some SMs, and keeps one launch)
        cfg["RMS_SCALE"] = rms_eps is not None
        cfg["ADD_RESIDUAL"] = add is not None
    split = cfg["SPLIT_K"]
    k_per_split = cdiv(cdiv(K, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = cdiv(K, k_per_split)  # no empty splits
    cols_per_program = cfg["BLOCK_N"] // 2 if glu else cfg["BLOCK_N"]
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(n_out, cols_per_program)
    counters = split_counters(x.device, tiles) if split > 1 else y
    if counters is None:  # a CUDA graph capture with the counter buffer too small: whole sums, no split
        split, k_per_split, counters = 1, K, y
    cfg["SPLIT_K"] = split
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(n_out, cols_per_program), split)
    target = y if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    dummy = scales
    extra = {"num_stages": num_stages} if num_stages else {}
    gemv = not cfg["USE_DOT"] and (bits == 8 or words)
    cfg.setdefault("PREFETCH", gemv)
    if cfg["PREFETCH"] and not gemv:
        raise ValueError("PREFETCH is for the one-row GEMV (int8, or int4 on 32-bit words)")
    nw, eps, residual, residual_out = norm if norm is not None else (dummy, rms_eps or 0.0, add, None)
    if norm is not None:
        if bits != 8 or M != 1 or not gemv:
            raise ValueError("the RMSNorm prologue is for the one-row int8 GEMV")
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        cfg["NORM_K"] = next_power_of_2(K)
        cfg["HAS_RESIDUAL"] = residual is not None
    pdl = pdl_launch_args()
    _wo_gemm_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else dummy,
        bias if bias is not None else dummy, target, y, counters,
        residual if residual is not None else dummy, residual_out if residual_out is not None else dummy, nw,
        M, N, K, k_per_split, x2.stride(0), x2.stride(1), qweight.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, target.stride(-2), target.stride(0) if split > 1 else 0,
        y.stride(0), ONE_BITS_VALUE, float(eps), BITS=bits, GROUP=max(group_size, 1), HAS_ZERO=zeros is not None,
        HAS_BIAS=bias is not None,
        UPCAST=interpreting() or x.dtype == torch.float32, GLU=glu, num_warps=num_warps, **pdl, **extra, **cfg)
    return y.view(*x.shape[:-1], n_out)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ------------------------------------------------------------------------------------------------ doctor
def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _check_w8a16(device, dtype, g):
    M, N, K = 3, 45, 83
    x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
    q = torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8, generator=g)
    s = torch.rand(N, device=device, generator=g) * 0.01 + 1e-3
    b = torch.randn(N, device=device, dtype=dtype, generator=g)
    return _rel(w8a16_linear(x, q, s, b), w8a16_linear_ref(x, q, s, b)), backend_for(x)


def _check_w4a16(device, dtype, g):
    M, N, K, G = 3, 45, 192, 64
    x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
    q = torch.randint(0, 256, (N, K // 2), device=device, dtype=torch.uint8, generator=g)
    s = torch.rand(N, K // G, device=device, generator=g) * 0.01 + 1e-3
    z = torch.randint(0, 16, (N, K // G), device=device, dtype=torch.uint8, generator=g)
    return _rel(w4a16_linear(x, q, s, z, G), w4a16_linear_ref(x, q, s, z, G)), backend_for(x)


def _check_w4a16_interleaved(device, dtype, g):
    """One row and many rows on row-interleaved words (the engine's GPU layout): the quads GEMV, the many-row
    dequantize + GEMM."""
    N, K, G = 48, 256, 64
    q = torch.randint(0, 256, (N, K // 2), device=device, dtype=torch.uint8, generator=g)
    s = torch.rand(N, K // G, device=device, generator=g) * 0.01 + 1e-3
    z = torch.randint(0, 16, (N, K // G), device=device, dtype=torch.uint8, generator=g)
    quads = interleave_int4_rows(q, 4)
    errs = []
    for M in (1, INT4_DEQUANT_MIN_M):
        x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
        errs.append(_rel(w4a16_linear(x, quads, s, z, G), w4a16_linear_ref(x, q, s, z, G)))
    return max(errs), backend_for(x)


DOCTOR_CHECKS = {"w8a16_linear": _check_w8a16, "w4a16_linear": _check_w4a16,
                 "w4a16_linear (row-interleaved)": _check_w4a16_interleaved}
