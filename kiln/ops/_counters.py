"""Zeroed int32 counters for kernels that finish with the "last block" pattern: every program of a group writes its
partial result, bumps the group's counter, and the program that brings it to the group size reduces the partials
and sets the counter back to zero (the fused decode attention's merge, the argmax, the weight-only GEMV's split-K
sum).

One buffer per device and stream serves every such launch: kernels on one stream run in order and each leaves its
counters at zero (with programmatic dependent launch a kernel touches them only after its ``gdc_wait``, when the
previous grid has finished); kernels on two streams may overlap, so each stream counts in its own buffer. A CUDA
graph captured on a side stream uses the default stream's buffer, the one the eager warm-up before a capture sized,
on the stream decode graphs are replayed on. Nothing is allocated inside a capture: such a buffer would be zeroed
only when the graph that captured the allocation replays, not before the other graphs that share it."""

from __future__ import annotations

import torch

from ._triton import tl, triton

_COUNTERS: dict[tuple, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers stay allocated: a captured CUDA graph may still point at them
MIN_COUNTERS = 4096


def split_counters(device: torch.device | str, n: int) -> torch.Tensor | None:
    """At least ``n`` zeroed counters on ``device`` for the current stream; None while a CUDA graph is being
    captured and the buffer is too small (the caller takes its path without counters; the eager warm-up before a
    capture has normally sized the buffer already). The lookup reads the raw stream handle (no Stream object):
    the sparse backward asks once per layer on a host-bound path."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = ("cuda", index, torch._C._cuda_getCurrentRawStream(index))
    else:
        key = (device.type, device.index, 0)
    t = _COUNTERS.get(key)  # a capture stream never has one: nothing is allocated while capturing
    if t is not None and t.numel() >= n:
        return t
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        t = _COUNTERS.get(("cuda", key[1], torch.cuda.default_stream(key[1]).cuda_stream))
        return t if t is not None and t.numel() >= n else None
    if t is not None:
        _RETIRED.append(t)
    t = torch.zeros(max(n, MIN_COUNTERS, 2 * (0 if t is None else t.numel())), dtype=torch.int32, device=device)
    _COUNTERS[key] = t
    return t


@triton.jit
def last_to_arrive(counter, arrivals):
    """The group's arrival, in each of its ``arrivals`` programs after it stored its partial: True in the program
    that arrives last, which then reads the others' partials (``.cg`` loads: from L2) and calls ``rearm``. The
    barrier puts every thread's stores before the count; acq_rel at GPU scope publishes them to the last program."""
    tl.debug_barrier()
    return tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == arrivals - 1


@triton.jit
def rearm(counter):
    """The last program sets its group's counter back to 0 for the next launch (ordered by the stream)."""
    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
