"""Calibrators: pick the clipping range ``amax`` of a tensor from the values seen during calibration.

Vocabulary as in NVIDIA's pytorch-quantization: ``MaxCalibrator`` keeps the running max |x| (per tensor or per
channel); ``HistogramCalibrator`` keeps a histogram of |x| (2048 bins by default, grown at the same bin width when
a later batch exceeds the range) and computes amax by

- ``"entropy"``: TensorRT's KL-divergence search over clipping thresholds,
- ``"percentile"``: the given percentile of |x| (99.99 by default),
- ``"mse"``: the threshold minimising the expected squared quantization error,
- ``"max"``: the exact max seen (kept alongside the histogram).

Every ``collect`` rejects NaN/Inf with a ValueError naming the calibrator (the quantizer passes its layer name).
"""

from __future__ import annotations

import numpy as np
import torch

from .tensor_quant import check_axis, qrange, reduce_amax

METHODS = ("max", "entropy", "percentile", "mse")


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        bad = "NaN" if torch.isnan(x).any() else "Inf"
        raise ValueError(f"{bad} in calibration data reaching {name or 'a quantizer'}")


class MaxCalibrator:
    """Running max of |x|, over the whole tensor (axis None) or per slice along ``axis``."""

    def __init__(self, axis: int | None = None, name: str = ""):
        self.axis = axis
        self.name = name
        self._amax: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        _check_finite(x, self.name)
        axis = check_axis(self.axis, x.dim(), self.name or "x")
        amax = reduce_amax(x.float(), axis)
        self._amax = amax if self._amax is None else torch.maximum(self._amax, amax)

    def compute_amax(self, method: str = "max", **_kw) -> torch.Tensor | None:
        if method != "max":
            raise ValueError(f"MaxCalibrator computes only 'max', got method {method!r}")
        return None if self._amax is None else self._amax.clone()

    def reset(self) -> None:
        self._amax = None


class HistogramCalibrator:
    """Histogram of |x| (per tensor) with entropy / percentile / mse / max amax selection."""

    def __init__(self, num_bins: int = 2048, name: str = "", num_bits: int = 8, unsigned: bool = False):
        if not isinstance(num_bins, int) or num_bins < 16:
            raise ValueError(f"num_bins must be an int >= 16, got {num_bins!r}")
        self.num_bins = num_bins
        self.name = name
        self.num_bits = num_bits
        self.unsigned = unsigned
        self.reset()

    def reset(self) -> None:
        self._hist: torch.Tensor | None = None  # float64 counts
        self._width = 0.0
        self._max = 0.0

    def collect(self, x: torch.Tensor) -> None:
        _check_finite(x, self.name)
        a = x.detach().abs().flatten().double()
        if not a.numel():
            return
        xmax = a.max().item()
        self._max = max(self._max, xmax)
        if self._hist is None:
            self._width = (xmax if xmax > 0 else 1.0) / self.num_bins
            self._hist = torch.zeros(self.num_bins, dtype=torch.float64, device=a.device)
        nbins = self._hist.numel()
        if xmax > nbins * self._width:  # grow at the same width so old counts stay exact
            grow = int(np.ceil(xmax / self._width)) - nbins
            self._hist = torch.cat([self._hist, self._hist.new_zeros(grow)])
            nbins += grow
        idx = torch.clamp((a / self._width).long(), 0, nbins - 1)
        self._hist += torch.bincount(idx, minlength=nbins).to(self._hist)

    # --------------------------------------------------------------------------------------- amax selection
    def compute_amax(self, method: str = "entropy", percentile: float = 99.99, start_bin: int = 128,
                     stride: int = 1) -> torch.Tensor | None:
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
        if self._hist is None:
            return None
        if method == "max":
            return torch.tensor(self._max, dtype=torch.float32)
        hist = self._hist.cpu().numpy()
        edges = np.arange(hist.size + 1) * self._width
        if hist.sum() == 0 or self._max == 0:
            return torch.tensor(0.0)
        if method == "percentile":
            if not 0 < percentile <= 100:
                raise ValueError(f"percentile must be in (0, 100], got {percentile}")
            cdf = np.cumsum(hist) / hist.sum()
            i = int(np.searchsorted(cdf, percentile / 100.0))
            amax = edges[min(i + 1, hist.size)]
        elif method == "mse":
            amax = self._mse_amax(hist, edges, start_bin, stride)
        else:
            amax = self._entropy_amax(hist, edges, start_bin, stride)
        return torch.tensor(min(float(amax), self._max), dtype=torch.float32)

    def _levels(self) -> int:
        # number of positive quantization levels of |x|: 127 for narrow int8 (128 bins as TensorRT), 255 unsigned
        _, hi = qrange(self.num_bits, unsigned=self.unsigned)
        return hi + 1 if not self.unsigned else hi

    def _mse_amax(self, hist, edges, start_bin, stride):
        centers = torch.from_numpy((edges[:-1] + edges[1:]) / 2)
        counts = torch.from_numpy(hist)
        nz = counts > 0
        centers, counts = centers[nz], counts[nz]
        _, qmax = qrange(self.num_bits, unsigned=self.unsigned)
        cands = torch.from_numpy(edges[min(start_bin, hist.size - 1) + 1::stride])
        best, best_err = float(edges[-1]), float("inf")
        for chunk in torch.split(cands, 256):
            s = (chunk / qmax)[:, None]
            q = torch.clamp(torch.round(centers[None, :] / s), 0, qmax) * s
            err = ((q - centers[None, :]) ** 2 * counts[None, :]).sum(1)
            j = int(torch.argmin(err))
            if err[j].item() < best_err:
                best_err, best = err[j].item(), float(chunk[j])
        return best

    def _entropy_amax(self, hist, edges, start_bin, stride):
        """TensorRT's calibration: the threshold whose 128-level quantized distribution has the least KL."""
        nlev = self._levels()
        n = hist.size
        start = max(min(start_bin, n), nlev)
        best_i, best_kl = n, float("inf")
        for i in range(start, n + 1, stride):
            p = hist[:i].copy()
            p[i - 1] += hist[i:].sum()  # outliers clipped into the last bin
            nonzero = hist[:i] != 0
            # merge i bins into nlev levels, spread each level's mass uniformly over its non-empty bins
            bounds = np.ceil(np.linspace(0, i, nlev + 1)).astype(np.int64)
            idx = np.repeat(np.arange(nlev), np.diff(bounds))
            lvl_sum = np.bincount(idx, weights=hist[:i], minlength=nlev)
            lvl_cnt = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=nlev)
            q = np.where(nonzero, lvl_sum[idx] / np.maximum(lvl_cnt[idx], 1), 0.0)
            ps, qs = p.sum(), q.sum()
            if qs == 0:
                continue
            pn, qn = p / ps, q / qs
            m = pn > 0
            if np.any(m & (qn == 0)):
                kl = float("inf")
            else:
                kl = float(np.sum(pn[m] * np.log(pn[m] / qn[m])))
            if kl < best_kl:
                best_kl, best_i = kl, i
        return edges[best_i]


def make_calibrator(kind: str, axis: int | None = None, name: str = "", num_bins: int = 2048,
                    num_bits: int = 8, unsigned: bool = False):
    """'max' -> MaxCalibrator; 'histogram' -> HistogramCalibrator (per-tensor only)."""
    if kind == "max":
        return MaxCalibrator(axis=axis, name=name)
    if kind == "histogram":
        if axis is not None:
            raise ValueError(f"histogram calibration is per-tensor; {name or 'quantizer'} has axis={axis}")
        return HistogramCalibrator(num_bins=num_bins, name=name, num_bits=num_bits, unsigned=unsigned)
    raise ValueError(f"unknown calibrator {kind!r}; choose 'max' or 'histogram'")
