"""Turn the step's logits into tokens: penalties, temperature, top-k, top-p, min-p, seeded sampling, logprobs.

Everything runs on the logits' device in batched tensor ops, and a seeded request samples the same tokens whatever
else shares its batch. Sampling draws exactly from p without a host round trip: on the Triton backend (CUDA) one
kernel takes the argmax of the logits plus Gumbel noise that it computes from each row's seed and draw number
(``kiln.ops.argmax.gumbel_argmax_rows``); elsewhere the exponential race (argmax of p / E, E ~ Exp(1)) with a
``torch.Generator`` per seeded request. The two backends draw different numbers for one seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kiln.ops._dispatch import backend_for
from kiln.ops.argmax import argmax_rows, gumbel_argmax_rows
from kiln.ops.host_copy import copy_words, host_copy_supported, whole_words

from .sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; prompt_mask [B, V] bool (token occurs in the prompt); output_counts [B, V] (occurrences in
    the output); per-row penalties [B].

    repetition (CTRL / HF): for tokens seen in prompt or output, divide positive logits by r, multiply negative
    ones by r. presence / frequency (OpenAI): subtract ``presence * [count > 0] + frequency * count`` over output
    tokens.
    """
    seen = prompt_mask | (output_counts > 0)
    r = repetition[:, None]
    penalised = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(seen, penalised, logits)
    counts = output_counts.to(logits.dtype)
    return logits - presence[:, None] * (counts > 0).to(logits.dtype) - frequency[:, None] * counts


def apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (k [B]; k <= 0 or >= V keeps all); ties at the threshold are kept."""
    V = logits.shape[-1]
    k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(-1, (k - 1).long()[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p (p [B])."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs     # probability of strictly more likely tokens
    remove_sorted = mass_before >= p[:, None]
    remove_sorted[:, 0] = False                    # always keep the most likely token
    remove = torch.zeros_like(remove_sorted).scatter(-1, idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely token's (min_p [B])."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


@dataclass(eq=False)
class SeedStream:
    """A seeded request's random numbers: on the Triton backend draw d is a pure function of (seed, d), so the
    stream is only a count; elsewhere a ``torch.Generator`` made on first use and advanced one row per draw."""

    seed: int
    draws: int = 0
    _generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    @property
    def key(self) -> int:
        """The seed's low 64 bits as a signed int64 (the kernel's Philox key)."""
        return ((self.seed & 0xFFFFFFFFFFFFFFFF) ^ 1 << 63) - (1 << 63)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None            # log p(sampled token) under the raw model distribution
    top_logprobs: list[tuple[list[int], list[float], int]] | None  # (top ids, their logprobs, sampled rank)


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """Queue a copy of ``t`` into pinned host memory (no wait): CUDA tensors only; host tensors as they are. Small
    whole-word tensors (the tokens) go by a kernel writing the pinned buffer (``kiln.ops.host_copy``): no
    copy-engine hand-off after a decode step's graph."""
    if t is None or not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    if whole_words(t) and host_copy_supported(t.device):
        copy_words(host, t)
    else:
        host.copy_(t, non_blocking=True)
    return host


class PendingSample:
    """A step's sampled tokens (and logprobs) on their way to the host.

    The copies are queued behind the sampling kernels and an event marks their end, so the engine can queue the
    next decode step (whose input ids are ``tokens``, still on the device) before it waits for these; a plain
    ``.tolist()`` would wait for everything queued on the stream, the next step included."""

    def __init__(self, tokens: torch.Tensor, chosen: torch.Tensor | None = None, ranks: torch.Tensor | None = None,
                 top: tuple[torch.Tensor, torch.Tensor] | None = None, top_counts: list[int] | None = None):
        self.tokens = tokens
        self._host = [_to_host(t) for t in (tokens, chosen, ranks, *(top or (None, None)))]
        self._top_counts = top_counts
        self._event = None
        if tokens.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tokens.device))

    def result(self) -> SampleResult:
        if self._event is not None:
            self._event.synchronize()
        tokens, chosen, ranks, top_vals, top_ids = self._host
        token_list = tokens.tolist()
        if chosen is None:
            return SampleResult(token_list, None, None)
        top = []
        for i, kk in enumerate(self._top_counts):
            top.append((top_ids[i, :kk].tolist() if kk else [], top_vals[i, :kk].tolist() if kk else [],
                        int(ranks[i])))
        return SampleResult(token_list, chosen.tolist(), top)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.host_rng = random.Random(seed)  # keys of unseeded rows on the Triton backend

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 histories: list[tuple[list[int], int]], streams: list[SeedStream | None],
                 banned: list[list[int]]) -> SampleResult:
        """Sample and read the result (see ``sample``)."""
        return self.sample(logits, params, histories, streams, banned).result()

    @staticmethod
    def plain_greedy(params: list[SamplingParams], banned: list[list[int]]) -> bool:
        """Every row takes the argmax of its raw logits (greedy, no logprobs, penalties or banned ids): the common
        serving case, one argmax and one read, which a decode step's CUDA graph can take itself
        (``ModelRunner.execute(greedy=True)``)."""
        return all(p.greedy and p.logprobs is None and not p.needs_penalties() for p in params) and not any(banned)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor | None, params: list[SamplingParams],
               histories: list[tuple[list[int], int]], streams: list[SeedStream | None],
               banned: list[list[int]], tokens: torch.Tensor | None = None) -> PendingSample:
        """logits [B, V] (any float dtype); one entry per row in the lists. ``histories`` holds each row's
        (prompt + output token list, prompt length), read only for penalties (no per-step copies). ``streams``
        are the seeded rows' random streams (None: the engine's), each advanced by one draw. ``banned`` token ids
        get -inf (EOS and stop ids before ``min_tokens``). Queues the work and the copies to the host without
        waiting for them. ``tokens``: a plain-greedy step's argmax, already taken on the device (no ``logits``)."""
        if self.plain_greedy(params, banned):  # the common serving case: one argmax, one read
            return PendingSample(tokens if tokens is not None else argmax_rows(logits))
        if logits is None:
            raise ValueError("sampling these rows needs the step's logits: only plain-greedy rows come as tokens")
        logits = logits.float()
        B, V = logits.shape
        dev = logits.device
        raw_logprobs = None
        want_lp = any(p.logprobs is not None for p in params)
        if want_lp:
            raw_logprobs = logits.log_softmax(dim=-1)

        pen_rows = [i for i, p in enumerate(params) if p.needs_penalties()]
        if pen_rows:
            rows = torch.tensor(pen_rows, device=dev)
            prompt_mask = torch.zeros(len(pen_rows), V, dtype=torch.bool, device=dev)
            counts = torch.zeros(len(pen_rows), V, dtype=torch.int32, device=dev)
            for j, i in enumerate(pen_rows):
                tokens, n_prompt = histories[i]
                if n_prompt:
                    prompt_mask[j, torch.tensor(tokens[:n_prompt], device=dev)] = True
                if len(tokens) > n_prompt:
                    counts[j] = torch.bincount(torch.tensor(tokens[n_prompt:], device=dev), minlength=V)[:V].int()
            pr = [params[i] for i in pen_rows]
            logits[rows] = apply_penalties(
                logits[rows], prompt_mask, counts,
                torch.tensor([p.repetition_penalty for p in pr], device=dev),
                torch.tensor([p.presence_penalty for p in pr], device=dev),
                torch.tensor([p.frequency_penalty for p in pr], device=dev))
        for i, ids in enumerate(banned):
            if ids:
                logits[i, torch.tensor(ids, device=dev)] = float("-inf")

        greedy = torch.tensor([p.greedy for p in params], device=dev)
        tokens = argmax_rows(logits)
        if not bool(all(p.greedy for p in params)):
            temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
            x = logits / temps[:, None]
            if any(p.top_k > 0 for p in params):
                x = apply_top_k(x, torch.tensor([p.top_k for p in params], device=dev))
            if any(p.top_p < 1.0 for p in params):
                x = apply_top_p(x, torch.tensor([p.top_p for p in params], device=dev))
            if any(p.min_p > 0.0 for p in params):
                x = apply_min_p(x, torch.tensor([p.min_p for p in params], device=dev))
            sampled = self._draw(x, params, streams)
            tokens = torch.where(greedy, tokens, sampled)

        for st in streams:
            if st is not None:
                st.draws += 1
        if not want_lp:
            return PendingSample(tokens)
        chosen = raw_logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        ranks = (raw_logprobs > chosen[:, None]).sum(-1) + 1
        k = max(p.logprobs or 0 for p in params)
        top = tuple(raw_logprobs.topk(k, dim=-1)) if k else None
        return PendingSample(tokens, chosen, ranks, top, [p.logprobs or 0 for p in params])

    def _draw(self, x: torch.Tensor, params: list[SamplingParams], streams: list[SeedStream | None]) -> torch.Tensor:
        """One index per row of the tempered, filtered logits ``x`` [B, V], drawn from softmax(x)."""
        if backend_for(x) == "triton":
            rng = self.host_rng
            keys = [rng.getrandbits(64) - (1 << 63) if st is None else st.key for st in streams]
            draws = [0 if st is None else st.draws & 0xFFFFFFFF for st in streams]
            kd = torch.tensor([keys, draws], dtype=torch.int64).to(x.device, non_blocking=True)
            return gumbel_argmax_rows(x, kd[0], kd[1])
        probs = x.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, st in enumerate(streams):
            if st is not None and not params[i].greedy:
                noise[i].exponential_(generator=st.generator(x.device))
        return argmax_rows(probs / noise)
