"""Zeroed int32 counters for kernels that finish with the "last block" pattern: every program of a group writes its
partial result, bumps the group's counter, and the program that brings it to the group size reduces the partials
and sets the counter back to zero. One buffer per device serves every such launch: kernels on one stream run in
order, and each launch leaves its counters at zero."""

from __future__ import annotations

import torch

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers stay allocated: a captured CUDA graph may still point at them
MIN_COUNTERS = 4096


def split_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """At least ``n`` zeroed counters on ``device``; None while a CUDA graph is being captured and the buffer is
    too small (a buffer allocated inside a capture would only be zeroed on replay: the caller takes its unfused
    path, and the eager warm-up before a capture has normally sized the buffer already)."""
    t = _COUNTERS.get(device)
    if t is None or t.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if t is not None:
            _RETIRED.append(t)
        t = torch.zeros(max(n, MIN_COUNTERS, 2 * (0 if t is None else t.numel())), dtype=torch.int32, device=device)
        _COUNTERS[device] = t
    return t
