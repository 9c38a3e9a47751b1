"""``wo_embedding``: rows of an int8-per-row or grouped int4 table (packed or row-interleaved), against the
dequantized weight itself. On a CPU-only machine the kernel runs under TRITON_INTERPRET=1 on tiny tables; on a GPU
at a Llama-3.1-8B table's width."""

import pytest
import torch

from kiln.ops import wo_gemm
from kiln.ops._dispatch import interpreting
from kiln.ops.wo_embedding import wo_embedding, wo_embedding_ref
from tests.conftest import DEVICE, requires_triton

BIG = DEVICE.type == "cuda"
V, H = (1024, 4096) if BIG else (24, 192)


def int8_table(seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randint(-127, 128, (V, H), device=DEVICE, dtype=torch.int8, generator=g)
    return wo_gemm.WeightOnly(q, torch.rand(V, device=DEVICE, generator=g) * 0.02 + 1e-3)


def int4_table(G, zeros, interleave, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randint(0, 256, (V, H // 2), device=DEVICE, dtype=torch.uint8, generator=g)
    s = torch.rand(V, H // G, device=DEVICE, generator=g) * 0.02 + 1e-3
    z = torch.randint(0, 16, (V, H // G), device=DEVICE, dtype=torch.uint8, generator=g) if zeros else None
    return wo_gemm.WeightOnly(wo_gemm.interleave_int4_rows(q, 4) if interleave else q, s, z, G, 4)


def dequantized(table):
    if table.bits == 8:
        return wo_gemm.dequantize_int8_weight(table.qweight, table.scales)
    return wo_gemm.dequantize_int4_weight(table.qweight, table.scales, table.zeros, table.group_size)


TABLES = {"int8": lambda: int8_table(), "int4-g32-zeros": lambda: int4_table(32, True, False),
          "int4-g64-interleaved": lambda: int4_table(64, False, True),
          "int4-g128-zeros-interleaved": lambda: int4_table(64 if not BIG else 128, True, True)}


@pytest.mark.parametrize("name", list(TABLES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_dequantized_tables_rows(name, dtype):
    table = TABLES[name]()
    ids = torch.tensor([[3, 0, V - 1], [7, 7, 12]], device=DEVICE)
    rows = wo_embedding_ref(ids, table, dtype)
    assert rows.shape == (2, 3, H) and rows.dtype == dtype
    assert torch.equal(rows, dequantized(table).to(dtype)[ids])


@requires_triton
@pytest.mark.parametrize("name", list(TABLES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_gives_the_references_bits(monkeypatch, name, dtype):
    """Every layout, with and without zero points; one token (a decode step), a batch with repeats, no token."""
    monkeypatch.setenv("KILN_OPS", "triton")
    table = TABLES[name]()
    for ids in (torch.tensor([5], device=DEVICE), torch.tensor([[1, V - 1, 1], [0, 9, 2]], device=DEVICE,
                                                               dtype=torch.int32),
                torch.empty(0, dtype=torch.long, device=DEVICE)):
        out = wo_embedding(ids, table, dtype)
        assert out.shape == (*ids.shape, H) and out.dtype == dtype
        ref = wo_embedding_ref(ids, table, dtype)
        if dtype == torch.bfloat16 and interpreting():  # the interpreter's fp32 -> bf16 cast truncates
            assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2**-7).all()
        else:
            assert torch.equal(out, ref)


def test_bad_tables_and_ids_are_named():
    table = int8_table()
    with pytest.raises(ValueError, match="ids must have dtype"):
        wo_embedding(torch.tensor([1.0], device=DEVICE), table, torch.float32)
    with pytest.raises(ValueError, match="one scale per row"):
        wo_embedding(torch.tensor([1], device=DEVICE), wo_gemm.WeightOnly(table.qweight, table.scales[:-1]),
                     torch.float32)
    with pytest.raises(ValueError, match="dtype must be a float"):
        wo_embedding(torch.tensor([1], device=DEVICE), table, torch.int8)
    t4 = int4_table(32, True, False)
    with pytest.raises(ValueError, match="scales must have shape"):
        wo_embedding(torch.tensor([1], device=DEVICE), wo_gemm.WeightOnly(t4.qweight, t4.scales[:, :-1], None, 32, 4),
                     torch.float32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        wo_embedding(torch.tensor([1], device=DEVICE), wo_gemm.WeightOnly(t4.qweight, t4.scales, None, 48, 4),
                     torch.float32)
    with pytest.raises(ValueError, match="zeros must have the shape of scales"):
        wo_embedding(torch.tensor([1], device=DEVICE), wo_gemm.WeightOnly(t4.qweight, t4.scales, t4.zeros[1:], 32, 4),
                     torch.float32)
    with pytest.raises(ValueError, match="packed uint8"):
        wo_embedding(torch.tensor([1], device=DEVICE), wo_gemm.WeightOnly(t4.qweight.view(torch.int32), t4.scales,
                                                                          None, 32, 4), torch.float32)
    with pytest.raises(ValueError, match="8 or 4 bits"):
        wo_embedding(torch.tensor([1], device=DEVICE), wo_gemm.WeightOnly(t4.qweight, t4.scales, None, 32, 2),
                     torch.float32)
