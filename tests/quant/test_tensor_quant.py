"""tensor_quant: symmetric / asymmetric quantize, dequantize and fake-quantize, per tensor and per channel."""

import pytest
import torch

from kiln.quant import tensor_quant as tq


def test_symmetric_per_tensor_round_trip_error_is_at_most_half_a_step():
    x = torch.randn(1000) * 3
    amax = x.abs().max()
    q, scale = tq.quantize(x, amax)
    assert q.dtype == torch.int8 and q.min() >= -127 and q.max() <= 127
    torch.testing.assert_close(scale, amax / 127)
    err = (tq.dequantize(q, scale) - x).abs().max()
    assert err <= scale / 2 + 1e-6
    torch.testing.assert_close(tq.fake_quant(x, amax), tq.dequantize(q, scale))


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_per_channel_on_any_axis(axis):
    x = torch.randn(4, 5, 6)
    amax = tq.reduce_amax(x, axis)
    assert amax.shape == (x.shape[axis],)
    q, scale = tq.quantize(x, amax, axis=axis)
    y = tq.dequantize(q, scale, axis=axis)
    shape = [1, 1, 1]
    shape[axis] = -1
    assert ((y - x).abs() <= scale.reshape(shape) / 2 + 1e-6).all()
    # each slice's largest magnitude maps to exactly +-127
    assert torch.equal(tq.reduce_amax(q.float(), axis), torch.full((x.shape[axis],), 127.0))
    torch.testing.assert_close(tq.fake_quant(x, amax, axis=axis), y)


@pytest.mark.parametrize("axis", [3, -4, 10])
def test_axis_outside_the_tensor_is_a_value_error(axis):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="axis"):
        tq.quantize(x, torch.ones(3), axis=axis)
    with pytest.raises(ValueError, match="axis"):
        tq.fake_quant(x, torch.ones(3), axis=axis)
    with pytest.raises(ValueError, match="axis"):
        tq.reduce_amax(x, axis)


def test_per_channel_amax_of_the_wrong_length_is_rejected():
    with pytest.raises(ValueError, match="per-channel amax has 5 values"):
        tq.fake_quant(torch.randn(3, 4), torch.ones(5), axis=0)


def test_zero_amax_is_guarded():
    x = torch.zeros(3, 8)
    x[1] = torch.randn(8)
    amax = tq.reduce_amax(x, 0)  # rows 0 and 2 are all zero
    y = tq.fake_quant(x, amax, axis=0)
    assert torch.isfinite(y).all()
    assert torch.equal(y[0], torch.zeros(8)) and torch.equal(y[2], torch.zeros(8))
    q, scale = tq.quantize(x, amax, axis=0)
    assert torch.isfinite(scale).all() and torch.equal(q[0], torch.zeros(8, dtype=torch.int8))
    assert torch.equal(tq.fake_quant(torch.randn(5), 0.0), torch.zeros(5))


def test_ste_gradient_is_masked_to_the_clipping_range():
    x = torch.tensor([-3.0, -0.5, 0.2, 0.9, 2.5], requires_grad=True)
    y = tq.fake_quant(x, 1.0)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_learned_amax_receives_the_clipped_gradient():
    x = torch.tensor([-3.0, -0.5, 0.2, 2.5, 4.0])
    amax = torch.tensor(1.0, requires_grad=True)
    tq.fake_quant(x, amax).sum().backward()
    # +1 for each value clipped at +amax, -1 for each clipped at -amax
    assert amax.grad.item() == pytest.approx(1.0)


def test_fake_quant_keeps_dtype_and_bad_amax_is_rejected():
    x = torch.randn(10, dtype=torch.float16)
    assert tq.fake_quant(x, 2.0).dtype == torch.float16
    with pytest.raises(ValueError, match="amax"):
        tq.fake_quant(x, float("nan"))
    with pytest.raises(ValueError, match="num_bits"):
        tq.quantize(x.float(), 1.0, num_bits=9)


def test_asymmetric_quantization_has_an_exact_zero_and_round_trips():
    x = torch.rand(500) * 5 - 1  # [-1, 4]
    q, scale, zp = tq.quantize_asym(x, x.min(), x.max())
    assert q.dtype == torch.uint8
    assert 0 <= zp.item() <= 255
    y = tq.dequantize(q, scale, zero_point=zp)
    assert (y - x).abs().max() <= scale / 2 + 1e-5
    torch.testing.assert_close(tq.fake_quant_asym(x, x.min(), x.max()), y)
    z, _, _ = tq.quantize_asym(torch.zeros(1), x.min(), x.max())
    assert tq.dequantize(z, scale, zero_point=zp).item() == 0.0


def test_asymmetric_per_channel_and_ste():
    x = torch.randn(3, 7)
    amin, amax = x.amin(1), x.amax(1)
    q, scale, zp = tq.quantize_asym(x, amin, amax, axis=0)
    y = tq.dequantize(q, scale, axis=0, zero_point=zp)
    assert ((y - x).abs() <= scale[:, None] / 2 + 1e-5).all()
    xg = torch.tensor([-2.0, 0.0, 0.5, 3.0], requires_grad=True)
    tq.fake_quant_asym(xg, -1.0, 1.0).sum().backward()
    assert torch.equal(xg.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))
