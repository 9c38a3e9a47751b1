"""Autograd functions for sparse convolution and pooling over a rulebook.

The compute goes through ``kiln.ops.sparse_gemm``. ``algo``:

* ``"implicit"`` — the fused masked implicit GEMM over pair maps (forward: outputs gather inputs; input gradient:
  inputs gather output gradients through the backward pair map and the transposed weight), weight gradient from
  the forward pair map in fixed-order chunks (each dW tile's last program sums them: an integer arrival counter, no
  float atomics). Bit-reproducible: the default on CUDA and always in deterministic mode.
* ``"gather"`` — gather-GEMM-scatter, one GEMM per kernel offset (the default on the CPU, where it is fastest).
  On the CPU it runs as ``sparse_gemm.planned_conv``: gathers into reused buffers, row sums with ``embedding_bag``
  instead of ``index_add_``, and a backward that gathers each output gradient once for both gradients.
* ``"auto"`` — the above choice.
"""

from __future__ import annotations

import math

import torch

from kiln.ops import sparse_gemm
from kiln.ops._dispatch import backend_for

from .rulebook import Rulebook, is_deterministic

ALGOS = ("auto", "implicit", "gather")


def resolve_algo(algo: str, x: torch.Tensor, triton: bool | None = None) -> str:
    """The path for ``algo`` on ``x`` (``triton``: whether kiln's Triton kernels serve x, if already known)."""
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    if algo != "auto":
        if algo == "gather" and is_deterministic() and x.is_cuda:
            return "implicit"  # CUDA's index_add_ accumulates with atomics
        return algo
    if is_deterministic() and x.is_cuda:
        return "implicit"
    return "implicit" if (backend_for(x) == "triton" if triton is None else triton) else "gather"


def _planned(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def _apply(x: torch.Tensor, w: torch.Tensor, rb: Rulebook, algo: str, bias: torch.Tensor | None,
           triton: bool) -> torch.Tensor:
    """The convolution over ``rb`` of inputs ``sparse_conv`` validated (the kernels' own checks are skipped)."""
    if algo == "gather" and _planned(x, w):
        return sparse_gemm.planned_conv(x, w, rb.plan(sparse_gemm.plan_block_pairs(w.shape[1], w.shape[2])), bias)
    if algo == "implicit":
        src = rb.mirror_source()
        channels = w.shape[1] * w.shape[2]
        if src is not None:  # sum_k x[flip(pm)[r, k]] w[k] = sum_k x[pm[r, k]] w[K-1-k]: the weight read backwards
            order, masks = src.fwd_schedule(channels)
            return sparse_gemm.implicit_gemm_unchecked(x, w, src.pair_fwd(), order, masks, bias, True, triton)
        order, masks = rb.fwd_schedule(channels)
        return sparse_gemm.implicit_gemm_unchecked(x, w, rb.pair_fwd(), order, masks, bias, False, triton)
    return sparse_gemm.gather_gemm_scatter(x, w, rb.in_idx, rb.out_idx, rb.counts, rb.n_out, rb.identity_offset,
                                           bias)


class SparseConvFunction(torch.autograd.Function):
    """y = conv(x, w) + b over ``rb``: x [n_in, Cin], w [K, Cin, Cout] -- or, with ``krsc``, the module's weight
    [Cout, *kernel, Cin] viewed as that inside (autograd then holds no reshape / permute nodes per layer, and the
    weight gradient comes back in the parameter's layout) -- b [Cout] or None -> y [n_out, Cout].

    The bias joins the fp32 accumulator before the output is rounded (once) to the features' dtype."""

    @staticmethod
    def forward(ctx, x, w, b, rb: Rulebook, algo: str, krsc: bool = False, triton: bool = False):
        ctx.rb = rb
        ctx.algo = algo
        ctx.krsc = krsc
        ctx.triton = triton
        ctx.save_for_backward(x, w)
        return _apply(x, _kcc(w) if krsc else w, rb, algo, b, triton)

    @staticmethod
    def backward(ctx, dy):
        x, w_in = ctx.saved_tensors
        w = _kcc(w_in) if ctx.krsc else w_in
        rb = ctx.rb
        dx = dw = None
        dy = dy.contiguous()
        db = dy.float().sum(0).to(dy.dtype) if ctx.needs_input_grad[2] else None
        if ctx.algo == "gather" and _planned(x, w):
            plan_t = rb.swapped().plan(sparse_gemm.plan_block_pairs(w.shape[1], w.shape[2]))
            dx, dw = sparse_gemm.planned_conv_backward(x, w, dy, plan_t, ctx.needs_input_grad[0],
                                                       ctx.needs_input_grad[1])
        else:
            if ctx.needs_input_grad[0]:
                dx = _apply(dy, w.transpose(1, 2), rb.swapped(), ctx.algo, None, ctx.triton)
            if ctx.needs_input_grad[1]:
                lists = rb.compact_pairs() if sparse_gemm.wgrad_from_lists(x.dtype, rb.n_out) else None
                dw = sparse_gemm.weight_grad_unchecked(x, dy, rb.pair_fwd(), lists, ctx.triton)
        if dw is not None and ctx.krsc:
            dw = dw.permute(2, 0, 1).reshape(w_in.shape)  # [K, Cin, Cout] -> the parameter's [Cout, *k, Cin]
        return dx, dw, db, None, None, None, None


def _kcc(w: torch.Tensor) -> torch.Tensor:
    """A KRSC weight [Cout, *kernel, Cin] as the [K, Cin, Cout] view the kernels take."""
    return w.reshape(w.shape[0], -1, w.shape[-1]).permute(1, 2, 0)


def sparse_conv(x: torch.Tensor, w: torch.Tensor, rb: Rulebook, algo: str = "auto",
                bias: torch.Tensor | None = None, krsc: bool = False) -> torch.Tensor:
    """Sparse convolution of features ``x`` [n_in, Cin] with ``w`` [K, Cin, Cout] (any strides; with ``krsc``
    spconv's [Cout, *kernel, Cin]) over ``rb``, plus ``bias`` [Cout] (in x's dtype) added before the output's one
    rounding. The inputs are checked here, once: the kernels behind it (forward and backward) skip their own
    checks."""
    if krsc and (not isinstance(w, torch.Tensor) or w.dim() < 3):
        raise ValueError(f"weight must be spconv's [Cout, *kernel, Cin], got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    sparse_gemm.check_conv_inputs(x, _kcc(w) if krsc else w, bias)
    if x.shape[0] != rb.n_in:
        raise ValueError(f"features has {x.shape[0]} rows but the rulebook expects {rb.n_in}")
    K = math.prod(w.shape[1:-1]) if krsc else w.shape[0]
    if K != rb.kernel_volume:
        raise ValueError(f"weight has {K} kernel offsets but the rulebook has {rb.kernel_volume}")
    triton = backend_for(x) == "triton"
    return SparseConvFunction.apply(x, w, bias, rb, resolve_algo(algo, x, triton), krsc, triton)


def sparse_max_pool(x: torch.Tensor, rb: Rulebook) -> torch.Tensor:
    """Per output voxel, the channel-wise max over the active inputs its window covers (empty sites ignored)."""
    c = x.shape[1]
    out = x.new_full((rb.n_out, c), float("-inf"))
    vals = x.index_select(0, rb.in_idx)  # stays in the autograd graph even with no pairs
    return out.scatter_reduce(0, rb.out_idx.unsqueeze(1).expand(-1, c), vals, "amax", include_self=True)


def sparse_avg_pool(x: torch.Tensor, rb: Rulebook) -> torch.Tensor:
    """Per output voxel, the mean over the active inputs its window covers (spconv's avg pool)."""
    c = x.shape[1]
    acc = torch.zeros(rb.n_out, c, dtype=torch.float32, device=x.device)
    cnt = torch.zeros(rb.n_out, dtype=torch.float32, device=x.device)
    acc = acc.index_add(0, rb.out_idx, x.index_select(0, rb.in_idx).float())
    cnt = cnt.index_add(0, rb.out_idx, torch.ones_like(rb.out_idx, dtype=torch.float32))
    return (acc / cnt.clamp_min(1).unsqueeze(1)).to(x.dtype)
