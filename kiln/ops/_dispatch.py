"""Backend choice and argument checks shared by every op.

An op dispatches to its Triton kernel when the tensors live on CUDA and Triton imports; otherwise it runs the
PyTorch reference in the same file. ``KILN_OPS=ref`` forces the reference (debugging, parity checks);
``KILN_OPS=triton`` forces the kernel, which on a CPU-only machine needs ``TRITON_INTERPRET=1`` (the CI tests).
"""

from __future__ import annotations

import functools
import os
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a kiln object runs on: ``None`` -> the GPU when one is visible, else the CPU. A name torch cannot
    parse, a device type kiln has no kernels for, or a GPU this process cannot see is a ValueError that says which,
    raised here rather than by torch at the first allocation ("Torch not compiled with CUDA enabled", "invalid
    device ordinal")."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device name (use 'cpu', 'cuda' or 'cuda:N')") from exc
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"device {device!r}: kiln runs on {' or '.join(repr(t) for t in DEVICE_TYPES)}, "
                         f"not {dev.type!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible to this process"
            raise ValueError(f"device {device!r} asks for a GPU, but {why}; use device='cpu'")
        if (dev.index or 0) >= count:
            raise ValueError(f"device {device!r} is not one of the {count} visible GPU(s) (cuda:0 .. "
                             f"cuda:{count - 1})")
    return dev


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True


_INTERPRETING: bool | None = None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``). Read once: Triton itself decides
    when a kernel is defined, at import, and launch paths ask this on every call (an environment read is ~1 µs
    of a host-bound launch)."""
    global _INTERPRETING
    if _INTERPRETING is None:
        _INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _INTERPRETING


def pdl_enabled() -> bool:
    """Programmatic dependent launch for the kernels that support it (the decode GEMVs, float and weight-only, with
    the split-K sum; RMSNorm; the fused decode attention): a kernel's CTAs start under the previous kernel's tail,
    do their independent loads (weights, the step's indices) and wait (``gdc_wait``) before reading its output.
    On by default on sm_90+ (H100, session 9: a Llama-3.2-1B batch-1 decode step 1.30 -> 1.18 ms, Llama-3.1-8B
    6.00 -> 5.86 ms); ``KILN_PDL=0`` turns it off. Never under the interpreter."""
    v = os.environ.get("KILN_PDL", "auto").lower()
    if v not in ("auto", "0", "1"):
        raise ValueError(f"KILN_PDL must be 'auto', '0' or '1', got {v!r}")
    if v == "0" or interpreting():
        return False
    return v == "1" or _sm90()


def pdl_launch_args(enabled: bool | None = None) -> dict:
    """Launch keywords for a kernel with a ``PDL`` constexpr: ``PDL`` (the kernel waits in ``gdc_wait`` before it
    reads the previous kernel's output) and, when on, Triton's ``launch_pdl``. ``enabled`` defaults to
    ``pdl_enabled()``; a caller that knows better (the split-K sum follows the GEMM that wrote its partials only
    where that GEMM used PDL) passes it."""
    on = pdl_enabled() if enabled is None else enabled
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@functools.lru_cache(maxsize=1)
def _sm90() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def backend_for(*tensors: torch.Tensor) -> str:
    """'triton' or 'ref' for an op whose inputs are ``tensors``."""
    mode = os.environ.get("KILN_OPS", "auto").lower()
    if mode not in ("auto", "ref", "triton"):
        raise ValueError(f"KILN_OPS must be 'auto', 'ref' or 'triton', got {mode!r}")
    if mode == "ref" or not triton_available():
        return "ref"
    if mode == "triton":
        return "triton"
    on_cuda = all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    return "triton" if on_cuda else "ref"


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise ValueError naming ``name`` when ``t`` is not a tensor of the expected rank, dtype or device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def check_same(name: str, value: object, expected_name: str, expected: object) -> None:
    if value != expected:
        raise ValueError(f"{name} ({value}) must match {expected_name} ({expected})")
