"""Integer quantization of float tensors: symmetric (TensorRT-style) and asymmetric, per tensor or per channel.

Symmetric, narrow range (the default, what TensorRT consumes): ``scale = amax / 127``,
``q = clamp(round(x / scale), -127, 127)``, ``x ~ q * scale``; zero is exact and the range is symmetric.
Asymmetric (zero point): ``scale = (max - min) / 255``, ``zp = round(-min / scale)``,
``q = clamp(round(x / scale) + zp, 0, 255)`` (uint8 codes), ``x ~ (q - zp) * scale``.

Per-channel quantization gives ``amax`` one value per slice along ``axis`` (any axis of the tensor, negative
allowed); per-tensor uses a scalar. ``fake_quant`` rounds to the integer grid and back in float with a
straight-through estimator: the gradient flows to ``x`` unchanged where ``|x| <= amax`` and is zero where the
value was clipped; when ``amax`` requires grad it receives the clipped part's gradient (PACT), which is how
learned scales train in QAT. An ``amax`` at (or near) zero is guarded: its scale is 1 and the slice quantizes
to exact zeros instead of dividing by zero.
"""

from __future__ import annotations

import torch

AMAX_EPS = 2.0**-40  # below this an amax counts as zero (an all-zero channel)


def check_axis(axis: int | None, ndim: int, what: str = "x") -> int | None:
    """Normalise ``axis`` for a tensor of rank ``ndim``; ValueError when it is outside the tensor."""
    if axis is None:
        return None
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ValueError(f"axis must be an int or None, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for {what} with {ndim} dims (valid: {-ndim}..{ndim - 1})")
    return axis % ndim


def _check_bits(num_bits: int) -> None:
    if not isinstance(num_bits, int) or not 2 <= num_bits <= 8:
        raise ValueError(f"num_bits must be an int in [2, 8], got {num_bits!r}")


def qrange(num_bits: int = 8, narrow_range: bool = True, unsigned: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid: int8 narrow [-127, 127], full [-128, 127], unsigned [0, 255]."""
    _check_bits(num_bits)
    if unsigned:
        return 0, 2**num_bits - 1
    qmax = 2 ** (num_bits - 1) - 1
    return (-qmax if narrow_range else -qmax - 1), qmax


def reduce_amax(x: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """max |x| over everything (axis None, a 0-d tensor) or over all dims but ``axis`` (shape [x.shape[axis]])."""
    axis = check_axis(axis, x.dim())
    if axis is None:
        return x.detach().abs().amax() if x.numel() else torch.zeros((), device=x.device, dtype=x.dtype)
    dims = [d for d in range(x.dim()) if d != axis]
    return x.detach().abs().amax(dim=dims) if dims else x.detach().abs()


def _broadcast(v: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Shape a per-channel vector ``v`` so it broadcasts against ``x`` along ``axis``."""
    if v.dim() == 0 or axis is None:
        if v.numel() != 1:
            raise ValueError(f"per-tensor amax must have one element, got shape {tuple(v.shape)}")
        return v.reshape(())
    axis = check_axis(axis, x.dim())
    if v.numel() != x.shape[axis]:
        raise ValueError(f"per-channel amax has {v.numel()} values but x has {x.shape[axis]} along axis {axis}")
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


def _as_amax(amax, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(amax, torch.Tensor):
        amax = torch.tensor(float(amax))
    amax = amax.to(device=x.device)
    if not amax.is_floating_point():
        amax = amax.float()
    if torch.isnan(amax).any() or (amax < 0).any():
        raise ValueError("amax must be >= 0 and not NaN (was the quantizer calibrated?)")
    return amax


def scale_from_amax(amax: torch.Tensor, num_bits: int = 8, narrow_range: bool = True) -> torch.Tensor:
    """``amax / qmax``; an amax of ~0 gets scale 1 (its slice is all zeros) so nothing divides by zero."""
    _, qmax = qrange(num_bits, narrow_range)
    amax = amax.float()
    return torch.where(amax > AMAX_EPS, amax / qmax, torch.ones_like(amax))


def quantize(x: torch.Tensor, amax, axis: int | None = None, num_bits: int = 8,
             narrow_range: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization to int8 codes. Returns ``(q int8, scale fp32)``; scale is 0-d or [x.shape[axis]]."""
    axis = check_axis(axis, x.dim())
    amax = _as_amax(amax, x)
    qmin, qmax = qrange(num_bits, narrow_range)
    scale = scale_from_amax(amax, num_bits, narrow_range)
    s = _broadcast(scale, x, axis if amax.dim() else None)
    q = torch.clamp(torch.round(x.float() / s), qmin, qmax).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int | None = None, zero_point=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero_point) * scale`` in ``dtype``; per-channel scale/zero point broadcast along ``axis``."""
    axis = check_axis(axis, q.dim(), "q")
    scale = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))
    s = _broadcast(scale.to(q.device).float(), q, axis if scale.dim() else None)
    v = q.float()
    if zero_point is not None:
        zp = zero_point if isinstance(zero_point, torch.Tensor) else torch.tensor(zero_point)
        v = v - _broadcast(zp.to(q.device).float(), q, axis if zp.dim() else None)
    return (v * s).to(dtype)


def fake_quant(x: torch.Tensor, amax, axis: int | None = None, num_bits: int = 8,
               narrow_range: bool = True) -> torch.Tensor:
    """Quantize and dequantize symmetrically in x's dtype, differentiable by the straight-through estimator.

    ``d out / d x = 1`` where ``|x| <= amax``, else 0. A learnable ``amax`` (requires_grad) receives
    ``sign(x)`` times the upstream gradient of the clipped elements (PACT).
    """
    axis = check_axis(axis, x.dim())
    amax_t = _as_amax(amax, x)
    qmin, qmax = qrange(num_bits, narrow_range)
    a = _broadcast(amax_t, x, axis if amax_t.dim() else None).to(x.dtype)
    # clamp against a tensor bound keeps the gradient for both x (inside) and amax (outside)
    xc = torch.minimum(torch.maximum(x, -a), a)
    scale = scale_from_amax(amax_t.detach(), num_bits, narrow_range)
    s = _broadcast(scale, x, axis if amax_t.dim() else None)
    q = torch.clamp(torch.round(xc.detach().float() / s), qmin, qmax)
    y = (q * s).to(x.dtype)
    return xc + (y - xc).detach()


# ------------------------------------------------------------------------------------------------ asymmetric
def asym_params(amin, amax, num_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for the unsigned grid [0, 2^b - 1]; the range is widened to include 0."""
    _, qmax = qrange(num_bits, unsigned=True)
    amin = torch.as_tensor(amin, dtype=torch.float32)
    amax = torch.as_tensor(amax, dtype=torch.float32, device=amin.device)
    if torch.isnan(amin).any() or torch.isnan(amax).any():
        raise ValueError("amin/amax must not be NaN (was the quantizer calibrated?)")
    if (amin > amax).any():
        raise ValueError("amin must be <= amax")
    lo = torch.clamp(amin, max=0.0)
    hi = torch.clamp(amax, min=0.0)
    span = hi - lo
    scale = torch.where(span > AMAX_EPS, span / qmax, torch.ones_like(span))
    zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zp


def quantize_asym(x: torch.Tensor, amin, amax, axis: int | None = None,
                  num_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization to uint8 codes: returns ``(q uint8, scale, zero_point)``."""
    axis = check_axis(axis, x.dim())
    scale, zp = asym_params(torch.as_tensor(amin).to(x.device), torch.as_tensor(amax).to(x.device), num_bits)
    per = axis if scale.dim() else None
    _, qmax = qrange(num_bits, unsigned=True)
    q = torch.clamp(torch.round(x.float() / _broadcast(scale, x, per)) + _broadcast(zp, x, per), 0, qmax)
    return q.to(torch.uint8), scale, zp


def fake_quant_asym(x: torch.Tensor, amin, amax, axis: int | None = None, num_bits: int = 8) -> torch.Tensor:
    """Asymmetric quantize-dequantize with the straight-through estimator masked to [amin, amax]."""
    axis = check_axis(axis, x.dim())
    amin_t = torch.as_tensor(amin).to(x.device)
    amax_t = torch.as_tensor(amax).to(x.device)
    scale, zp = asym_params(amin_t.detach(), amax_t.detach(), num_bits)
    per = axis if scale.dim() else None
    _, qmax = qrange(num_bits, unsigned=True)
    s, z = _broadcast(scale, x, per), _broadcast(zp, x, per)
    lo = _broadcast(-zp * scale, x, per).to(x.dtype)
    hi = _broadcast((qmax - zp) * scale, x, per).to(x.dtype)
    xc = torch.minimum(torch.maximum(x, lo), hi)
    q = torch.clamp(torch.round(xc.detach().float() / s) + z, 0, qmax)
    y = ((q - z) * s).to(x.dtype)
    return xc + (y - xc).detach()
