"""Calibrators: max (per tensor / per channel) and the histogram's entropy / percentile / mse / max."""

from collections import Counter

import numpy as np
import pytest
import torch

from kiln.quant.calib import HistogramCalibrator, MaxCalibrator, make_calibrator


def test_max_calibrator_running_max_per_tensor_and_per_channel():
    c = MaxCalibrator()
    c.collect(torch.tensor([1.0, -3.0]))
    c.collect(torch.tensor([2.0, 0.5]))
    assert c.compute_amax().item() == 3.0
    pc = MaxCalibrator(axis=1)
    pc.collect(torch.tensor([[1.0, -5.0, 0.0], [2.0, 1.0, 0.0]]))
    pc.collect(torch.tensor([[0.0, 0.0, -7.0]]))
    assert torch.equal(pc.compute_amax(), torch.tensor([2.0, 5.0, 7.0]))
    with pytest.raises(ValueError, match="axis"):
        MaxCalibrator(axis=4).collect(torch.zeros(2, 2))


def test_histogram_grows_at_the_same_width_and_keeps_exact_max():
    c = HistogramCalibrator(num_bins=100)
    c.collect(torch.linspace(0, 1, 1000))
    c.collect(torch.tensor([2.5]))
    assert c._hist.numel() == 250 and c._hist.sum().item() == 1001
    assert c.compute_amax("max").item() == 2.5


def test_percentile_matches_the_empirical_quantile():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    c = HistogramCalibrator()
    c.collect(x)
    amax = c.compute_amax("percentile", percentile=99.0).item()
    assert amax == pytest.approx(torch.quantile(x.abs()[:100_000], 0.99).item(), rel=0.02)
    with pytest.raises(ValueError, match="percentile"):
        c.compute_amax("percentile", percentile=0)


def test_entropy_clips_a_lone_outlier_but_not_a_uniform_range():
    torch.manual_seed(1)
    c = HistogramCalibrator()
    c.collect(torch.cat([torch.randn(100_000), torch.tensor([60.0])]))  # one huge outlier
    assert c.compute_amax("entropy").item() < 10.0
    u = HistogramCalibrator()
    u.collect(torch.rand(100_000) * 2 - 1)
    assert u.compute_amax("entropy").item() > 0.9
    assert u.compute_amax("mse").item() > 0.95


def test_mse_amax_minimises_the_measured_quantization_error():
    from kiln.quant.tensor_quant import fake_quant

    torch.manual_seed(5)
    x = torch.distributions.StudentT(3.0).sample((200_000,))  # heavy tails: clipping pays off
    c = HistogramCalibrator()
    c.collect(x)
    amax_mse = c.compute_amax("mse").item()

    def mse(a):
        return (fake_quant(x, a) - x).pow(2).mean().item()

    assert amax_mse < c.compute_amax("max").item()
    for other in (c.compute_amax("max").item(), 0.5 * amax_mse, 2.0 * amax_mse):
        assert mse(amax_mse) <= mse(other) * 1.02, other


def _entropy_reference(bins, edges, nbins=128, start_bin=128, stride=1):
    """TensorRT's KL threshold search, written the slow, obvious way (as pytorch-quantization documents it)."""
    divergences, args = [], []
    for i in range(start_bin, len(bins) + 1, stride):
        space = np.linspace(0, i, num=nbins + 1)
        dig = np.digitize(range(i), space) - 1
        dig[bins[:i] == 0] = -1
        counts = np.zeros(nbins)
        for idx, d in enumerate(dig):
            if d != -1:
                counts[d] += bins[idx]
        for key, val in Counter(dig).items():
            if key != -1:
                counts[key] /= val
        q = np.array([counts[d] if d != -1 else 0.0 for d in dig])
        p = np.array(bins[:i], dtype=np.float64)
        p[-1] += bins[i:].sum()
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        divergences.append(np.inf if np.any(q[m] == 0) else np.sum(p[m] * np.log(p[m] / q[m])))
        args.append(i)
    return edges[args[int(np.argmin(divergences))]]


@pytest.mark.parametrize("dist", ["gauss", "relu_sq"])
def test_entropy_matches_the_reference_algorithm(dist):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50_000, generator=g)
    x = x if dist == "gauss" else torch.relu(x) ** 2
    c = HistogramCalibrator(num_bins=512)
    c.collect(x)
    h = c._hist.numpy()
    edges = np.arange(h.size + 1) * c._width
    ref = min(_entropy_reference(h, edges, stride=4), c._max)
    assert c.compute_amax("entropy", stride=4).item() == pytest.approx(ref, rel=1e-6)


def test_calibrators_reject_nan_and_inf_naming_the_layer():
    for c in (MaxCalibrator(name="conv7.input_quantizer"), HistogramCalibrator(name="conv7.input_quantizer")):
        with pytest.raises(ValueError, match="NaN.*conv7.input_quantizer"):
            c.collect(torch.tensor([1.0, float("nan")]))
        with pytest.raises(ValueError, match="Inf.*conv7.input_quantizer"):
            c.collect(torch.tensor([1.0, float("inf")]))


def test_bad_calibrator_arguments():
    with pytest.raises(ValueError, match="per-tensor"):
        make_calibrator("histogram", axis=0)
    with pytest.raises(ValueError, match="unknown calibrator"):
        make_calibrator("kl")
    with pytest.raises(ValueError, match="unknown calibration method"):
        HistogramCalibrator().compute_amax("kl")
    with pytest.raises(ValueError, match="only 'max'"):
        MaxCalibrator().compute_amax("entropy")
