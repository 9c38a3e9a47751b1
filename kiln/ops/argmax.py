"""Row-wise argmax over a wide last dim: the greedy sampler's one op per decode step, and with Gumbel noise from a
per-row seeded counter-based generator the random sampler's.

``torch.argmax`` over one row of 128K logits ran as a single reduction kernel of 28 us on an H100 (session 9
probe of a Llama-3.2-1B batch-1 decode step, ~2% of the step) for 256 KB of reads. Here each row is cut into
chunks read by separate programs; each writes its chunk's (max, first index), and the last program of the row (a
counter per row, ``_counters``) merges them. Same answer as ``torch.argmax``: the first index of the maximum, NaN
counting as the largest value.

``gumbel_argmax_rows`` samples each row of logits: the argmax of ``x + g`` with ``g = -log(-log u)`` draws index v
with probability softmax(x)_v (the Gumbel-max trick, the exponential race in another form). ``u`` comes from
Philox-4x32-10 keyed by the row's 64-bit seed, with counter (column, draw): a seeded request's draw d is the same
numbers whatever rows share its batch, which per-request ``torch.Generator`` calls gave only at one launch per row
and step (half of an RL rollout's host time on a small model, ``scripts/gpu/ppo_train_profile.py``). The numbers
are computed in the kernel, so there is no noise tensor; ``philox_uniform_reference`` is the same generator in
torch integer ops (the kernel's reference and test oracle).
"""

from __future__ import annotations

import torch

from ._counters import last_to_arrive, rearm, split_counters
from ._dispatch import FLOAT_DTYPES, backend_for, check_tensor, pdl_launch_args
from ._triton import cdiv, next_power_of_2, tl, triton

CHUNK = 8192  # elements per program: 16 KB of bf16, 64 per thread at 4 warps


def argmax_rows(x: torch.Tensor, chunk: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for x [B, V] (fp32 / fp16 / bf16) -> [B] int64, written into ``out`` when given (a
    decode graph writes the tokens straight into its next step's input ids)."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    B, V = x.shape
    if V == 0:
        raise ValueError("argmax_rows needs a non-empty last dim")
    if out is not None:
        check_tensor("out", out, ndim=1, dtypes=(torch.int64,), device=x.device)
        if out.shape[0] != B or out.stride(0) != 1:
            raise ValueError(f"out must be a contiguous [{B}] int64 tensor, got shape {tuple(out.shape)}")
    counters = split_counters(x.device, B) if B and backend_for(x) == "triton" else None
    if counters is None:
        return torch.argmax(x, dim=-1, out=out) if out is not None else x.argmax(dim=-1)
    return _argmax_triton(x, counters, chunk, out=out)


@triton.jit
def _first_max(v, idx, ok, BIG: tl.constexpr):
    """(max, first index of it) over a 1D block, NaN above everything; masked-off entries never win."""
    nan = (v != v) & ok
    any_nan = tl.max(nan.to(tl.int32), 0) > 0
    m = tl.max(tl.where(ok & ~nan, v, float("-inf")), 0)
    hit = tl.where(any_nan, nan, ok & (v == m))
    first = tl.min(tl.where(hit, idx, BIG), 0)
    return tl.where(any_nan, float("nan"), m), first


@triton.jit
def _uniform(seed, draw, cols):
    """Philox-4x32-10 (key ``seed``, counter (column, draw, 0, 0)), first word, to a float in (0, 1): its top 24
    bits plus one half, times 2**-24 (exact in fp32, never 0 or 1)."""
    c0 = cols.to(tl.uint32)
    zero = c0 * 0
    r, _, _, _ = tl.philox(seed, c0, zero + draw.to(tl.uint32), zero, zero)
    return ((r >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def _argmax_kernel(X, PV, PI, CNT, OUT, V, sx, SEED, DRAW, NCHUNK: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK_C: tl.constexpr, GUMBEL: tl.constexpr, PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ok = offs < V
    if PDL:  # the logits are the previous kernel's output (the LM head, in a decode graph)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    v = tl.load(X + row * sx + offs, mask=ok, other=float("-inf")).to(tl.float32)
    if GUMBEL:
        u = _uniform(tl.load(SEED + row), tl.load(DRAW + row), offs)
        v = v - tl.log(-tl.log(u))
    m, first = _first_max(v, offs, ok, 2147483647)
    if NCHUNK == 1:
        tl.store(OUT + row, first.to(tl.int64))
    else:
        tl.store(PV + row * NCHUNK + c, m)
        tl.store(PI + row * NCHUNK + c, first)
        if last_to_arrive(CNT + row, NCHUNK):  # the row's last chunk merges them all
            j = tl.arange(0, BLOCK_C)
            j_ok = j < NCHUNK
            pv = tl.load(PV + row * NCHUNK + j, mask=j_ok, other=float("-inf"), cache_modifier=".cg")
            pi = tl.load(PI + row * NCHUNK + j, mask=j_ok, other=2147483647, cache_modifier=".cg")
            _, best = _first_max(pv, pi, j_ok, 2147483647)
            tl.store(OUT + row, best.to(tl.int64))
            rearm(CNT + row)


def _argmax_triton(x: torch.Tensor, counters: torch.Tensor, chunk: int | None = None,
                   seeds: torch.Tensor | None = None, draws: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    B, V = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    chunk = chunk or min(CHUNK, max(16, next_power_of_2(V)))
    nchunk = cdiv(V, chunk)
    out = torch.empty(B, dtype=torch.int64, device=x.device) if out is None else out
    pv = torch.empty(B, nchunk, dtype=torch.float32, device=x.device)
    pi = torch.empty(B, nchunk, dtype=torch.int32, device=x.device)
    gumbel = seeds is not None
    _argmax_kernel[(B, nchunk)](x, pv, pi, counters, out, V, x.stride(0), seeds if gumbel else out,
                                draws if gumbel else out, NCHUNK=nchunk, CHUNK=chunk,
                                BLOCK_C=max(2, next_power_of_2(nchunk)), GUMBEL=gumbel, num_warps=4,
                                **pdl_launch_args())
    return out


# ----------------------------------------------------------------------------------------------- sampling
_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the constant ``a`` and uint32 values held in int64 ``b``,
    through 16-bit halves of ``b`` so that no int64 product overflows."""
    p0 = a * (b & 0xFFFF)
    p1 = a * (b >> 16)
    mid = p0 + ((p1 & 0xFFFF) << 16)
    return (p1 >> 16) + (mid >> 32), mid & _M32


def philox_uniform_reference(seeds: torch.Tensor, draws: torch.Tensor, V: int) -> torch.Tensor:
    """The kernel's uniforms in torch integer ops: [B, V] float32 for int64 ``seeds`` [B] and ``draws`` [B]."""
    dev = seeds.device
    k0 = (seeds & _M32)[:, None]
    k1 = ((seeds >> 32) & _M32)[:, None]
    c0 = torch.arange(V, dtype=torch.int64, device=dev)[None, :].expand(len(seeds), V)
    c1 = (draws & _M32)[:, None].expand(len(seeds), V)
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return ((c0 >> 8).to(torch.float32) + 0.5) * 2.0 ** -24


def gumbel_argmax_reference(x: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """``gumbel_argmax_rows`` in torch ops (slow: ~300 integer ops over [B, V]; the oracle, not a fallback)."""
    u = philox_uniform_reference(seeds, draws, x.shape[1])
    return (x.float() - (-u.log()).log()).argmax(dim=-1)


def gumbel_argmax_rows(x: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Sample one index per row of logits ``x`` [B, V] (already tempered and filtered; -inf never wins) with the
    noise of ``seeds`` [B] (int64; any 64-bit pattern) at draw number ``draws`` [B] (int64, < 2**32): one launch
    for the whole batch. Needs the Triton backend (CUDA, or ``KILN_OPS=triton`` under the interpreter); the CPU
    sampler keeps its per-request generators, since the reference costs far more there than they do."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    B, V = x.shape
    for name, t in (("seeds", seeds), ("draws", draws)):
        check_tensor(name, t, ndim=1, dtypes=[torch.int64], device=x.device)
        if t.shape[0] != B:
            raise ValueError(f"{name} must hold one entry per row of x ({B}), got {t.shape[0]}")
    if V == 0:
        raise ValueError("gumbel_argmax_rows needs a non-empty last dim")
    if backend_for(x) != "triton":
        raise ValueError("gumbel_argmax_rows runs on the Triton backend only (a CUDA tensor, or KILN_OPS=triton)")
    if B == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    counters = split_counters(x.device, B)
    if counters is None:
        raise ValueError("gumbel_argmax_rows: no split counters while a CUDA graph is being captured; run it once "
                         "eagerly first")
    return _argmax_triton(x, counters, None, seeds.contiguous(), draws.contiguous())


def _doctor_argmax(device, dtype, g):
    """Ties (the first index must win) and a maximum in the last chunk, against torch.argmax."""
    x = torch.randn(5, 20000, device=device, dtype=dtype, generator=g)
    x[1, 9000] = x[1, 17] = 100.0
    x[2, 19999] = 100.0
    if backend_for(x) != "triton":
        return 0.0, "ref"
    got = _argmax_triton(x, split_counters(x.device, 5))
    return float((got != x.argmax(dim=-1)).sum().item()), "triton"


DOCTOR_CHECKS = {"argmax_rows": _doctor_argmax}
