"""Sparse-conv GEMM kernels (implicit GEMM fwd / dgrad, split weight grad) vs their references.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (tiny shapes); on a GPU at full size."""

import pytest
import torch

from kiln.ops import sparse_gemm as sg
from tests.conftest import DEVICE, requires_triton

BIG = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _gen():
    return torch.Generator(device=DEVICE).manual_seed(torch.randint(0, 2**31, ()).item())


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _problem(dtype, g, n_in, n_out, K, cin, cout):
    x = torch.randn(n_in + 5, cin + 3, device=DEVICE, dtype=dtype, generator=g)[5:, 1:cin + 1]  # strided view
    w_krsc = torch.randn(cout, K, cin, device=DEVICE, dtype=dtype, generator=g) / 8
    w = w_krsc.permute(1, 2, 0)  # [K, Cin, Cout] view of the KRSC layout, never copied
    pm = sg._random_rulebook(n_in, n_out, K, DEVICE, g)
    return x, w, pm


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheduled", [False, True])
def test_implicit_gemm_triton_matches_reference(dtype, scheduled):
    g = _gen()
    shape = (20000, 15000, 27, 64, 96) if BIG else (37, 29, 7, 20, 18)
    x, w, pm = _problem(dtype, g, *shape)
    masks = sg.offset_masks(pm)
    order = sg.mask_order(masks) if scheduled else None
    got = sg._implicit_gemm_triton(x, w, pm, order, masks if scheduled else None)
    ref = sg.implicit_gemm_ref(x.float(), w.float(), pm)
    assert rel_err(got, ref) <= RTOL[dtype]
    # rows without any pair must come out exactly zero
    empty = (pm < 0).all(1)
    assert torch.all(got[empty] == 0)


@pytest.mark.parametrize("backend", ["ref", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("transposed", [False, True])
def test_implicit_gemm_reverse_offsets_reads_the_weight_backwards(monkeypatch, backend, transposed):
    """``reverse_offsets`` (a mirrored submanifold rulebook's input gradient) equals the GEMM with the weight
    flipped along its offsets -- read through a negative stride, also from the transposed view the input gradient
    passes, not copied."""
    monkeypatch.setenv("KILN_OPS", backend)
    g = _gen()
    x, w, pm = _problem(torch.float32, g, 37, 29, 7, 20, 18)
    if transposed:
        x = torch.randn(37, 18, device=DEVICE, generator=g)
        w = w.transpose(1, 2)  # [K, Cout, Cin], the input gradient's view
    got = sg.implicit_gemm(x, w, pm, reverse_offsets=True)
    ref = sg.implicit_gemm_ref(x, w.flip(0), pm)
    assert rel_err(got, ref) <= RTOL[torch.float32]
    assert rel_err(sg.implicit_gemm(x, w, pm), ref) > 1e-2  # the order matters on this problem


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_grad_triton_matches_reference(dtype):
    """The weight gradient from the forward pair map equals the pair-list reference, and is bit-reproducible
    (fixed-order chunk sums by each tile's last program: an integer arrival counter, no float atomics)."""
    g = _gen()
    shape = (20000, 15000, 27, 64, 96) if BIG else (150, 300, 5, 20, 18)
    x, _, pm = _problem(dtype, g, *shape)
    pm[: pm.shape[0] // 3] = -1  # a run of rows without any pair
    pm[:, 1] = -1  # an offset without pairs: its dW is zero, its list splits write nothing
    in_idx, out_idx, counts = sg.pairs_from_map(pm)
    dy = torch.randn(pm.shape[0], shape[4], device=DEVICE, dtype=dtype, generator=g)
    got = sg._weight_grad_triton(x, dy, pm)
    ref = sg.weight_grad_ref(x.float(), dy.float(), in_idx, out_idx, counts)
    assert rel_err(got, ref) <= RTOL[dtype]
    assert got.permute(2, 0, 1).is_contiguous()  # written in the KRSC layout: a module's dW needs no copy
    assert torch.equal(got, sg._weight_grad_triton(x, dy, pm))
    lists = sg.compact_pairs(pm)
    got_lists = sg._weight_grad_triton(x, dy, pm, lists)
    assert rel_err(got_lists, ref) <= RTOL[dtype]
    assert torch.equal(got_lists, sg._weight_grad_triton(x, dy, pm, lists))
    with pytest.raises(ValueError, match="rows but grad_out"):
        sg.weight_grad(x, dy[1:], pm)


@pytest.mark.parametrize("backend", ["ref", pytest.param("triton", marks=requires_triton)])
def test_compact_pairs_groups_the_valid_entries_by_offset(monkeypatch, backend):
    """compact_pairs: per offset, exactly the map's valid (row, source) entries, rows ascending, the count kept
    on the device; an empty map and a map without pairs give empty groups."""
    monkeypatch.setenv("KILN_OPS", backend)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    pm = sg._random_rulebook(40, 33, 7, DEVICE, g)
    pm[5] = -1
    src, rows, offsets = sg.compact_pairs(pm)
    want_src, want_rows, counts = sg.pairs_from_map(pm)
    assert offsets.tolist() == [0] + torch.tensor(counts).cumsum(0).tolist()
    n = int(offsets[-1])
    assert torch.equal(src[:n].long(), want_src) and torch.equal(rows[:n].long(), want_rows)
    for empty in (torch.full((0, 7), -1, dtype=torch.int32, device=DEVICE),
                  torch.full((6, 7), -1, dtype=torch.int32, device=DEVICE)):
        _, _, off = sg.compact_pairs(empty)
        assert off.tolist() == [0] * 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_scatter_and_implicit_references_agree(dtype):
    g = _gen()
    x, w, pm = _problem(dtype, g, 61, 45, 9, 12, 10)
    in_idx, out_idx, counts = sg.pairs_from_map(pm)
    a = sg.gather_gemm_scatter(x, w, in_idx, out_idx, counts, pm.shape[0])
    b = sg.implicit_gemm_ref(x, w, pm)
    ref = sg.implicit_gemm_ref(x.float(), w.float(), pm)
    assert rel_err(a, ref) <= RTOL[dtype] and rel_err(b, ref) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_sparse_conv_path_adds_the_bias_before_rounding_once(dtype):
    """y = conv + bias with the bias in the fp32 sum: each path equals the fp32 result rounded once, so a bias that
    nearly cancels the convolution costs no more than one rounding of the output (the implicit GEMM's epilogue,
    the planned CPU path and gather-GEMM-scatter alike)."""
    g = _gen()
    x, w, pm = _problem(dtype, g, 61, 45, 9, 12, 10)
    in_idx, out_idx, counts = sg.pairs_from_map(pm)
    conv = sg.implicit_gemm_ref(x.float(), w.float(), pm)
    bias = (-conv[0] + 1e-3 * torch.randn(conv.shape[1], device=DEVICE, generator=g)).to(dtype)  # row 0 ~ 0
    want = (conv + bias.float()).to(dtype).float()
    plan = sg.build_plan(out_idx, in_idx, counts, pm.shape[0])
    got = {"gather": sg.gather_gemm_scatter(x, w, in_idx, out_idx, counts, pm.shape[0], bias=bias),
           "implicit": sg.implicit_gemm(x, w, pm, bias=bias), "implicit_ref": sg.implicit_gemm_ref(x, w, pm, bias)}
    if DEVICE.type == "cpu":
        got["planned"] = sg.planned_conv(x, w, plan, bias)
    ulp = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    for name, y in got.items():
        assert y.dtype == dtype, name
        # one rounding of the result plus the fp32 summation order; rounding the convolution before adding the
        # bias would cost ulp * |conv| on row 0, far above this
        excess = (y.float() - want).abs() - ulp * want.abs() - 1e-5 * conv.abs().max()
        assert excess.max().item() <= 0, (name, excess.max().item())
    with pytest.raises(ValueError, match="bias has 3 values but weight has 10 output channels"):
        sg.implicit_gemm(x, w, pm, bias=torch.zeros(3, device=DEVICE, dtype=dtype))


def test_sparse_gemm_rejects_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="input channels"):
        sg.implicit_gemm(x, torch.randn(2, 5, 4), torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="pair_map must have dtype"):
        sg.implicit_gemm(x, torch.randn(2, 3, 4), torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="offsets"):
        sg.implicit_gemm(x, torch.randn(2, 3, 4), torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight must have dtype"):
        sg.gather_gemm_scatter(x, torch.randn(2, 3, 4).half(), torch.zeros(0, dtype=torch.long),
                               torch.zeros(0, dtype=torch.long), [0, 0], 4)


def _pairs(pm, identity=-1, shuffle_g=None):
    """Pair lists (sorted by offset) of a pair map; ``identity`` fills that offset with (r, r) for every row;
    ``shuffle_g`` shuffles the pairs within each offset (rulebooks of unsorted coordinates)."""
    if identity >= 0:
        pm = pm.clone()
        pm[:, identity] = torch.arange(pm.shape[0], dtype=torch.int32)
    in_idx, out_idx, counts = sg.pairs_from_map(pm)
    if shuffle_g is not None:
        start = 0
        for c in counts:
            p = torch.randperm(c, generator=shuffle_g) + start
            in_idx[start:start + c], out_idx[start:start + c] = in_idx[p].clone(), out_idx[p].clone()
            start += c
    return in_idx, out_idx, counts


@pytest.mark.parametrize("dtype,threads", [(torch.float32, 1), (torch.float32, 2), (torch.float16, 1),
                                           (torch.bfloat16, 2)])
@pytest.mark.parametrize("block_pairs", [64, 1 << 20])
@pytest.mark.parametrize("layout", ["sorted", "shuffled", "identity", "identity-shuffled"])
def test_planned_conv_fwd_bwd_match_gather_scatter_reference(dtype, threads, block_pairs, layout):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    ident = 13 if layout.startswith("identity") else -1
    n = 157 if ident >= 0 else None
    x = torch.randn(n or 173, 13 + 2, dtype=dtype, generator=g)[:, 1:14]  # strided view
    w = (torch.randn(11, 27, 13, dtype=dtype, generator=g) / 8).permute(1, 2, 0)  # KRSC view [K, Cin, Cout]
    pm = sg._random_rulebook(x.shape[0], n or 141, 27, "cpu", g)
    pm[:7] = -1  # destination rows without any pair
    in_idx, out_idx, counts = _pairs(pm, identity=ident, shuffle_g=g if "shuffled" in layout else None)
    n_out = pm.shape[0]
    dy = torch.randn(n_out, 11, dtype=dtype, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plan = sg.build_plan(out_idx, in_idx, counts, n_out, ident, block_pairs)
        plan_t = sg.build_plan(in_idx, out_idx, counts, x.shape[0], ident, block_pairs)
        assert len(plan.blocks) > 1 if block_pairs == 64 else len(plan.blocks) == 1
        y = sg.planned_conv(x, w, plan)
        dx, dw = sg.planned_conv_backward(x, w, dy, plan_t)
        y2 = sg.planned_conv(x, w, plan)
        dx2, dw2 = sg.planned_conv_backward(x, w, dy, plan_t)
    finally:
        torch.set_num_threads(before)
    ref = sg.gather_gemm_scatter(x.float(), w.float(), in_idx, out_idx, counts, n_out)
    dx_ref = sg.gather_gemm_scatter(dy.float(), w.float().transpose(1, 2), out_idx, in_idx, counts, x.shape[0])
    dw_ref = sg.weight_grad_ref(x.float(), dy.float(), in_idx, out_idx, counts)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert rel_err(y, ref) <= RTOL[dtype] and rel_err(dx, dx_ref) <= RTOL[dtype] and rel_err(dw, dw_ref) <= RTOL[dtype]
    if ident < 0:
        assert torch.all(y[:7] == 0), "rows without pairs are exactly zero"
    assert torch.equal(y, y2) and torch.equal(dx, dx2) and torch.equal(dw, dw2), "bit-reproducible"


def test_planned_conv_results_do_not_alias_the_reused_workspace():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(90, 8, generator=g)
    w = torch.randn(27, 8, 5, generator=g)
    pm = sg._random_rulebook(90, 90, 27, "cpu", g)
    in_idx, out_idx, counts = _pairs(pm, identity=13)
    for block_pairs in (50, 1 << 20):
        plan = sg.build_plan(out_idx, in_idx, counts, 90, 13, block_pairs)
        y = sg.planned_conv(x, w, plan)
        kept = y.clone()
        dx, dw = sg.planned_conv_backward(x, w.transpose(1, 2).contiguous().transpose(1, 2), y, plan)
        kept_dx = dx.clone()
        sg.planned_conv(torch.randn(90, 8, generator=g), w, plan)  # reuses the buffers
        sg.planned_conv_backward(x, w, torch.randn(90, 5, generator=g), plan)
        assert torch.equal(y, kept) and torch.equal(dx, kept_dx)


def test_planned_conv_needs_only_what_is_asked_and_handles_empty_rulebooks():
    x = torch.randn(6, 3)
    w = torch.randn(4, 3, 2)
    empty = torch.zeros(0, dtype=torch.long)
    plan = sg.build_plan(empty, empty, [0, 0, 0, 0], 5)
    assert torch.equal(sg.planned_conv(x, w, plan), torch.zeros(5, 2))
    plan_t = sg.build_plan(empty, empty, [0, 0, 0, 0], 6)
    dx, dw = sg.planned_conv_backward(x, w, torch.randn(5, 2), plan_t, need_dx=False)
    assert dx is None and torch.equal(dw, torch.zeros(4, 3, 2))
    dx, dw = sg.planned_conv_backward(x, w, torch.randn(5, 2), plan_t, need_dw=False)
    assert dw is None and torch.equal(dx, torch.zeros(6, 3))
    with pytest.raises(ValueError, match="offsets"):
        sg.planned_conv(x, torch.randn(3, 3, 2), plan)


@pytest.mark.parametrize("mode,fp32,fp16", [("auto", True, False), ("map", False, False), ("lists", True, True)])
def test_weight_gradient_pair_source_follows_the_mode(monkeypatch, mode, fp32, fp16):
    monkeypatch.setattr(sg, "WGRAD_MODE", mode)
    assert sg.wgrad_from_lists(torch.float32) is fp32 and sg.wgrad_from_lists(torch.float16) is fp16
    big, small = sg.LISTS_MIN_ROWS, sg.LISTS_MIN_ROWS - 1
    assert sg.wgrad_from_lists(torch.float32, big) is fp32 and sg.wgrad_from_lists(torch.float16, big) is fp16
    # auto leaves small rulebooks on the map (the compaction's launches cost more host time than they save)
    assert sg.wgrad_from_lists(torch.float32, small) is (mode == "lists")


def test_unknown_weight_gradient_mode_is_refused_at_import():
    import os
    import subprocess
    import sys
    env = dict(os.environ, KILN_SPARSE_WGRAD="dense")
    r = subprocess.run([sys.executable, "-c", "import kiln.ops.sparse_gemm"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "KILN_SPARSE_WGRAD must be one of" in r.stderr
