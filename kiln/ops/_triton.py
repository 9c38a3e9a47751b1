"""Import Triton when it is there; otherwise provide inert stand-ins so kernel definitions still parse.

Kernels decorated with the stand-in ``triton.jit`` are never launched: dispatch only picks the Triton path
when ``triton_available()`` is true.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except Exception:  # CPU-only installs without triton
    import types

    def _jit(fn=None, **_kw):
        if fn is None:
            return lambda f: f
        return fn

    def _next_power_of_2(n: int) -> int:
        return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    triton = types.SimpleNamespace(jit=_jit, next_power_of_2=_next_power_of_2, cdiv=lambda a, b: -(-a // b),
                                   autotune=lambda *a, **k: (lambda f: f), Config=lambda *a, **k: None)
    tl = types.SimpleNamespace(constexpr=int)

__all__ = ["triton", "tl"]
