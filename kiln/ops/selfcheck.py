"""Every op run against its reference on one device: the body of ``kiln doctor``.

Each check builds fresh random inputs, runs the dispatched op (Triton on CUDA; on a CPU with Triton installed and
``TRITON_INTERPRET=1`` the interpreted kernel) and the PyTorch reference, and reports the max error relative to
the reference's magnitude. Checks live here for the basic ops; any other module of ``kiln.ops`` may export a
``DOCTOR_CHECKS = {name: fn(device, dtype, generator) -> (max_rel_err, backend)}`` dict, found automatically,
so a new op family adds its check next to its kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import activation, kv_cache, norm, rotary
from ._dispatch import backend_for, resolve_device


@dataclass
class CheckResult:
    op: str
    dtype: str
    backend: str
    max_err: float
    tol: float
    error: str = ""

    @property
    def passed(self) -> bool:
        return self.max_err == self.max_err and self.max_err <= self.tol  # NaN fails


def _tol(dtype: torch.dtype) -> float:
    """Relative tolerance: a few units in the last place of the dtype."""
    return {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error relative to the reference's largest magnitude."""
    if not a.numel():
        return 0.0
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def check_rms_norm(device, dtype, g):
    x = torch.randn(37, 257, device=device, dtype=dtype, generator=g)
    r = torch.randn(37, 257, device=device, dtype=dtype, generator=g)
    w = torch.randn(257, device=device, dtype=dtype, generator=g)
    y, s = norm.rms_norm(x, w, 1e-5, residual=r)
    y_ref, s_ref = norm.rms_norm_ref(x, w, 1e-5, residual=r)
    return max(_err(y, y_ref), _err(s, s_ref)), backend_for(x)


def check_rotary(device, dtype, g):
    cache = rotary.rope_cos_sin_cache(48, 300, 10000.0, {"rope_type": "llama3", "factor": 8.0,
                                                          "original_max_position_embeddings": 64},
                                      device=device)
    errs = []
    for neox in (True, False):
        q = torch.randn(19, 6, 64, device=device, dtype=dtype, generator=g)
        k = torch.randn(19, 2, 64, device=device, dtype=dtype, generator=g)
        pos = torch.randint(0, 300, (19,), device=device, generator=g)
        q_ref, k_ref = rotary.rotary_ref(q, pos, cache, neox), rotary.rotary_ref(k, pos, cache, neox)
        rotary.apply_rotary(q, k, pos, cache, neox)
        errs += [_err(q, q_ref), _err(k, k_ref)]
    return max(errs), backend_for(q)


def check_silu_and_mul(device, dtype, g):
    x = torch.randn(23, 2 * 333, device=device, dtype=dtype, generator=g)
    return _err(activation.silu_and_mul(x), activation.silu_and_mul_ref(x)), backend_for(x)


def check_store_kv(device, dtype, g):
    nb, bs, h, d = 7, 16, 3, 40
    kc = torch.randn(nb, bs, h, d, device=device, dtype=dtype, generator=g)
    vc = torch.randn_like(kc)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    k = torch.randn(29, h, d, device=device, dtype=dtype, generator=g)
    v = torch.randn_like(k)
    slots = torch.randperm(nb * bs, device=device, generator=g)[:29]
    slots[::5] = -1
    kv_cache.store_kv(k, v, kc, vc, slots)
    kv_cache.store_kv_ref(k, v, kc_ref, vc_ref, slots)
    return max(_err(kc, kc_ref), _err(vc, vc_ref)), backend_for(k)


CHECKS: dict[str, Callable] = {
    "rms_norm": check_rms_norm,
    "rotary": check_rotary,
    "silu_and_mul": check_silu_and_mul,
    "store_kv": check_store_kv,
}


def all_checks() -> dict[str, Callable]:
    import importlib
    import pkgutil

    import kiln.ops as ops_pkg

    checks = dict(CHECKS)
    for info in sorted(pkgutil.iter_modules(ops_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "selfcheck":
            continue
        module = importlib.import_module(f"kiln.ops.{info.name}")
        checks.update(getattr(module, "DOCTOR_CHECKS", {}))
    return checks


def run_all(device: torch.device | str, dtypes=(torch.float32, torch.float16, torch.bfloat16),
            seed: int = 0) -> list[CheckResult]:
    device = resolve_device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    results = []
    for name, fn in all_checks().items():
        for dtype in dtypes:
            try:
                err, backend = fn(device, dtype, g)
            except Exception as exc:  # a broken install shows up as an exception: report it as a FAIL
                results.append(CheckResult(name, str(dtype)[6:], "?", float("inf"), _tol(dtype),
                                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
                continue
            results.append(CheckResult(name, str(dtype)[6:], backend, err, _tol(dtype)))
    return results
