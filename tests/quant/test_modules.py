"""Quant* modules and their real INT8 twins: quantizer buffers, switches, state_dict, INT8 vs fake-quant parity."""

import pytest
import torch
import torch.nn as nn

from kiln.quant import (Int8Config, QuantConv2d, QuantLinear, calibrate, convert, quantize_)
from kiln.quant.int8 import im2col
from kiln.quant.nn import quantizers


def _calibrated(model, x, method="max"):
    quantize_(model, Int8Config())
    calibrate(model, [x], method=method)
    return model


def _step_close(int8_out, fq_out, model_out_scale):
    """INT8 vs fake-quant: same math, float rounding apart; allow a few steps of the output's float error."""
    err = (int8_out - fq_out).abs().max().item()
    assert err <= 1e-4 * model_out_scale + 1e-5, err


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(33, 17), (5, 33)),
    (lambda: nn.Linear(8, 6, bias=False), (2, 3, 8)),
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    (lambda: nn.Conv2d(3, 8, 3, padding=1), (2, 3, 9, 7)),
    (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2), (2, 4, 10, 9)),
    (lambda: nn.Conv2d(3, 5, (3, 1), padding="same", padding_mode="reflect"), (1, 3, 6, 6)),
    (lambda: nn.Conv2d(3, 4, 2, padding=1, padding_mode="circular", bias=False), (2, 3, 5, 5)),
    (lambda: nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 2)), (1, 2, 5, 6, 6)),
    (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (2, 4, 5, 6)),
])
def test_int8_module_matches_fake_quant(make, shape):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    x = torch.randn(shape)
    _calibrated(model, x)
    with torch.no_grad():
        fq = model(x)
        i8 = convert(model)(x)
    assert type(convert(model)[0]).__name__.startswith("Int8")
    assert i8.shape == fq.shape and i8.dtype == fq.dtype
    _step_close(i8, fq, fq.abs().max().item())


def test_im2col_matches_unfold():
    x = torch.randn(2, 3, 9, 8)
    cols, out = im2col(x, (3, 2), (2, 1), (2, 3))
    ref = torch.nn.functional.unfold(x, (3, 2), dilation=(2, 3), stride=(2, 1))  # [N, C*k, L]
    assert out == (3, 5)
    torch.testing.assert_close(cols, ref.transpose(1, 2).reshape(-1, ref.shape[1]))
    qi = torch.randint(-127, 128, (2, 3, 9, 8), dtype=torch.int8)
    cols_i, _ = im2col(qi, (3, 2), (2, 1), (2, 3))
    torch.testing.assert_close(cols_i.float(), im2col(qi.float(), (3, 2), (2, 1), (2, 3))[0])


def test_quantizer_amax_are_buffers_that_round_trip_through_state_dict():
    torch.manual_seed(0)
    model = _calibrated(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)),
                        torch.randn(4, 3, 8, 8))
    sd = model.state_dict()
    assert "0.input_quantizer.amax" in sd and sd["0.weight_quantizer.amax"].shape == (4,)
    assert "3.weight_quantizer.amax" in sd and sd["3.input_quantizer.amax"].shape == ()
    fresh = quantize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)))
    assert not fresh[0].input_quantizer.calibrated
    fresh.load_state_dict(sd)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), model(x))


def test_enable_disable_switches():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    model = _calibrated(nn.Sequential(lin), torch.randn(8, 16))
    x = torch.randn(3, 16)
    ref = nn.functional.linear(x, lin.weight, lin.bias)
    assert not torch.allclose(model(x), ref, atol=1e-6)  # fake quantization changes the output
    for _, q in quantizers(model):
        q.disable_quant()
    torch.testing.assert_close(model(x), ref)
    q_in = model[0].input_quantizer
    q_in.enable_calib("max")
    model(x * 100)
    q_in.disable_calib()
    q_in.load_calib_amax("max")
    assert q_in.amax.item() == pytest.approx((x * 100).abs().max().item())
    assert "quant" in repr(q_in) or "pass" in repr(q_in)


def test_quant_modules_built_directly_and_uncalibrated_input_is_an_error():
    ql = QuantLinear(8, 4)
    qc = QuantConv2d(2, 3, 3)
    assert ql.weight_quantizer.calibrated and qc.weight_quantizer.amax.shape == (3,)
    with pytest.raises(ValueError, match="amax is not set"):
        ql(torch.randn(2, 8))


def test_quantize_skip_list_and_nothing_to_quantize():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 36, 3))
    quantize_(model, Int8Config(skip=("3",)))
    assert isinstance(model[0], QuantConv2d) and type(model[3]) is nn.Linear
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="nothing to quantize.*skip"):
        quantize_(nn.Sequential(nn.Linear(2, 2)), skip=[nn.Linear])
    with pytest.raises(ValueError, match="no quantizers"):
        calibrate(nn.Sequential(nn.Linear(2, 2)), [torch.randn(1, 2)])


def test_nan_in_calibration_data_names_the_layer():
    model = quantize_(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN .*0.input_quantizer"):
        calibrate(model, [x])
    model2 = quantize_(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    with torch.no_grad():
        model2[0].weight.fill_(1e38)
    with pytest.raises(ValueError, match="Inf .*1.input_quantizer"):
        calibrate(model2, [torch.ones(2, 4) * 10], method="entropy")


def test_convert_rejects_asymmetric_activations_and_asym_fake_quant_runs():
    torch.manual_seed(0)
    model = quantize_(nn.Sequential(nn.Linear(6, 3)), Int8Config(activation_asymmetric=True))
    x = torch.rand(10, 6) * 3 + 1
    calibrate(model, [x])
    assert model[0].input_quantizer.amin.item() == pytest.approx(x.min().item())
    y = model(x)
    torch.testing.assert_close(y, nn.functional.linear(x, model[0].weight, model[0].bias), atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="symmetric"):
        convert(model)


def test_int8_linear_runs_through_the_triton_kernel_in_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from kiln.ops import gemm

    from tests.conftest import DEVICE

    torch.manual_seed(0)
    model = _calibrated(nn.Sequential(nn.Linear(40, 24)), torch.randn(16, 40))
    i8 = convert(model).to(DEVICE)
    x = torch.randn(5, 40, device=DEVICE)
    monkeypatch.setenv("KILN_OPS", "ref")
    ref = i8(x)
    calls = []
    orig = gemm._int8_gemm_triton
    monkeypatch.setattr(gemm, "_int8_gemm_triton", lambda *a: calls.append(1) or orig(*a))
    monkeypatch.setenv("KILN_OPS", "triton")
    torch.testing.assert_close(i8(x), ref, rtol=1e-6, atol=1e-6)
    assert calls
