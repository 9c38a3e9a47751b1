"""Small copies between pinned host memory and the GPU by a kernel, not the copy engine.

A batch-1 decode step moves a few hundred bytes each way: its staged inputs in (positions, KV slots, lengths, block
tables) and its sampled tokens out. As ``cudaMemcpyAsync`` calls those are copy-engine operations, and each
hand-off between the copy engine and the SMs leaves the GPU idle for microseconds: a Llama-3.2-1B int8 step spent
~17 us per step outside its CUDA graph, for ~4 us of copying (H100, session 22). Pinned memory is mapped into the
GPU's address space (unified addressing), so a kernel can read or write it directly; on the compute stream such a
kernel follows the graph like any other launch.

``copy_words(dst, src)`` copies between any two same-sized tensors of whole 4-byte words where one side may be
pinned host memory. ``host_copy_supported(device)`` checks once per device that the GPU's kernels can reach
pinned memory (and that Triton launches with it); callers fall back to ``Tensor.copy_`` where it cannot.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque

import torch

from ._dispatch import interpreting
from ._triton import cdiv, direct, tl, triton

logger = logging.getLogger(__name__)
BLOCK = 1024  # 4-byte words per program
# pinned tensors a queued kernel still reads or writes, each with an event after that kernel: torch's caching host
# allocator tracks its own copies' use of a pinned block, not a kernel's, and would hand a freed block out again
_IN_USE: deque = deque()
_IN_USE_LOCK = threading.Lock()


@triton.jit
def _copy_words_kernel(SRC, DST, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    tl.store(DST + offs, tl.load(SRC + offs, mask=ok), mask=ok)


def whole_words(t: torch.Tensor) -> bool:
    """Whether ``copy_words`` can take ``t``: contiguous, 4-byte aligned, a whole number of 4-byte words."""
    return t.is_contiguous() and (t.numel() * t.element_size()) % 4 == 0 and t.data_ptr() % 4 == 0


def _words(t: torch.Tensor, name: str) -> torch.Tensor:
    if not whole_words(t):
        raise ValueError(f"{name} must be contiguous whole 4-byte words, got shape {tuple(t.shape)} {t.dtype}")
    return t.view(-1).view(torch.int32)


def copy_words(dst: torch.Tensor, src: torch.Tensor, hold: bool = True) -> torch.Tensor:
    """``dst.copy_(src)`` by one kernel launch on the current stream: two tensors of the same dtype and size, one on
    a CUDA device and the other on it or in pinned host memory, each contiguous whole 4-byte words. ``hold``: keep
    the pinned side allocated until the kernel has run (a caller that owns a persistent buffer and its own event,
    like the decode runner's staging buffer, passes False)."""
    if dst.dtype != src.dtype or dst.numel() != src.numel():
        raise ValueError(f"dst and src must match: {tuple(dst.shape)} {dst.dtype} vs {tuple(src.shape)} {src.dtype}")
    for name, t in (("dst", dst), ("src", src)):
        if not (t.is_cuda or t.is_pinned() or interpreting()):
            raise ValueError(f"{name} must be on a CUDA device or in pinned host memory")
    d, s = _words(dst, "dst"), _words(src, "src")
    n = d.numel()
    if n:
        direct(_copy_words_kernel)[(cdiv(n, BLOCK),)](s, d, n, BLOCK=BLOCK, num_warps=4)
        host = src if dst.is_cuda else dst
        if hold and not host.is_cuda:
            _hold_until_done(host, dst.device if dst.is_cuda else src.device)
    return dst


def _hold_until_done(host: torch.Tensor, device: torch.device) -> None:
    """Keep ``host`` allocated until the kernel just queued on ``device``'s current stream has run (see _IN_USE)."""
    if device.type != "cuda":
        return
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    with _IN_USE_LOCK:
        while _IN_USE and _IN_USE[0][0].query():
            _IN_USE.popleft()
        _IN_USE.append((done, host))


@functools.lru_cache(maxsize=None)
def host_copy_supported(device: torch.device) -> bool:
    """Whether ``copy_words`` can move data between pinned host memory and ``device`` (checked once, by a round
    trip): False off CUDA, or where the driver or Triton will not take a pinned pointer."""
    if device.type != "cuda":
        return False
    try:
        with torch.cuda.device(device):
            host = torch.arange(8, dtype=torch.int64).pin_memory()
            dev = torch.zeros(8, dtype=torch.int64, device=device)
            copy_words(dev, host)
            back = torch.zeros(8, dtype=torch.int64).pin_memory()
            copy_words(back, dev * 3)
            torch.cuda.synchronize(device)
            ok = torch.equal(back, torch.arange(8) * 3)
    except Exception as e:  # noqa: BLE001 - any failure means: use the copy engine
        logger.info("kernel copies to and from pinned memory unavailable on %s (%s); using cudaMemcpyAsync", device, e)
        return False
    if not ok:
        logger.warning("kernel copies to and from pinned memory gave wrong data on %s; using cudaMemcpyAsync", device)
    return ok
