"""CUDA graphs of PPO's training micro-step: forward, clipped losses and backward, replayed with one launch.

Why: a small policy's micro-step is a few thousand small kernels, each launched from Python. The bench's PPO
iteration launched 17.8k kernels that ran for 0.10 s of GPU time against ~0.4 s of wall time: the training phase
is bound by the host, not the GPU. A captured graph replays the same kernels without Python in between.

What a graph holds fixed, and how the trainer keeps it fixed:

- **Shapes.** One graph per shape of the iteration's training tensors (rows, prompt + response length) and
  micro-batch size. The trainer pads prompts on the left and responses on the right to a multiple of a bucket,
  with masked tokens, so a run needs a handful of graphs, not one per prompt length.
- **Addresses.** Inputs are copied into the graph's own tensors: the rollout's tensors once per iteration, the
  micro-batch's row indices and loss scale per replay. The parameters and their ``.grad`` tensors must keep
  their storage: the graph accumulates into the same ``.grad`` tensors that the optimizer then reads, so the
  trainer zeroes them in place (``zero_grad(set_to_none=False)``); a replaced ``.grad`` is copied back in, and
  a moved parameter drops every graph.
- **No host syncs in the step.** A model whose forward reads a tensor's value on the host cannot be captured.
  The first failed capture turns graphs off for the trainer, with a warning, and the step runs eagerly; no
  gradient from the failed attempt survives.

Capturing runs the body twice on a side stream first (lazy initialisation must not happen inside the capture)
with the gradients saved and restored around it, so a capture changes no training state.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

Body = Callable[[dict[str, torch.Tensor], torch.Tensor, "float | torch.Tensor"], torch.Tensor]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the graph's copies of the iteration's tensors
    idx: torch.Tensor                # the micro-batch's rows
    scale: torch.Tensor              # the loss scale (1 / micro-batches per mini-batch)
    out: torch.Tensor                # what the body returns (the micro-step's stats)
    source: dict | None = field(default=None)  # the inputs last copied in (identity: once per iteration)


class MicroStepGraphs:
    """Replays ``body(inputs, idx, scale)`` (forward, loss, ``backward``; returns a stats tensor) from CUDA graphs.

    ``run`` captures a graph the first time it meets a shape and replays it afterwards; ``max_graphs`` bounds the
    graphs kept (least recently used dropped first). ``failure`` is the reason graphs were turned off, if they
    were, and ``run`` then calls ``body`` eagerly.
    """

    def __init__(self, body: Body, params: list[nn.Parameter], max_graphs: int = 8, warmup: int = 2):
        self.body = body
        self.params = [p for p in params if p.requires_grad]
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.failure: str | None = None
        self.captures = 0
        self.capture_s = 0.0  # wall time of the warm-ups and captures (the price of the graphs)
        self._grads: list[torch.Tensor | None] | None = None  # the .grad tensors every graph accumulates into
        self._param_ptrs: list[int] | None = None

    @property
    def active(self) -> bool:
        """True once graphs hold the gradients: then they must be zeroed in place, never set to None."""
        return self._grads is not None and self.failure is None

    @staticmethod
    def key(inputs: dict[str, torch.Tensor], idx: torch.Tensor) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items())) + (idx.numel(),)

    def run(self, inputs: dict[str, torch.Tensor], idx: torch.Tensor, scale: float) -> torch.Tensor:
        if self.failure is not None:
            return self.body(inputs, idx, scale)
        self._check_parameters()
        key = self.key(inputs, idx)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(inputs, idx, scale)
            if g is None:  # capture failed: graphs are off from here on
                return self.body(inputs, idx, scale)
            self.graphs[key] = g
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        if g.source is not inputs:
            for name, t in inputs.items():
                g.inputs[name].copy_(t, non_blocking=True)
            g.source = inputs
        g.idx.copy_(idx, non_blocking=True)
        g.scale.fill_(scale)
        g.graph.replay()
        return g.out

    # ------------------------------------------------------------------------------------------------ internals
    def _check_parameters(self) -> None:
        """Graphs read the parameters' and gradients' storage: put a replaced ``.grad`` back, drop graphs whose
        parameters moved (``model.to``, ``load_state_dict(assign=True)``)."""
        if self._grads is None:
            return
        ptrs = [p.data_ptr() for p in self.params]
        if ptrs != self._param_ptrs:
            logger.info("PPO micro-step graphs: parameters moved, recapturing")
            self.graphs.clear()
            self._grads = None
            return
        for p, g in zip(self.params, self._grads):
            if g is None or p.grad is g:
                continue
            if p.grad is None:
                g.zero_()
            else:
                g.copy_(p.grad)
            p.grad = g

    def _capture(self, inputs: dict[str, torch.Tensor], idx: torch.Tensor, scale: float) -> _Graph | None:
        t0 = time.perf_counter()
        static = {name: t.clone() for name, t in inputs.items()}
        static_idx = idx.clone()
        static_scale = torch.tensor(scale, dtype=torch.float32, device=idx.device)
        first = self._grads is None
        saved = [None if p.grad is None else p.grad.clone() for p in self.params]
        if first:  # the warm-up's backward allocates the gradients that every graph will accumulate into
            for p in self.params:
                p.grad = None
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.body(static, static_idx, static_scale)
            torch.cuda.current_stream().wait_stream(side)
            if first:
                self._grads = [p.grad for p in self.params]  # None: a parameter the loss does not reach
                self._param_ptrs = [p.data_ptr() for p in self.params]
            for g in self._grads:
                if g is not None:
                    g.zero_()
            # thread_local: an engine thread's CUDA calls elsewhere do not invalidate this capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.body(static, static_idx, static_scale)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run this model eagerly
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.warning("PPO training step: CUDA graph capture failed (%s); running eagerly", self.failure)
            self.graphs.clear()
            self._grads = None
            for p, s in zip(self.params, saved):
                p.grad = s
            return None
        for p, g, s in zip(self.params, self._grads, saved):
            if g is None:
                p.grad = s
                continue
            if s is None:
                g.zero_()
            else:
                g.copy_(s)
            p.grad = g
        self.captures += 1
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.capture_s += dt
        logger.info("PPO micro-step graph %d captured in %.3f s (%s)", self.captures, dt,
                    ", ".join(f"{k} {tuple(v.shape)}" for k, v in static.items() if k in ("ids", "responses")))
        return _Graph(graph=graph, inputs=static, idx=static_idx, scale=static_scale, out=out)
