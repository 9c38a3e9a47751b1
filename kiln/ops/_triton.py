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


class TunedLauncher:
    """Launch an autotuned kernel, remembering each key's tuned config: after a key's first (tuning) call, launches go
    straight to the JIT function with that config. Triton's autotuner rebuilds its key from every argument and
    merges the config's keyword dicts on each call; on the device hosts that was a large share of a sparse layer's
    host time, and the sparse backbone is host-bound. ``key`` must determine the autotuner's key (its key
    arguments and the tensor dtypes) up to what may share a config: the GEMMs key on a bucket of M, so a serving
    engine, whose prefill M differs nearly every step, tunes once per bucket instead of once per M. ``pre_hook``
    is the configs' pre-hook (it sees the named arguments and the config), run before a remembered launch too."""

    def __init__(self, tuned, pre_hook=None):
        self.tuned = tuned
        self.pre_hook = pre_hook
        self.best: dict = {}

    def __call__(self, key, grid, *args, **kwargs):
        cfg = self.best.get(key)
        if cfg is None:
            self.tuned[grid](*args, **kwargs)
            self.best[key] = self.tuned.best_config.all_kwargs()
        else:
            if self.pre_hook is not None:
                self.pre_hook({**dict(zip(self.tuned.arg_names, args)), **kwargs, **cfg})
            self.tuned.fn[grid](*args, **kwargs, **cfg)


__all__ = ["triton", "tl", "TunedLauncher"]
