"""Rows of a weight-only quantized table: the input-embedding lookup of a quantized engine.

A token embedding is only gathered, never multiplied, so storing it quantized costs no speed and, for a Llama-3.1-8B
shape, 1 GB of a bf16 table is most of what keeps an int4-wo engine above 30% of bf16. The table is a
``WeightOnly`` (``kiln.ops.wo_gemm``) read row by row:

- int8 per row (``bits=8``): ``row[v] = qweight[v] * scale[v]``, the int8-wo weight of an LM head of the same
  table, so a tied int8-wo head and its embedding share one tensor;
- int4 in groups (``bits=4``): ``row[v][k] = (code - zero) * scale`` of group ``k // G``, packed uint8 [V, H/2]
  or the GPU's row-interleaved words [V / R, H / 8, R]: a tied int4-wo head's table, read in place.

``wo_embedding(ids, table, dtype)`` dequantizes in fp32 and rounds once to ``dtype`` (exactly the reference's
bits). On CUDA it is one Triton launch: a decode step's lookup is one token, and the torch gather, unpack and
scale ran as a chain of ~6 small kernels at a few microseconds each.
"""

from __future__ import annotations

import torch

from ._dispatch import FLOAT_DTYPES, backend_for, check_tensor
from ._triton import cdiv, next_power_of_2, tl, triton
from .wo_gemm import SUPPORTED_GROUP_SIZES, WeightOnly, dequantize_int4_weight, int4_weight_shape

BLOCK_H = 1024  # table columns per program: one token's row of a Llama-3.1-8B table is 4 programs


def wo_table_shape(table: WeightOnly) -> tuple[int, int]:
    """(rows, columns) of a weight-only table in any of its layouts."""
    if table.bits == 4:
        return int4_weight_shape(table.qweight)
    return tuple(table.qweight.shape)


def _check(ids: torch.Tensor, table: WeightOnly, dtype: torch.dtype) -> None:
    check_tensor("ids", ids, dtypes=(torch.int32, torch.int64))
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be a float dtype ({FLOAT_DTYPES}), got {dtype}")
    if table.bits == 8:
        check_tensor("qweight", table.qweight, ndim=2, dtypes=(torch.int8,), device=ids.device)
        check_tensor("scale", table.scales, ndim=1, dtypes=FLOAT_DTYPES, device=ids.device)
        if table.scales.shape[0] != table.qweight.shape[0]:
            raise ValueError(f"an int8 table needs one scale per row ({table.qweight.shape[0]}), "
                             f"got {table.scales.shape[0]}")
    elif table.bits == 4:
        q = check_tensor("qweight", table.qweight, ndim=(2, 3), dtypes=(torch.uint8, torch.int32), device=ids.device)
        if (q.dim() == 3) != (q.dtype == torch.int32):
            raise ValueError(f"an int4 table is packed uint8 [V, H/2] or int32 words [V/R, H/8, R], got "
                             f"{q.dtype} of shape {tuple(q.shape)}")
        if table.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {table.group_size!r}")
        V, H = int4_weight_shape(q)
        groups = [V, H // table.group_size]
        check_tensor("scales", table.scales, ndim=2, dtypes=FLOAT_DTYPES, device=ids.device)
        if H % table.group_size or list(table.scales.shape) != groups:
            raise ValueError(f"scales must have shape [V, H / group_size] = {groups}, got {list(table.scales.shape)}")
        if table.zeros is not None:
            check_tensor("zeros", table.zeros, ndim=2, dtypes=(torch.uint8,), device=ids.device)
            if list(table.zeros.shape) != groups:
                raise ValueError(f"zeros must have the shape of scales {groups}, got {list(table.zeros.shape)}")
    else:
        raise ValueError(f"a weight-only table has 8 or 4 bits, got {table.bits!r}")


def wo_embedding(ids: torch.Tensor, table: WeightOnly, dtype: torch.dtype) -> torch.Tensor:
    """The rows of ``table`` at ``ids`` (any shape, int32/int64, each in [0, V)), dequantized: [*ids.shape, H] in
    ``dtype``. Ids are not range-checked here (that would cost a host sync per step); the engine validates
    prompts against the vocabulary before they reach the model."""
    _check(ids, table, dtype)
    if backend_for(ids, table.qweight) == "ref":
        return wo_embedding_ref(ids, table, dtype)
    return _wo_embedding_triton(ids, table, dtype)


def int4_table_rows(qweight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Packed uint8 rows [T, H/2] of flat ``ids`` from a packed or row-interleaved int4 table (a gather: the
    interleaved words of the other rows are not touched)."""
    if qweight.dim() == 3:
        r = qweight.shape[2]
        return qweight[ids // r, :, ids % r].contiguous().view(torch.uint8)
    return qweight[ids]


def wo_embedding_ref(ids: torch.Tensor, table: WeightOnly, dtype: torch.dtype) -> torch.Tensor:
    """The specification: gather the rows, dequantize in fp32, round once to ``dtype``."""
    flat = ids.reshape(-1).long()
    if table.bits == 8:
        rows = table.qweight[flat].float() * table.scales[flat].float()[:, None]
    else:
        zeros = None if table.zeros is None else table.zeros[flat]
        rows = dequantize_int4_weight(int4_table_rows(table.qweight, flat), table.scales[flat], zeros,
                                      table.group_size)
    return rows.to(dtype).view(*ids.shape, rows.shape[-1])


@triton.jit
def _wo_embedding_kernel(IDS, Q, S, Z, OUT, H, stride_q, stride_s, stride_z, BITS: tl.constexpr, R: tl.constexpr,
                         GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK: tl.constexpr):
    """Program (t, c): columns [c * BLOCK, (c + 1) * BLOCK) of token t's row. int4 codes are read per column from
    their byte (packed, R = 0) or 32-bit word (interleaved by R rows); neighbouring columns share the load."""
    t = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = k < H
    v = tl.load(IDS + t).to(tl.int64)
    if BITS == 8:
        q = tl.load(Q + v * stride_q + k, mask=ok, other=0).to(tl.float32)
        row = q * tl.load(S + v * stride_s).to(tl.float32)
    else:
        if R == 0:
            byte = tl.load(Q + v * stride_q + k // 2, mask=ok, other=0).to(tl.int32)
            code = (byte >> ((k % 2) * 4)) & 0xF
        else:
            word = tl.load(Q + (v // R) * stride_q + (k // 8) * R + v % R, mask=ok, other=0)
            code = (word >> ((k % 8) * 4)) & 0xF
        g = k // GROUP
        if HAS_ZERO:
            zero = tl.load(Z + v * stride_z + g, mask=ok, other=0).to(tl.float32)
        else:
            zero = tl.full([BLOCK], 8.0, tl.float32)
        row = (code.to(tl.float32) - zero) * tl.load(S + v * stride_s + g, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + t * H + k, row.to(OUT.dtype.element_ty), mask=ok)


def _wo_embedding_triton(ids: torch.Tensor, table: WeightOnly, dtype: torch.dtype) -> torch.Tensor:
    V, H = wo_table_shape(table)
    flat = ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.empty(flat.shape[0], H, device=ids.device, dtype=dtype)
    if flat.shape[0]:
        q, s, z = (None if t is None else t.contiguous() for t in (table.qweight, table.scales, table.zeros))
        four = table.bits == 4
        interleaved = four and q.dim() == 3
        block = min(BLOCK_H, next_power_of_2(H))
        _wo_embedding_kernel[(flat.shape[0], cdiv(H, block))](
            flat, q, s, z if z is not None else s, out, H, q.stride(0), s.stride(0),
            z.stride(0) if z is not None else 0, BITS=table.bits, R=q.shape[2] if interleaved else 0,
            GROUP=table.group_size if four else 1, HAS_ZERO=z is not None, BLOCK=block, num_warps=4)
    return out.view(*ids.shape, H)
