"""LLMEngine (add_request / step / abort: the server drives it) and LLM (generate / stream / chat)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from kiln.ops._dispatch import resolve_device

from .build import LoadedModel, load_model, read_config
from .config import EngineConfig, ModelConfig, generation_eos_ids, parse_dtype
from .distributed import (SINGLE, EngineDeadError, TensorParallel, TPWorkers, check_tensor_parallel_size,
                          first_gpu, rank_device)
from .kv_cache import BlockManager
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .runner import ModelRunner
from .sampler import PendingSample, Sampler, SeedStream
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence
from .tokenizer import Tokenizer, detokenize_incrementally

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    finished: bool = False
    touched: bool = False
    deltas: dict[int, tuple[str, list[int]]] = field(default_factory=dict)


@dataclass
class _StepInFlight:
    """A step whose sampled tokens are still on their way to the host (see ``LLMEngine.step``)."""

    batch: ScheduledBatch
    seqs: list[Sequence]           # the sequences that sampled, in the order of ``sample``'s rows
    sample: PendingSample


def default_model_path() -> Path:
    from kiln.models import default_model_path as _default

    return _default()


def _max_model_len(config: EngineConfig, mcfg: ModelConfig) -> int:
    limit = mcfg.max_context
    max_len = config.max_model_len or limit
    if max_len > limit:
        raise ValueError(f"max_model_len ({max_len}) exceeds the model's context ({limit})")
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_len:
        raise ValueError(f"with chunked prefill off, max_num_batched_tokens ({config.max_num_batched_tokens}) "
                         f"must be >= max_model_len ({max_len})")
    return max_len


def build_rank(path: Path, loras, load_format: str, config: EngineConfig, device: torch.device,
               tp: TensorParallel = SINGLE, connect=None) -> tuple[LoadedModel, ModelRunner, int]:
    """This rank's model shard and model runner (KV cache, CUDA graphs); rank 0 and every worker run it.

    ``connect()`` joins the process group, between loading (which needs none) and the runner (which does)."""
    device = rank_device(device, tp.rank)
    dtype = parse_dtype(config.dtype, device)
    if device.type == "cuda" and tp.size > 1:
        torch.cuda.set_device(device)
    loaded = load_model(path, device, dtype, loras, load_format=load_format, tp=tp)
    max_len = _max_model_len(config, loaded.config)
    if connect is not None:
        connect()
    runner = ModelRunner(loaded.model, loaded.config, config, device, dtype, max_len)
    return loaded, runner, max_len


def _stop_tensor_parallel(parts: dict) -> None:
    """Shut a tensor-parallel engine's workers down. CUDA graphs that captured NCCL collectives hold the
    communicator, so rank 0's graphs go first (not while a step still waits on a dead worker: synchronising
    would wait with it)."""
    workers, runner = parts["workers"], parts.get("runner")
    if runner is not None:
        idle = runner.device.type != "cuda" or torch.cuda.current_stream(runner.device).query()
        if workers.error is None or idle:
            runner.release_graphs()
    workers.shutdown()


class LLMEngine:
    def __init__(self, model: str | Path | None = None, tokenizer: str | Path | None = None,
                 loras: list[tuple[str, float]] | None = None, load_format: str = "auto", **engine_kwargs):
        self.config = EngineConfig(**engine_kwargs)
        self.config.validate()
        path = Path(model) if model is not None else default_model_path()
        device = resolve_device(self.config.device)  # a clear error before anything loads
        self.device = rank_device(device, 0)
        self.dtype = parse_dtype(self.config.dtype, device)
        self.workers: TPWorkers | None = None
        tp = SINGLE
        size = self.config.tensor_parallel_size
        if size > 1:  # check everything that can be checked before any process starts
            hf_cfg, _ = read_config(path)
            mcfg = ModelConfig.from_hf(hf_cfg)
            check_tensor_parallel_size(size, mcfg, device)
            _max_model_len(self.config, mcfg)
            if device.type == "cuda":  # rank r on cuda:(first + r)
                device = self.device = torch.device("cuda", first_gpu(device))
            self.workers = TPWorkers(size, str(path), loras, load_format, self.config.to_dict(), device)
            # the finaliser holds the workers (and, once built, the runner), not the engine: it also runs at
            # interpreter exit
            self._tp_parts = {"workers": self.workers}
            self._finalizer = weakref.finalize(self, _stop_tensor_parallel, self._tp_parts)
        try:
            connect = None
            if self.workers is not None:
                tp, connect = TensorParallel(0, size), self.workers.connect_rank0
            loaded, self.runner, max_len = build_rank(path, loras, load_format, self.config, device, tp, connect)
            if self.workers is not None:
                self._tp_parts["runner"] = self.runner
                self.workers.wait_ready(self.runner.num_blocks)
                self.runner.broadcast = self.workers.send_step
        except Exception as exc:
            if self.workers is not None:
                dead = self.workers.error
                self.workers.shutdown(timeout=2.0)
                if dead is not None:
                    raise EngineDeadError(dead) from exc
            raise
        self.model, self.model_config, self.model_path = loaded.model, loaded.config, path
        self.build_info = loaded.build_info
        tok_path = Path(tokenizer) if tokenizer is not None else path
        self.tokenizer = Tokenizer(tok_path) if (tok_path / "tokenizer.json").exists() else None
        mcfg = self.model_config
        self.max_model_len = max_len
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.sampler = Sampler(device, self.config.seed)
        self.requests: dict[str, Request] = {}
        self._in_flight: _StepInFlight | None = None
        auto = self.device.type == "cuda"
        self.async_scheduling = (self.config.async_scheduling if self.config.async_scheduling is not None else auto
                                 ) and self.runner.can_run_ahead()
        self.eos_token_ids = set(mcfg.eos_token_id) | set(generation_eos_ids(path))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "steps_ahead": 0,
                      "finished_requests": 0}

    # --------------------------------------------------------------------------------------- requests
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_path} has no tokenizer; pass prompt_token_ids instead of text")
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(prompt)
        raise TypeError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _check_ids(self, ids) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of ints")
        ids = list(ids)
        if not ids:
            raise ValueError("prompt is empty (no prompt tokens)")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        """Validate and queue a request; raises ValueError/TypeError (naming the problem) and queues nothing."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, which leaves no room to generate within "
                             f"max_model_len={self.max_model_len}")
        longest = min(self.max_model_len, len(ids) + (params.max_tokens or self.max_model_len))
        if self.block_manager.blocks_needed(longest) > self.block_manager.num_blocks:
            raise ValueError(f"a sequence of {longest} tokens needs {self.block_manager.blocks_needed(longest)} KV "
                             f"blocks but the cache has only {self.block_manager.num_blocks}; lower max_tokens or "
                             "give the KV cache more memory")
        if params.max_tokens is not None and params.min_tokens > self.max_model_len - len(ids):
            raise ValueError(f"min_tokens ({params.min_tokens}) cannot fit in the context after a "
                             f"{len(ids)}-token prompt (max_model_len={self.max_model_len})")
        seqs = []
        for i in range(params.n):
            rng = SeedStream(params.seed + i) if params.seed is not None else None
            seqs.append(Sequence(request_id, i, list(ids), len(ids), params, rng))
        req = Request(request_id, text, ids, params, seqs, RequestMetrics(arrival_time or time.time()))
        self.requests[request_id] = req
        for s in seqs:
            self.scheduler.add(s)
        self.stats["prompt_tokens"] += len(ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it is unknown or already finished."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        req.finished = True
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> dict:
        bm = self.block_manager
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "kv_blocks_used": bm.num_used_blocks, "kv_blocks_total": bm.num_blocks,
                "num_preemptions": self.scheduler.num_preemptions,
                "prefix_cache_hit_tokens": bm.prefix_hits, **self.stats}

    # --------------------------------------------------------------------------------------- workers
    def _check_workers(self) -> None:
        if self.workers is not None:
            try:
                self.workers.check()
            except EngineDeadError:
                self.shutdown()  # the others too, and the process group: a new engine can start
                raise

    @contextmanager
    def _worker_errors(self):
        """A step that fails because a worker died (a broken collective) raises EngineDeadError naming it; so does
        one that returned after the monitor aborted its NCCL collectives (its logits cannot be trusted)."""
        try:
            yield
            if self.workers is not None and self.workers.error is not None:
                raise EngineDeadError(self.workers.error)
        except EngineDeadError:
            self.shutdown()
            raise
        except Exception as exc:
            if self.workers is None:
                raise
            try:
                self.workers.check(wait=5.0)
            except EngineDeadError as dead:
                self.shutdown()
                raise dead from exc
            raise

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (also done at garbage collection and interpreter exit)."""
        if self.workers is not None:
            _stop_tensor_parallel(self._tp_parts)

    # --------------------------------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and return outputs of every request that progressed.

        With ``async_scheduling`` (default on CUDA) decode steps run one step ahead of the host, as vLLM's and
        SGLang's overlapped schedulers do: a decode step's tokens are left on the device, and the next call queues
        the following step, fed those tokens on the device, before it reads them. The GPU then no longer idles
        while the host reads tokens, detokenizes, checks stop conditions and packs the next step (0.16-0.30 ms a
        step on an H100). Outputs therefore arrive one call after their step ran; a step that finished a sequence
        by EOS or a stop string also ran one wasted row for it."""
        self._check_workers()
        if self._in_flight is not None:
            return self._step_ahead()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        banned = [self._banned(s) for s in batch.seqs]
        with self._worker_errors():
            # decode steps sample every row; plain-greedy ones take the argmax inside the decode graph
            greedy = all(n == 1 for n in batch.num_new_tokens) and self.sampler.plain_greedy(
                [s.params for s in batch.seqs], banned)
            result = self.runner.execute(batch, greedy=greedy)
            if self.workers is not None and self.device.type == "cuda":
                self.workers.wait_for_device(self.device)  # a dead worker raises here, not in a stuck sync
        self._account(batch)
        if not result.sample_rows:
            return self._collect_outputs(batch)
        seqs = [batch.seqs[r] for r in result.sample_rows]
        # sampling reads the logits on the host: on CUDA that is where a dead rank's collective shows up
        with self._worker_errors():
            pending = self.sampler.sample(result.logits, [s.params for s in seqs],
                                          [(s.token_ids, s.num_prompt_tokens) for s in seqs],
                                          [s.rng for s in seqs], [banned[r] for r in result.sample_rows],
                                          result.tokens)
            step = _StepInFlight(batch, seqs, pending)
            if result.decode and self.async_scheduling:
                self._in_flight = step
                return []
            return self._complete(step)

    def _step_ahead(self) -> list[RequestOutput]:
        """Queue the next decode step if it is the in-flight one's batch again, then read the in-flight step."""
        prev = self._in_flight
        self._in_flight = None
        nxt = None
        if self._can_run_ahead(prev.seqs):
            params = [s.params for s in prev.seqs]
            none_banned = [[] for _ in prev.seqs]  # _can_run_ahead: no sequence has a ban this step
            result = self.runner.execute_ahead(prev.seqs, prev.sample.tokens,
                                               greedy=self.sampler.plain_greedy(params, none_banned))
            batch = ScheduledBatch(list(prev.seqs), [1] * len(prev.seqs))
            self.stats["steps_ahead"] += 1
            nxt = _StepInFlight(batch, batch.seqs, self.sampler.sample(
                result.logits, params, [(s.token_ids, s.num_prompt_tokens) for s in prev.seqs],
                [s.rng for s in prev.seqs], none_banned, result.tokens))
        outputs = self._complete(prev)
        if nxt is not None:
            # the next step's bookkeeping needs this step's tokens (full blocks are hashed by their token ids)
            self._account(nxt.batch)
            self._in_flight = nxt
        return outputs

    def _can_run_ahead(self, seqs: list[Sequence]) -> bool:
        """The next step is exactly these sequences, one decode token each, all sampled on the device: nothing is
        waiting to be admitted, no sequence can finish by length on its in-flight token (those are known now),
        none needs its token history (penalties) or a ban that depends on the token count, and the KV pool has
        room without preempting anyone."""
        if self.scheduler.waiting or self.scheduler.running != seqs:
            return False
        for seq in seqs:
            p, produced = seq.params, seq.num_output_tokens + 1  # counting the in-flight token
            if (p.needs_penalties() or self._banned(seq, produced) or seq.num_tokens + 1 >= self.max_model_len
                    or (p.max_tokens is not None and produced >= p.max_tokens)):
                return False
        return all(self.block_manager.ensure_capacity(seq, seq.num_computed_tokens + 1) for seq in seqs)

    def _account(self, batch: ScheduledBatch) -> None:
        """The batch's new tokens are in the KV cache: advance each live sequence and register its full blocks."""
        self.stats["steps"] += 1
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.finish_reason is None:  # an in-flight step may have carried a sequence that has since finished
                seq.num_computed_tokens += n
                self.block_manager.register_full_blocks(seq)

    def _complete(self, step: _StepInFlight) -> list[RequestOutput]:
        """Read a step's sampled tokens and apply them (sequences finished or aborted meanwhile are skipped)."""
        with self._worker_errors():
            sampled = step.sample.result()
        now = time.time()
        for j, seq in enumerate(step.seqs):
            if seq.finish_reason is None:
                self._append_token(seq, sampled, j, now)
        return self._collect_outputs(step.batch)

    def _banned(self, seq: Sequence, produced: int | None = None) -> list[int]:
        """Token ids banned from the next sample: EOS and stop ids until ``min_tokens`` outputs (``produced``:
        the count to judge by, default the sequence's)."""
        produced = seq.num_output_tokens if produced is None else produced
        if produced >= seq.params.min_tokens:
            return []
        ids = [] if seq.params.ignore_eos else list(self.eos_token_ids)
        return ids + list(seq.params.stop_token_ids or [])

    def _append_token(self, seq: Sequence, sampled, j: int, now: float) -> None:
        token = sampled.token_ids[j]
        req = self.requests[seq.request_id]
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        seq.token_ids.append(token)
        self.stats["generation_tokens"] += 1
        if sampled.logprobs is not None and seq.logprobs is not None:
            seq.cumulative_logprob += sampled.logprobs[j]
            top_ids, top_vals, rank = sampled.top_logprobs[j]
            entry = {t: Logprob(v, r + 1, self._token_text(t)) for r, (t, v) in enumerate(zip(top_ids, top_vals))}
            entry.setdefault(token, Logprob(sampled.logprobs[j], rank, self._token_text(token)))
            seq.logprobs.append(entry)
        p = seq.params
        prev_len = len(seq.output_text)
        if self.tokenizer is not None and p.detokenize:
            delta, seq.prefix_offset, seq.read_offset = detokenize_incrementally(
                self.tokenizer, seq.token_ids, seq.prefix_offset, seq.read_offset, p.skip_special_tokens)
            seq.output_text += delta
        # stop conditions, in vLLM's order
        if seq.num_output_tokens >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                self._finish(seq, "stop", None)
            elif p.stop_token_ids and token in p.stop_token_ids:
                self._finish(seq, "stop", token)
            elif p.stop_strings:
                self._check_stop_strings(seq, prev_len)
        if seq.finish_reason is None:
            if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
                self._finish(seq, "length", None)
            elif seq.num_tokens >= self.max_model_len:
                self._finish(seq, "length", None)
        if (seq.finish_reason is not None and self.tokenizer is not None and p.detokenize
                and seq.read_offset < seq.num_tokens):
            # flush any bytes held back as an incomplete character
            tail = self.tokenizer.decode(seq.token_ids[seq.prefix_offset:], p.skip_special_tokens)
            head = self.tokenizer.decode(seq.token_ids[seq.prefix_offset:seq.read_offset], p.skip_special_tokens)
            if seq.stop_reason is None or not isinstance(seq.stop_reason, str):
                seq.output_text += tail[len(head):]

    def _token_text(self, token: int) -> str | None:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer is not None else None

    def _check_stop_strings(self, seq: Sequence, prev_len: int) -> None:
        p = seq.params
        longest = max(len(s) for s in p.stop_strings)
        start = max(0, prev_len - longest + 1)
        best = None
        for s in p.stop_strings:
            idx = seq.output_text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is not None:
            idx, s = best
            seq.output_text = seq.output_text[: idx + (len(s) if p.include_stop_str_in_output else 0)]
            self._finish(seq, "stop", s)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _collect_outputs(self, batch: ScheduledBatch) -> list[RequestOutput]:
        touched: dict[str, Request] = {}
        for seq in batch.seqs:
            req = self.requests.get(seq.request_id)
            if req is not None:
                touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            finished = all(s.finish_reason is not None for s in req.seqs)
            kind = req.params.output_kind
            if kind == "final_only" and not finished:
                continue
            completions = [self._completion(seq, kind) for seq in req.seqs]
            req.metrics.num_preemptions = sum(s.num_preemptions for s in req.seqs)
            if finished:
                req.finished = True
                req.metrics.finished_time = time.time()
                self.requests.pop(req.request_id, None)
                self.stats["finished_requests"] += 1
            outputs.append(RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, finished,
                                         num_cached_tokens=max(s.num_cached_tokens for s in req.seqs),
                                         metrics=req.metrics))
        return outputs

    def _completion(self, seq: Sequence, kind: str) -> CompletionOutput:
        holdback = 0
        if seq.finish_reason is None and seq.params.stop_strings:
            holdback = max(len(s) for s in seq.params.stop_strings) - 1
        visible = len(seq.output_text) if seq.finish_reason is not None else max(
            seq.visible_len, len(seq.output_text) - holdback)
        delta = seq.output_text[seq.visible_len:visible]
        seq.visible_len = visible
        start = seq.num_prompt_tokens + seq.num_emitted_tokens
        new_ids = seq.token_ids[start:]
        seq.num_emitted_tokens += len(new_ids)
        if kind == "delta":
            ids = new_ids
            logprobs = seq.logprobs[len(seq.logprobs) - len(new_ids):] if seq.logprobs is not None else None
            text = delta
        else:
            ids = seq.token_ids[seq.num_prompt_tokens:]
            logprobs = list(seq.logprobs) if seq.logprobs is not None else None
            text = seq.output_text[:visible]
        return CompletionOutput(
            index=seq.index, text=text, token_ids=ids,
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None, logprobs=logprobs,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, delta_text=delta,
            delta_token_ids=new_ids)

    # --------------------------------------------------------------------------------------- weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights in memory (Hugging Face names, e.g. a training model's ``named_parameters()``).

        Used by RL to sync the policy into the rollout engine every iteration without a disk round trip. Every
        parameter must be covered. Cached prefixes were computed with the old weights, so the prefix cache is
        dropped; requests in flight keep their (stale) KV and should not span an update.
        """
        self._check_workers()
        tensors = [(n, t.detach()) for n, t in named_tensors]
        self.runner.load_named_tensors(tensors)  # validates every tensor before the workers see any
        if self.workers is not None:
            self.workers.send("update_weights", [(n, t.cpu()) for n, t in tensors])
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        bm = self.block_manager
        for block in bm.blocks:
            if block.ref_count == 0:
                block.hash, block.token_ids = None, ()
        bm.hash_to_block = {h: b for h, b in bm.hash_to_block.items() if bm.blocks[b].hash == h}

    # --------------------------------------------------------------------------------------- scoring
    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Logits at every position of each prompt, computed through the paged-KV path in one packed batch."""
        seqs = [Sequence(f"score-{i}", 0, self._check_ids(p), len(p), SamplingParams(max_tokens=1))
                for i, p in enumerate(prompts)]
        bm = self.block_manager
        try:
            for s in seqs:
                if not bm.ensure_capacity(s, s.num_tokens):
                    raise ValueError("not enough free KV blocks to score these prompts at once")
            batch = ScheduledBatch(seqs, [s.num_tokens for s in seqs])
            self._check_workers()
            with self._worker_errors():
                logits = self.runner.all_logits(batch)
        finally:
            for s in seqs:
                bm.free_sequence(s)
        return list(logits.split([s.num_tokens for s in seqs]))


class LLM:
    """vLLM-style offline API: ``LLM(model).generate(prompts, SamplingParams(...))``.

    ``model`` is a Hugging Face checkpoint directory (built in memory), a kiln engine directory, or None for the
    bundled default model. Engine options (block_size, max_num_seqs, gpu_memory_utilization, ...) are keywords.
    """

    def __init__(self, model: str | Path | None = None, tokenizer: str | Path | None = None, dtype: str = "auto",
                 device: str | None = None, seed: int = 0, **engine_kwargs):
        self.engine = LLMEngine(model, tokenizer, dtype=dtype, device=device, seed=seed, **engine_kwargs)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def _prompts(self, prompts) -> list:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]
        return list(prompts)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = self._prompts(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        # one output per request when it finishes: no per-step copies of growing token lists
        params = [dataclasses.replace(p, output_kind="final_only") if isinstance(p, SamplingParams) else p
                  for p in params]
        ids = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.add_request(None, p, sp))
        except (ValueError, TypeError):
            for rid in ids:  # a rejected prompt rejects the call, leaving the engine as it was
                self.engine.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        pending = set(ids)
        bar = tqdm(total=len(ids), desc="generating", disable=not use_tqdm)
        with bar:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        done[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update(1)
        return [done[r] for r in ids]

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one completion as they are decoded (stop strings never leak into a delta)."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() produces one completion; use n=1")
        rid = self.engine.add_request(None, prompt, params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    if out.outputs[0].delta_text:
                        yield out.outputs[0].delta_text
                    if out.finished:
                        return
        finally:
            self.engine.abort(rid)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Render each conversation with the checkpoint's chat template, then generate."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it cannot render a chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(conv, add_generation_prompt, chat_template)
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def prompt_logits(self, prompts: Iterable[list[int]]) -> list[torch.Tensor]:
        return self.engine.prompt_logits([list(p) for p in prompts])

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.engine.update_weights(named_tensors)

    def shutdown(self) -> None:
        """Stop tensor-parallel workers now instead of at garbage collection or interpreter exit."""
        self.engine.shutdown()
