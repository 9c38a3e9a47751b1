"""Import Triton when it is there; otherwise provide inert stand-ins so kernel definitions still parse.

Kernels decorated with the stand-in ``triton.jit`` are never launched: dispatch only picks the Triton path
when ``triton_available()`` is true.
"""

from __future__ import annotations

import inspect
import os

try:
    import triton
    import triton.language as tl
except Exception:  # CPU-only installs without triton
    import types

    def _jit(fn=None, **_kw):
        if fn is None:
            return lambda f: f
        return fn

    triton = types.SimpleNamespace(jit=_jit, autotune=lambda *a, **k: (lambda f: f), Config=lambda *a, **k: None)
    tl = types.SimpleNamespace(constexpr=int)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code. Triton 3.6 makes ``triton.cdiv`` and ``triton.next_power_of_2``
    ``ConstexprFunction`` objects whose host call unwraps every argument: ~2-5 us a call, and a sparse backbone
    step sizes ~165 grids and blocks with them."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0, as Triton's), for host code (see ``cdiv``)."""
    if n < 0:
        raise ValueError(f"next_power_of_2 of a negative number ({n})")
    return 0 if n == 0 else 1 << (int(n) - 1).bit_length()


class DirectLauncher:
    """``DirectLauncher(kernel)[grid](*args, **kwargs)`` launches like ``kernel[grid](...)``, with less host time.

    Triton's JIT launch rebuilds its cache key on every call (every argument's specialization, the options
    stringified), checks the kernel's globals and calls the (empty) launch-hook chains. The sparse backbone makes
    53-73 launches per forward+backward and is host-bound (nuScenes fp16 on an H100: 17.6 ms enqueued for 5.3 ms
    of GPU work). After a variant's first launch through the JIT, later launches with the same specialization go
    straight to the compiled kernel's launcher. Measured on H100 hosts (scripts/gpu/sparse_launch_probe.py, the
    sparse implicit GEMM's 25 arguments): 22-25 µs through the JIT, 20-23 µs direct, 6-7 µs for the launcher
    alone -- most of the JIT's cost is per-argument work that a correct key needs too.

    The key is Triton's own specialization of each runtime argument (dtype and 16-byte alignment of tensors,
    16-divisibility and width of ints, ints equal to 1 as constants; ``native_specialize_impl`` for anything else)
    plus the constexpr values and launch options, so a launch that Triton would compile differently never reuses a
    variant. Unlike the JIT it does not re-check the kernel's globals: kiln's kernels read none that change. Launch
    hooks (profilers such as proton), the interpreter and runtime arguments passed by keyword take Triton's own
    path; so does everything when ``KILN_DIRECT_LAUNCH=0``."""

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}
        self._plan = None

    def _prepare(self) -> bool:
        self._plan = False
        if not isinstance(self.fn, JITFunction):  # the interpreter's InterpretedFunction
            return False
        params = self.fn.params
        # annotated runtime parameters specialise differently (Triton special-cases them): keep Triton's path
        if any(getattr(p, "annotation_type", None) for p in params if not p.is_constexpr):
            return False
        self.names = tuple(p.name for p in params)
        # per parameter: a constexpr (its value is the key), a plain runtime argument (kiln's quick key below) or
        # one with non-default specialisation flags (Triton's own function decides)
        self.kinds = tuple(_CONSTEXPR if p.is_constexpr else
                           (_PLAIN if not p.is_const and not p.do_not_specialize
                            and not p.do_not_specialize_on_alignment else _NATIVE) for p in params)
        self.flags = tuple((p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
                           for p in params)
        self.runtime_names = frozenset(p.name for p in params if not p.is_constexpr)
        sig = self.fn.signature.parameters
        self.defaults = {n: sig[n].default for n in self.names if sig[n].default is not inspect.Parameter.empty}
        self._plan = True
        return True

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict):
        plan = self._plan
        if plan is None:
            plan = self._prepare()
        # runtime arguments by keyword would enter the key by value: Triton's path takes those (kiln passes none)
        if not plan or not DIRECT_LAUNCH or _hooks_active() or (kwargs and not self.runtime_names.isdisjoint(kwargs)):
            return self.fn[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        key = [device]
        add = key.append
        for a, kind in zip(args, self.kinds):
            if kind is _CONSTEXPR:
                add(a)
                continue
            t = type(a)
            if kind is _PLAIN and t is int:  # Triton: 1 is a constant; else 16-divisibility and width
                add(a if a == 1 else ((a & 15) == 0, -_I32 <= a < _I32, a < _I64))
            elif kind is _PLAIN and (t is _Tensor or isinstance(a, _Tensor)):  # dtype and 16-byte alignment
                add((a.dtype, (a.data_ptr() & 15) == 0))
            else:  # bools, floats, None, flagged parameters: Triton's own answer
                i = len(key) - 1
                add(_specialize(self.fn.device_caches[device][3], a, *self.flags[i]))
        if kwargs:
            add(tuple(kwargs.items()))
        key = tuple(key)
        hit = self.cache.get(key)
        if hit is None:
            kernel = self.fn.run(*args, grid=grid if not callable(grid) else grid(self._named(args, kwargs)),
                                 warmup=False, **kwargs)
            if all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
                # the arguments after the positional ones are fixed by the key (keyword values or defaults)
                tail = tuple(kwargs[n] if n in kwargs else self.defaults[n] for n in self.names[len(args):])
                self.cache[key] = (kernel, tail)
            else:  # a Triton whose compiled kernels launch differently: its own path from now on
                self._plan = False
            return kernel
        kernel, tail = hit
        full = (*args, *tail) if tail else args
        if callable(grid):
            grid = grid(dict(zip(self.names, full)))
        n_grid = len(grid)
        kernel.run(grid[0], grid[1] if n_grid > 1 else 1, grid[2] if n_grid > 2 else 1,
                   torch._C._cuda_getCurrentRawStream(device), kernel.function, kernel.packed_metadata, None, None,
                   None, *full)
        return kernel

    def _named(self, args, kwargs) -> dict:
        named = dict(zip(self.names, args))
        for n in self.names[len(args):]:
            named[n] = kwargs[n] if n in kwargs else self.defaults[n]
        return named


_CONSTEXPR, _PLAIN, _NATIVE = "constexpr", "plain", "native"
_I32, _I64 = 2**31, 2**63


_DIRECT: dict = {}


def direct(kernel) -> DirectLauncher:
    """The kernel's shared ``DirectLauncher``: ``direct(kernel)[grid](...)`` in place of ``kernel[grid](...)``."""
    launcher = _DIRECT.get(kernel)
    if launcher is None:
        launcher = _DIRECT[kernel] = DirectLauncher(kernel)
    return launcher


def _hooks_active() -> bool:
    """Whether a launch hook is set (Triton 3.6 keeps an empty ``HookChain`` there; older ones None)."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(h is not None and bool(getattr(h, "calls", True)) for h in hooks)


# KILN_DIRECT_LAUNCH=0: every launch through Triton's JIT path (an A/B switch; scripts/gpu/sparse_host_ab.py flips it)
DIRECT_LAUNCH = os.environ.get("KILN_DIRECT_LAUNCH", "1") != "0"

try:
    import torch
    from triton import knobs
    from triton._C.libtriton import native_specialize_impl as _specialize
    from triton.runtime.jit import JITFunction

    _Tensor = torch.Tensor
except Exception:  # no Triton, or one without these internals: DirectLauncher keeps Triton's own launch path
    DIRECT_LAUNCH = False
    JITFunction = ()


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
        self.direct = DirectLauncher(tuned.fn)

    def __call__(self, key, grid, *args, **kwargs):
        cfg = self.best.get(key)
        if cfg is None:
            self.tuned[grid](*args, **kwargs)
            self.best[key] = self.tuned.best_config.all_kwargs()
        else:
            if self.pre_hook is not None:
                self.pre_hook({**dict(zip(self.tuned.arg_names, args)), **kwargs, **cfg})
            self.direct[grid](*args, **kwargs, **cfg)


__all__ = ["triton", "tl", "DirectLauncher", "TunedLauncher", "direct", "cdiv", "next_power_of_2"]
