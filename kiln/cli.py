"""The ``kiln`` command: one entry point, a sub-command per subsystem.

Sub-commands register themselves through ``_COMMANDS``; each exists only when it works.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable

import kiln

_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []
# Each subsystem keeps its own sub-commands in its own ``cli`` module exposing ``add_parsers(subparsers)``.
_SUBSYSTEM_CLIS = ("kiln.llm.cli", "kiln.sparse.cli", "kiln.quant.cli", "kiln.rl.cli")


def command(fn: Callable[[argparse._SubParsersAction], None]):
    """Decorator for a function that adds one sub-parser (with ``set_defaults(func=...)``)."""
    _COMMANDS.append(fn)
    return fn


# ----------------------------------------------------------------------------------------------- doctor
@command
def _doctor_parser(sub):
    p = sub.add_parser("doctor", help="print torch/Triton/CUDA facts and check every kernel against its reference")
    p.add_argument("--device", default=None, help="device to check on (default: cuda if present, else cpu)")
    p.set_defaults(func=_doctor)


def _doctor(args) -> int:
    import torch

    from kiln.ops._dispatch import triton_available

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # On a CPU the Triton kernels can still be checked, through Triton's interpreter; it must be switched on
    # before any kernel is defined, so the check runs in a child process with the variables set.
    if (device == "cpu" and triton_available() and os.environ.get("TRITON_INTERPRET") != "1"
            and os.environ.get("KILN_OPS", "auto") == "auto"):
        env = dict(os.environ, TRITON_INTERPRET="1", KILN_OPS="triton", PYTHONWARNINGS="ignore")
        return subprocess.call([sys.executable, "-m", "kiln.cli", "doctor", "--device", "cpu"], env=env)

    import platform

    print(f"kiln {kiln.__version__}   python {platform.python_version()}   torch {torch.__version__}")
    try:
        import triton

        tri = f"triton {triton.__version__}" + ("  (interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "")
    except Exception as exc:
        tri = f"triton not usable ({type(exc).__name__})"
    print(tri)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"CUDA {torch.version.cuda}   {props.name}   sm_{props.major}{props.minor}   "
              f"{props.total_memory / 2**30:.1f} GiB   {props.multi_processor_count} SMs   "
              f"{torch.cuda.device_count()} device(s)")
    else:
        print("CUDA: not available (CPU only)")
    print(f"KILN_OPS={os.environ.get('KILN_OPS', 'auto')}   checking on {device}\n")

    from kiln.ops import selfcheck

    results = selfcheck.run_all(device)
    print(f"{'op':<28}{'dtype':<10}{'backend':<9}{'max rel err':>13}{'tol':>10}  result")
    for r in results:
        print(f"{r.op:<28}{r.dtype:<10}{r.backend:<9}{r.max_err:>13.3e}{r.tol:>10.1e}  {'PASS' if r.passed else 'FAIL'}")
    failed = [r for r in results if not r.passed]
    for r in failed:
        if r.error:
            print(f"  {r.op} [{r.dtype}]: {r.error}")
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=kiln.__doc__)
    parser.add_argument("--version", action="version", version=f"kiln {kiln.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    import importlib

    for name in _SUBSYSTEM_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name in (name, name.rsplit(".", 1)[0]):  # that subsystem has no CLI yet
                continue
            raise
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"kiln {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
