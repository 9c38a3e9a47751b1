"""Weight-only quantized linears (kiln.quant.llm): parity with their dequantized reference, quantization error
bounds, state_dict round trips and clear errors for bad modes, group sizes and dimensions."""

import pytest
import torch
from torch import nn

from kiln.ops.wo_gemm import unpack_int4
from kiln.quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_weight_only_
from kiln.quant.llm import check_weight_only_args, quantize_int4_weight, quantize_int8_weight

from .conftest import fresh_gen, make_linear


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_weight_only_linear_matches_dequantized_reference(dtype, tol, bias):
    g = fresh_gen()
    lin = make_linear(96, 37, bias, g, dtype)
    q = Int8WeightOnlyLinear.from_float(lin)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (37,) and q.scale.dtype == torch.float32
    x = torch.randn(5, 96, generator=g).to(dtype)
    ref = nn.functional.linear(x.float(), q.dequantized_weight(), None if not bias else lin.bias.float())
    assert rel_err(q(x), ref) <= tol
    assert q(x).dtype == dtype
    # symmetric per channel: the rounding error is at most half a step of that channel's scale
    err = (q.dequantized_weight() - lin.weight.float()).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-7).all()
    assert (q.qweight.abs() <= 127).all() and (q.qweight.abs().amax(dim=1) == 127).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_weight_only_linear_matches_dequantized_reference(group_size, bias):
    g = fresh_gen()
    K, N = 256, 45
    lin = make_linear(K, N, bias, g)
    q = Int4WeightOnlyLinear.from_float(lin, group_size)
    assert q.qweight.shape == (N, K // 2) and q.qweight.dtype == torch.uint8
    assert q.scales.shape == (N, K // group_size) and q.zeros.shape == (N, K // group_size)
    x = torch.randn(3, 7, K, generator=g)
    ref = nn.functional.linear(x, q.dequantized_weight(), None if not bias else lin.bias)
    assert rel_err(q(x), ref) <= 1e-5
    # asymmetric per group: every weight within half a step of its group's scale, codes and zeros in [0, 15]
    step = q.scales.repeat_interleave(group_size, dim=1)
    assert ((q.dequantized_weight() - lin.weight).abs() <= step / 2 + 1e-6).all()
    assert int(unpack_int4(q.qweight).max()) <= 15 and int(q.zeros.max()) <= 15


def test_int4_quantization_is_exact_for_weights_on_the_grid():
    codes = torch.randint(0, 16, (8, 64), generator=fresh_gen()).float()
    codes[:, ::32] = 0
    codes[:, 1::32] = 15  # every group spans the full code range, with zero at code 3
    w = (codes - 3) * 0.25
    packed, scales, zeros = quantize_int4_weight(w, 32)
    assert torch.allclose(scales, torch.full_like(scales, 0.25))
    assert torch.equal(zeros, torch.full_like(zeros, 3))
    assert torch.equal(unpack_int4(packed).float(), codes)


def test_quantized_linears_round_trip_through_state_dict():
    g = fresh_gen()
    for make in (lambda lin: Int8WeightOnlyLinear.from_float(lin),
                 lambda lin: Int4WeightOnlyLinear.from_float(lin, 64)):
        src = make(make_linear(128, 24, True, g))
        sd = src.state_dict()
        assert set(sd) >= {"qweight", "bias"}
        empty = make(make_linear(128, 24, True, g))
        empty.load_state_dict(sd)
        x = torch.randn(4, 128, generator=g)
        assert torch.equal(empty(x), src(x))
        for k, v in sd.items():
            assert torch.equal(empty.state_dict()[k], v)


def test_int4_row_interleave_keeps_outputs_and_the_files_layout():
    """``interleave_rows_`` (what the engine does on a GPU) stores the same bytes as row-interleaved words: the
    forward is unchanged, ``state_dict`` still holds the usual packing (engine files do not depend on it), loading
    one into an interleaved module interleaves it again, and a weight whose rows do not pair into quads stays."""
    from kiln.quant.llm import interleave_int4_rows_

    g = fresh_gen()
    lin = make_linear(128, 24, True, g)
    q = Int4WeightOnlyLinear.from_float(lin, 64)
    x = torch.randn(3, 128, generator=g)
    before, packed = q(x), q.qweight.clone()
    model = nn.Sequential(q, Int4WeightOnlyLinear.from_float(make_linear(128, 20, False, g), 64))
    assert interleave_int4_rows_(model) == 1  # 20 rows are not a multiple of 2 x 4
    assert q.row_interleave == 4 and q.qweight.shape == (6, 16, 4) and model[1].row_interleave == 0
    assert "row_interleave=4" in repr(q)
    assert rel_err(q(x), before) <= 1e-6
    sd = q.state_dict()
    assert torch.equal(sd["qweight"], packed)
    other = Int4WeightOnlyLinear.from_float(make_linear(128, 24, True, g), 64)
    other.interleave_rows_()
    other.load_state_dict(sd)
    assert other.row_interleave == 4 and torch.equal(other.state_dict()["qweight"], packed)
    assert torch.equal(other(x), q(x))
    assert not q.interleave_rows_()  # already interleaved


def test_quantize_weight_only_swaps_linears_but_not_the_lm_head():
    g = fresh_gen()
    model = nn.ModuleDict({"mlp": nn.Sequential(make_linear(64, 96, False, g), nn.ReLU(), make_linear(96, 64, True, g)),
                           "lm_head": make_linear(64, 10, False, g)})
    quantize_weight_only_(model, "int4-wo", 32)
    assert isinstance(model["mlp"][0], Int4WeightOnlyLinear) and isinstance(model["mlp"][2], Int4WeightOnlyLinear)
    assert type(model["lm_head"]) is nn.Linear
    model2 = nn.Sequential(make_linear(64, 8, False, g))
    quantize_weight_only_(model2, "int8-wo")
    assert isinstance(model2[0], Int8WeightOnlyLinear)


def test_weight_only_bad_input_is_named():
    g = fresh_gen()
    with pytest.raises(ValueError, match="unknown quantization mode 'int3-wo'"):
        check_weight_only_args("int3-wo")
    with pytest.raises(ValueError, match="unsupported group size 48"):
        check_weight_only_args("int4-wo", 48)
    with pytest.raises(ValueError, match="group_size applies to int4-wo only"):
        check_weight_only_args("int8-wo", 64)
    assert check_weight_only_args("int4-wo") == 128
    model = nn.Sequential(make_linear(64, 96, False, g), make_linear(96, 64, False, g))
    with pytest.raises(ValueError, match=r"group size 64 does not divide .*1 \(in_features=96\)"):
        quantize_weight_only_(model, "int4-wo", 64)
    assert all(type(m) is nn.Linear for m in model)  # nothing swapped when any layer fails the check
    with pytest.raises(ValueError, match="not divisible by group_size"):
        Int4WeightOnlyLinear(96, 8, group_size=64)
    with pytest.raises(ValueError, match="found none to quantize"):
        quantize_weight_only_(nn.Sequential(nn.ReLU()), "int8-wo")
    q, s = quantize_int8_weight(torch.zeros(3, 5))  # an all-zero channel quantizes to zeros, no division by 0
    assert torch.equal(q, torch.zeros(3, 5, dtype=torch.int8)) and torch.isfinite(s).all()


def test_fold_norm_gains_moves_the_gain_into_the_linears_columns():
    """``fold_norm_gains_``: the norm's gain goes into every linear it feeds, the norm keeps a gain of exactly 1,
    and norm -> linear computes the same function; a linear of another width is a clear error."""
    from kiln.ops.norm import rms_norm_ref
    from kiln.quant.llm import fold_norm_gains_

    torch.manual_seed(0)
    g = torch.rand(24) + 0.5
    lins = [nn.Linear(24, 16), nn.Linear(24, 8, bias=False)]
    x = torch.randn(5, 24)
    before = [lin(rms_norm_ref(x, g, 1e-6)) for lin in lins]
    gain = g.clone()
    fold_norm_gains_(gain, lins)
    assert torch.equal(gain, torch.ones(24))
    for lin, want in zip(lins, before):
        torch.testing.assert_close(lin(rms_norm_ref(x, gain, 1e-6)), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="in_features=12"):
        fold_norm_gains_(torch.rand(24), [nn.Linear(12, 4)])


def test_folded_decode_layer_takes_weight_only_linears_and_int4_up_to_its_width():
    """The norm-free decode layer: int8-wo linears at any width, int4-wo up to ``MAX_INT4_FOLDED_HIDDEN`` (where it
    was measured to pay), never a float linear."""
    from kiln.quant.llm import MAX_INT4_FOLDED_HIDDEN, takes_folded_decode_layer

    def layer(cls, hidden, **kw):
        return [cls(i, o, **kw) for i, o in ((hidden, 3 * hidden), (hidden, hidden), (hidden, 8 * hidden),
                                             (4 * hidden, hidden))]

    assert takes_folded_decode_layer(*layer(Int8WeightOnlyLinear, 2 * MAX_INT4_FOLDED_HIDDEN, device="meta"))
    assert takes_folded_decode_layer(*layer(Int4WeightOnlyLinear, MAX_INT4_FOLDED_HIDDEN, device="meta"))
    assert not takes_folded_decode_layer(*layer(Int4WeightOnlyLinear, 2 * MAX_INT4_FOLDED_HIDDEN, device="meta"))
    mixed = layer(Int8WeightOnlyLinear, 256, device="meta")
    mixed[1] = nn.Linear(256, 256, device="meta")
    assert not takes_folded_decode_layer(*mixed)
