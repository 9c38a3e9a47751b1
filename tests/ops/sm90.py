"""Compile a Triton kernel for sm_90 on a machine without a GPU: ptxas's register report and the main loop's SASS.

Triton lowers to PTX without a device, and its wheel bundles ptxas, so register use and spills of a GPU tile can
be checked in CI: a tile that spills on the H100 streams local memory beside its weights. The compile must carry
the launch's specialisations (16-byte aligned pointers, sizes divisible by 16, ints equal to 1 as constants):
without them the compiler cannot vectorise loads, and the register counts it reports are not the launch's.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile


def ptxas_path() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - no Triton: nothing to compile with
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.access(path, os.X_OK) else None


def sm90_compile(module: str, kernel: str, signature: dict[str, str], constexprs: dict[str, object],
                 num_warps: int) -> tuple[int, int, dict[str, int]]:
    """(registers per thread, spill-store bytes, opcode counts of the main loop's body in SASS) of
    ``module.kernel`` compiled for sm_90a, in a worker process without TRITON_INTERPRET (the interpreter's
    functions do not compile; ``_worker``). ``signature`` gives each runtime argument's
    Triton type ('*bf16', 'i32', ...); every name in ``constexprs`` is a constexpr (as a launch makes an int
    argument equal to 1); every other argument is taken as 16-aligned / divisible by 16, as a launch specialises
    aligned pointers and the model shapes (without that the compiler cannot vectorise a load)."""
    import json

    worker = _worker()
    worker.stdin.write(json.dumps([module, kernel, signature, constexprs, num_warps]) + "\n")
    worker.stdin.flush()
    for line in worker.stdout:  # the compiler may print; the answer is the line with the marker
        if line.startswith(_MARK):
            reply = json.loads(line[len(_MARK):])
            if "error" in reply:
                raise RuntimeError(f"sm_90 compile of {module}.{kernel} failed: {reply['error']}")
            regs, spills, mix = reply["ok"]
            return regs, spills, mix
    raise RuntimeError(f"the sm_90 compile worker exited while compiling {module}.{kernel}")


_MARK = "SM90-RESULT "
_WORKER_CODE = f"""
import json, sys
from tests.ops.sm90 import _compile
for line in sys.stdin:
    try:
        reply = {{"ok": _compile(*json.loads(line))}}
    except Exception as exc:  # reported to the caller, which raises
        reply = {{"error": repr(exc)}}
    print({_MARK!r} + json.dumps(reply), flush=True)
"""
_WORKERS: list = []


def _worker() -> subprocess.Popen:
    """One compile process for the whole test session, started on first use: importing torch and Triton costs
    ~4 s, more than half of a small kernel's compile, and the CI suite compiles a dozen tiles."""
    import atexit
    import sys

    if _WORKERS and _WORKERS[0].poll() is None:
        return _WORKERS[0]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=root)
    _WORKERS[:] = [proc]
    atexit.register(_stop, proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _loop_mix(sass: str) -> dict[str, int]:
    """Opcode counts between the target and the source of the longest backward branch (the main K loop)."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in
             re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)([^;]*);", sass)]
    best = None
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/[^;\n]*BRA (0x[0-9a-f]+)", sass):
        here, target = int(m.group(1), 16), int(m.group(2), 16)
        if target < here and (best is None or here - target > best[1] - best[0]):
            best = (target, here)
    counts: dict[str, int] = {}
    if best is not None:
        for addr, op in lines:
            if best[0] <= addr <= best[1]:
                counts[op] = counts.get(op, 0) + 1
    return counts


def _compile(module: str, kernel: str, signature: dict, constexprs: dict, num_warps: int):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), kernel)
    names = fn.arg_names
    # constexprs left at their defaults are constexprs too (a launch passes them so), not i32 arguments
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default
                     and p.name not in constexprs}, **constexprs}
    sig = {n: "constexpr" if n in constexprs else signature.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in constexprs}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        cubin = os.path.join(tmp, "k.cubin")
        out = subprocess.run([ptxas_path(), "-v", "-arch=sm_90a", ptx, "-o", cubin],
                             capture_output=True, text=True, check=True).stderr
        cuobjdump = os.path.join(os.path.dirname(ptxas_path()), "cuobjdump")
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout \
            if os.access(cuobjdump, os.X_OK) else ""
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spills, _loop_mix(sass)
