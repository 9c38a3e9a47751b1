"""Model runner: owns the KV pool, packs a scheduled batch into flat tensors, runs the model, returns logits."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from kiln.ops import backend_for, gemv
from kiln.ops.argmax import argmax_rows
from kiln.ops.host_copy import copy_words, host_copy_supported

from .config import EngineConfig, ModelConfig
from .context import AttentionContext, set_context
from .models import CausalLM
from .scheduler import ScheduledBatch

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 512 * 2**20


@dataclass
class StepResult:
    logits: torch.Tensor | None    # [S, V] for the sequences that sample this step (None: ``tokens`` given)
    sample_rows: list[int]         # index into batch.seqs of each logits row
    decode: bool = False           # one token per sequence, every row samples
    tokens: torch.Tensor | None = None  # [S] int64 on the device: a greedy decode graph's argmax (see ``_replay``)


@dataclass
class StepInput:
    """One forward's inputs packed on the host: all a tensor-parallel worker receives from rank 0 each step."""

    input_ids: torch.Tensor        # [T] int64 packed new tokens (graph steps: one per sequence)
    positions: torch.Tensor        # [T] int64
    slot_mapping: torch.Tensor     # [T] int64 KV slot of each new token
    seqlens_k: torch.Tensor        # [B] int32 cached + new tokens
    block_tables: torch.Tensor     # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor | None = None   # [B + 1] int32 (eager steps)
    max_seqlen_q: int = 1
    max_seqlen_k: int = 1
    is_decode: bool = False
    logits_idx: torch.Tensor | None = None     # packed rows to compute logits for; None: every row
    graph: bool = False            # a decode step replayed through a captured CUDA graph


def stage_graph_inputs(inp: StepInput, b: int, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                       lens: torch.Tensor, tables: torch.Tensor) -> None:
    """Write a graph decode step's inputs into the (host) buffers its CUDA graph reads, rows ``[0, b)``: the
    step's ``n`` sequences, then padding rows (token 0 at position 0, KV store skipped with slot -1, one key to
    attend through block 0). Table columns past the step's width keep stale ids: the kernel never reads past a
    sequence's length."""
    n, width = inp.block_tables.shape
    ids[:n] = inp.input_ids
    pos[:n] = inp.positions
    slots[:n] = inp.slot_mapping
    lens[:n] = inp.seqlens_k
    tables[:n, :width] = inp.block_tables
    if b > n:
        ids[n:b] = 0
        pos[n:b] = 0
        slots[n:b] = -1
        lens[n:b] = 1
        tables[n:b, :width] = 0


class ModelRunner:
    def __init__(self, model: CausalLM, model_config: ModelConfig, engine_config: EngineConfig,
                 device: torch.device, dtype: torch.dtype, max_model_len: int):
        self.model, self.mcfg, self.ecfg = model, model_config, engine_config
        self.device, self.dtype = device, dtype
        if backend_for(torch.empty(0, device=device)) == "triton":  # a GPU, or KILN_OPS=triton (the interpreter)
            from kiln.quant.llm import interleave_int4_rows_

            # int4 weights in the layout the one-row GEMV streams fastest (kiln.ops.wo_gemm); files keep theirs
            if n := interleave_int4_rows_(model):
                logger.info("int4 weights: %d linears row-interleaved for the GPU's GEMV", n)
        # RMSNorms of unit gain (weight-only engines fold the gains into the linears): decode layers may skip them
        from .layers.norm import RMSNorm

        if n := sum(m.check_unit_gain() for m in model.modules() if isinstance(m, RMSNorm)):
            logger.info("%d RMSNorms of unit gain", n)
        if device.type == "cuda" and (n := self.warm_up_quantized_linears()):
            logger.info("quantized linears: %d prefill-sized calls to compile their GEMMs before serving", n)
        # an int8 / fp8 KV cache (engines built with --kv-cache-dtype; kiln.llm.quantize) or the model's dtype
        self.kv_dtype: torch.dtype = getattr(model, "kv_cache_dtype", None) or dtype
        self.block_size = engine_config.block_size
        self.max_model_len = max_model_len
        self.tp = getattr(model, "tp", None)
        # this rank's KV heads (all of them without tensor parallelism)
        self.num_kv_heads = model.attention_layers()[0].num_kv_heads
        # rank 0 sends each step's inputs to tensor-parallel workers through this (set by the engine)
        self.broadcast: Callable[[StepInput], None] | None = None
        self.num_blocks = self._num_kv_blocks()
        if self.tp is not None and self.tp.size > 1:  # every rank must hold the same number of blocks
            n = torch.tensor([self.num_blocks], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
            self.num_blocks = int(n.item())
        c = model_config
        # One pool for every layer's K and V; each attention layer gets views, never its own allocation.
        self.kv_pool = torch.zeros(2, c.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, c.head_dim,
                                   dtype=self.kv_dtype, device=device)
        for i, attn in enumerate(model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_pool[0, i], self.kv_pool[1, i]
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                    self.kv_pool.numel() * self.kv_pool.element_size() / 2**20)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # the same decode graphs ending in the greedy argmax, written into the next step's input ids (one process)
        self.greedy_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # the PyTorch reference attention reads lengths on the host, which a graph cannot capture: with
        # KILN_OPS=ref the engine runs eagerly
        if device.type == "cuda" and not engine_config.enforce_eager and backend_for(self.kv_pool) == "triton":
            self.capture_decode_graphs()

    def warm_up_token_counts(self) -> list[int]:
        """Row counts that reach every prefill-sized tile of the quantized GEMMs. Their tiles change with M at
        powers of two (kiln.ops.gemm ``fixed_config`` / TMA tiles, ``wo_config``: up to 64 rows, one tile 16, 32
        or 64 rows high), and Triton compiles M = 1, M divisible by 16 and other M apart. So 1, 2, 16, 17, 32 and
        33, then 2^k and 2^k + 1 from 64 up to the step's token budget.

        The small counts are not left to the decode graphs' capture: a prefill of a few rows runs the plain
        linears, not the decode epilogues, and a prefix-cache hit recomputes its last block (up to a block of rows)
        whatever batch sizes the graphs hold. Left out, the first such request compiled three GEMMs on the
        request path (a Llama-3.2-1B int4-wo engine with max_num_seqs=8 on an H200, session 30)."""
        budget = self.ecfg.max_num_batched_tokens
        counts, m = [1, 2, 16, 17, 32, 33], 64
        while m <= budget:
            counts += [m, m + 1]
            m *= 2
        return [c for c in counts if c <= budget]

    def warm_up_quantized_linears(self, token_counts: Iterable[int] | None = None) -> int:
        """Call one quantized linear of each kind (module class and weight shapes; the LM head aside, which a step
        only runs on its sampled rows) on zeros of each of ``token_counts`` rows (default
        ``warm_up_token_counts()``), so the Triton GEMMs compile at start-up and not inside the first mixed batch
        that reaches a new tile: a W8A8 engine's first 157-token step took 0.64 s for its compile on an H200
        (bench/RESULTS.md, session 24). The calls run as a prefill step runs them, under ``gemv.cublas_only()``:
        outside it a call of up to 16 rows takes the decode kernels (the SiLU-and-mul epilogue, the GEMV), which
        the decode graphs compile, and the prefill's variant stayed uncompiled. Returns the number of calls."""
        from kiln.quant.llm import QUANTIZED_MODULES

        head = getattr(self.model, "lm_head", None)
        kinds: dict[tuple, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {}
        for name, mod in self.model.named_modules():
            if isinstance(mod, QUANTIZED_MODULES) and mod is not head:
                # a weight-only gate/up projection runs with the SiLU-and-mul epilogue (the MLPs call glu_forward)
                glu = name.endswith("gate_up_proj") and hasattr(mod, "glu_forward")
                shapes = tuple((n, tuple(t.shape), t.dtype) for n, t in mod.state_dict().items())
                kinds.setdefault((type(mod), glu, shapes), (mod.in_features, mod.glu_forward if glu else mod))
        if not kinds:
            return 0
        counts = list(token_counts) if token_counts is not None else self.warm_up_token_counts()
        with torch.inference_mode(), gemv.cublas_only():
            for k, call in kinds.values():
                for m in counts:
                    call(torch.zeros(m, k, dtype=self.dtype, device=self.device))
        if self.device.type == "cuda":  # the activations' blocks go back before the KV cache is sized
            torch.cuda.empty_cache()
        return len(kinds) * len(counts)

    # ------------------------------------------------------------------------------------------ sizing
    def bytes_per_block(self) -> int:
        c = self.mcfg
        return 2 * c.num_layers * self.block_size * self.num_kv_heads * c.head_dim * self.kv_dtype.itemsize

    def _num_kv_blocks(self) -> int:
        e = self.ecfg
        if e.num_kv_blocks is not None:
            return e.num_kv_blocks
        per_block = self.bytes_per_block()
        if e.kv_cache_memory_bytes is not None:
            budget = e.kv_cache_memory_bytes
        else:
            # never more than max_num_seqs sequences of max_model_len can hold at once: a small model's engine does
            # not take the whole card (a second engine in the process, as the tests build, then still fits)
            need = e.max_num_seqs * -(-self.max_model_len // self.block_size) * per_block
            if self.device.type == "cuda":
                budget = min(self._profile_cuda_budget(), need)
            else:
                budget = min(CPU_DEFAULT_KV_BYTES, need)
        blocks = int(budget // per_block)
        if blocks < 1:
            raise ValueError(f"the KV-cache budget ({budget} bytes) holds no block of {per_block} bytes; raise "
                             "gpu_memory_utilization or kv_cache_memory_bytes, or free the GPU memory other engines "
                             "in this process or other processes hold")
        return blocks

    def _profile_cuda_budget(self) -> int:
        """Peak activation memory of a forward at the full token budget, subtracted from the allowed total."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        tokens = min(self.ecfg.max_num_batched_tokens, self.ecfg.max_num_seqs * self.max_model_len)
        seq_len = min(self.max_model_len, tokens)
        n_seqs = max(1, tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        c = self.mcfg
        tmp = torch.zeros(2, n_seqs * blocks_per_seq, self.block_size, self.num_kv_heads, c.head_dim,
                          dtype=self.kv_dtype, device=self.device)
        layers = self.model.attention_layers()
        for attn in layers:  # every layer shares one scratch cache for the profile run
            attn.k_cache, attn.v_cache = tmp[0], tmp[1]
        ids = torch.zeros(n_seqs * seq_len, dtype=torch.long, device=self.device)
        pos = torch.arange(seq_len, device=self.device).repeat(n_seqs)
        tables = torch.arange(n_seqs * blocks_per_seq, device=self.device, dtype=torch.int32).view(n_seqs, -1)
        slots = (tables[:, :, None] * self.block_size
                 + torch.arange(self.block_size, device=self.device, dtype=torch.int32)).view(n_seqs, -1)
        ctx = AttentionContext(slot_mapping=slots[:, :seq_len].reshape(-1),
                               cu_seqlens_q=torch.arange(0, n_seqs + 1, device=self.device, dtype=torch.int32) * seq_len,
                               seqlens_k=torch.full((n_seqs,), seq_len, device=self.device, dtype=torch.int32),
                               block_tables=tables, max_seqlen_q=seq_len, max_seqlen_k=seq_len)
        set_context(ctx)
        try:
            with torch.inference_mode():
                hidden = self.model(ids, pos)
                self.model.compute_logits(hidden[-n_seqs:])
        finally:
            set_context(None)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del tmp, hidden
        for attn in layers:
            attn.k_cache = attn.v_cache = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = int(total * self.ecfg.gpu_memory_utilization - peak - used_by_others)
        # the pool is one allocation, so it must also fit in what the driver has free beside the activations: memory
        # this process reserved but cannot hand back (an earlier engine's CUDA-graph pool) is not free for it
        return min(budget, free - (peak - before))

    # ------------------------------------------------------------------------------------------ steps
    def pack(self, batch: ScheduledBatch, all_logits: bool = False) -> tuple[StepInput, list[int]]:
        """The batch's packed host inputs, and the rows of ``batch.seqs`` that sample this step."""
        if not all_logits and all(n == 1 for n in batch.num_new_tokens) and all(
                s.num_computed_tokens + 1 == s.num_tokens for s in batch.seqs):
            return self._pack_decode(batch.seqs), list(range(len(batch.seqs)))
        bs = self.block_size
        input_ids, positions, slots, cu, lens, sample_rows, sample_idx = [], [], [], [0], [], [], []
        max_blocks = 1
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            cu.append(cu[-1] + n)
            lens.append(end)
            max_blocks = max(max_blocks, len(table))
            if end == seq.num_tokens:  # this step completes the sequence's known tokens: it samples
                sample_rows.append(row)
                sample_idx.append(cu[-1] - 1)
        tables = [s.block_table + [-1] * (max_blocks - len(s.block_table)) for s in batch.seqs]
        inp = StepInput(
            input_ids=torch.tensor(input_ids, dtype=torch.long), positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.int64), seqlens_k=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32), cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            max_seqlen_q=max(batch.num_new_tokens), max_seqlen_k=max(lens),
            is_decode=all(n == 1 for n in batch.num_new_tokens),
            logits_idx=None if all_logits else torch.tensor(sample_idx, dtype=torch.long))
        return inp, sample_rows

    def _pack_decode(self, seqs: list, ahead: bool = False) -> StepInput:
        """One token per sequence, at position ``num_computed_tokens``, replayed through a CUDA graph when one holds
        the batch; ``ahead``: that token is not on the host yet (a placeholder id, replaced on the device)."""
        bs = self.block_size
        graph = bool(self.graphs) and len(seqs) <= max(self.graphs)
        ids, pos, slots, lens = [], [], [], []
        width = max(len(seq.block_table) for seq in seqs)
        tables = []
        for seq in seqs:
            p = seq.num_computed_tokens
            ids.append(0 if ahead else seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables.append(seq.block_table + [0 if graph else -1] * (width - len(seq.block_table)))
        return StepInput(input_ids=torch.tensor(ids, dtype=torch.long), positions=torch.tensor(pos, dtype=torch.long),
                         slot_mapping=torch.tensor(slots, dtype=torch.int64),
                         seqlens_k=torch.tensor(lens, dtype=torch.int32),
                         block_tables=torch.tensor(tables, dtype=torch.int32),
                         cu_seqlens_q=None if graph else torch.arange(len(seqs) + 1, dtype=torch.int32),
                         max_seqlen_k=max(lens), is_decode=True, graph=graph)

    # ------------------------------------------------------------------------------------------ CUDA graphs
    def graph_batch_sizes(self) -> list[int]:
        m = self.ecfg.max_num_seqs
        sizes = [b for b in (1, 2, 4, 8) if b < m] + list(range(16, m, 16)) + [m]
        return sorted(set(sizes))

    @torch.inference_mode()
    def capture_decode_graphs(self) -> None:
        """One graph per decode batch size, largest first, all in one memory pool; replays pad to a bucket.

        Without tensor parallelism each size also gets a greedy twin (``greedy_graphs``) that ends in the argmax
        and writes the tokens into the graph's own input ids. A plain-greedy decode step (the common serving case,
        ``Sampler.plain_greedy``) then launches nothing but its replay and the tokens' copy to the host: no
        separate argmax launch, no logits copy, and a run-ahead step after it needs no device copy of its input ids.
        Each of those was a launch plus a gap on the GPU, ~36 us of a 0.64 ms Llama-3.2-1B int4 step beyond its
        graph (H100, session 22)."""
        sizes = self.graph_batch_sizes()
        bmax = sizes[-1]
        max_blocks = -(-self.max_model_len // self.block_size)
        dev = self.device
        # the graphs' inputs live in one flat byte buffer (int64: ids | positions | slots, then int32: lens | block
        # tables), filled from a pinned host twin by one asynchronous copy per step instead of five small ones
        n64, n32 = 3 * bmax, bmax * (1 + max_blocks)
        self.g_bytes = torch.zeros(8 * n64 + 4 * n32, dtype=torch.uint8, device=dev)
        self.h_bytes = torch.zeros(8 * n64 + 4 * n32, dtype=torch.uint8, pin_memory=True)
        g_i64, g_i32 = self.g_bytes[:8 * n64].view(torch.long), self.g_bytes[8 * n64:].view(torch.int32)
        h_i64, h_i32 = self.h_bytes[:8 * n64].view(torch.long), self.h_bytes[8 * n64:].view(torch.int32)
        self.g_ids, self.g_pos, self.g_slots = g_i64.view(3, bmax)
        self.g_lens, self.g_tables = g_i32[:bmax], g_i32[bmax:].view(bmax, max_blocks)
        self.h_ids, self.h_pos, self.h_slots = h_i64.view(3, bmax)
        self.h_lens, self.h_tables = h_i32[:bmax], h_i32[bmax:].view(bmax, max_blocks)
        self.g_slots.fill_(-1)
        self.g_lens.fill_(1)
        # the staged inputs go in by a kernel reading the pinned buffer, not the copy engine (kiln.ops.host_copy)
        self.kernel_copies = host_copy_supported(dev)
        self.h_copied = torch.cuda.Event()  # the last step's copies have left the host buffers
        self.h_copied.record(torch.cuda.current_stream(dev))
        self.g_cu = torch.arange(bmax + 1, dtype=torch.int32, device=dev)
        self.g_out = torch.empty(bmax, self.mcfg.vocab_size, dtype=self.dtype, device=dev)  # logits
        pool = torch.cuda.graph_pool_handle()
        greedy_twins = self.tp is None or self.tp.size == 1
        for b in reversed(sizes):
            ctx = AttentionContext(slot_mapping=self.g_slots[:b], cu_seqlens_q=self.g_cu[:b + 1],
                                   seqlens_k=self.g_lens[:b], block_tables=self.g_tables[:b], max_seqlen_q=1,
                                   max_seqlen_k=self.max_model_len, is_decode=True)
            set_context(ctx)
            try:
                # the LM head runs inside the graph too: one replay per decode step, nothing else to launch
                self.g_out[:b] = self.model.compute_logits(self.model(self.g_ids[:b], self.g_pos[:b]))  # warm-up
                self.graphs[b] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graphs[b], pool=pool):
                    self.g_out[:b] = self.model.compute_logits(self.model(self.g_ids[:b], self.g_pos[:b]))
                if greedy_twins:
                    self.greedy_graphs[b] = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self.greedy_graphs[b], pool=pool):
                        logits = self.model.compute_logits(self.model(self.g_ids[:b], self.g_pos[:b]))
                        argmax_rows(logits, out=self.g_ids[:b])
                    del logits
            finally:
                set_context(None)
        torch.cuda.synchronize(dev)
        logger.info("captured %d decode CUDA graphs (batch sizes %s)%s", len(sizes), sizes,
                    ", each with a greedy twin" if greedy_twins else "")

    def release_graphs(self) -> None:
        """Drop the decode CUDA graphs (later steps run eagerly): a graph that captured NCCL collectives keeps
        its communicator busy, and tearing the process group down under it blocks."""
        if self.graphs:
            torch.cuda.synchronize(self.device)
            self.graphs.clear()
            self.greedy_graphs.clear()

    def _replay(self, inp: StepInput, device_ids: torch.Tensor | None = None,
                greedy: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Stage the step's inputs and replay its batch size's graph -> (logits [n, V], None), or with ``greedy``
        (and a greedy twin) (None, tokens [n]): the argmax, left in the graph's input ids for a run-ahead step.
        ``device_ids``: the step's input ids on the device (run-ahead), possibly those very tokens."""
        n = inp.input_ids.shape[0]
        b = next(s for s in sorted(self.graphs) if s >= n)
        stream = torch.cuda.current_stream(self.device)
        self.h_copied.synchronize()  # normally long done: the previous step's results have been read since
        stage_graph_inputs(inp, b, self.h_ids, self.h_pos, self.h_slots, self.h_lens, self.h_tables)
        # the int64 rows (ids only when the host has them), the lengths and the first b table rows
        bmax = self.h_lens.shape[0]
        start = 8 * bmax if device_ids is not None else 0
        used = 8 * 3 * bmax + 4 * (bmax + b * self.h_tables.shape[1])
        if self.kernel_copies:
            copy_words(self.g_bytes[start:used], self.h_bytes[start:used], hold=False)  # h_copied guards reuse
        else:
            self.g_bytes[start:used].copy_(self.h_bytes[start:used], non_blocking=True)
        self.h_copied.record(stream)
        if device_ids is not None and device_ids.data_ptr() != self.g_ids.data_ptr():
            self.g_ids[:n].copy_(device_ids)
        if greedy and b in self.greedy_graphs:
            self.greedy_graphs[b].replay()
            return None, self.g_ids[:n]
        self.graphs[b].replay()
        return self.g_out[:n], None

    @torch.inference_mode()
    def run(self, inp: StepInput) -> torch.Tensor:
        """One forward on this rank (every tensor-parallel rank runs it with the same inputs) -> logits [S, V]."""
        if inp.graph:
            return self._replay(inp)[0]
        dev = self.device
        ctx = AttentionContext(
            slot_mapping=inp.slot_mapping.to(dev, non_blocking=True),
            cu_seqlens_q=inp.cu_seqlens_q.to(dev, non_blocking=True),
            seqlens_k=inp.seqlens_k.to(dev, non_blocking=True),
            block_tables=inp.block_tables.to(dev, non_blocking=True),
            max_seqlen_q=inp.max_seqlen_q, max_seqlen_k=inp.max_seqlen_k, is_decode=inp.is_decode)
        # every input goes to the device before the forward: a host-to-device copy queued behind a tensor-parallel
        # collective waits for it, and one whose peer died would wait forever
        logits_idx = None if inp.logits_idx is None else inp.logits_idx.to(dev, non_blocking=True)
        # the skinny-GEMM kernels are for decode steps; a prefill (even a few rows after a prefix-cache hit) uses cuBLAS
        with nullcontext() if inp.is_decode else gemv.cublas_only():
            set_context(ctx)
            try:
                hidden = self.model(inp.input_ids.to(dev, non_blocking=True),
                                    inp.positions.to(dev, non_blocking=True))
            finally:
                set_context(None)
            if logits_idx is None:
                return self.model.compute_logits(hidden)
            if logits_idx.numel() == 0:
                return hidden.new_empty(0, self.mcfg.vocab_size)
            # index_select, not hidden[idx]: indexing blocked the host behind a collective whose peer had died
            return self.model.compute_logits(hidden.index_select(0, logits_idx))

    def _run_everywhere(self, inp: StepInput) -> torch.Tensor:
        if self.broadcast is not None:
            self.broadcast(inp)
        return self.run(inp)

    def execute(self, batch: ScheduledBatch, greedy: bool = False) -> StepResult:
        """Run the batch. ``greedy``: every row samples by plain argmax (``Sampler.plain_greedy``), so a decode step
        replayed through a greedy graph returns its tokens instead of logits."""
        inp, sample_rows = self.pack(batch)
        decode = inp.is_decode and inp.logits_idx is None
        if greedy and inp.graph and self.broadcast is None:
            with torch.inference_mode():
                logits, tokens = self._replay(inp, greedy=True)
            return StepResult(logits, sample_rows, decode, tokens)
        return StepResult(self._run_everywhere(inp), sample_rows, decode)

    def can_run_ahead(self) -> bool:
        """``execute_ahead`` needs the step's token ids only on this process: no tensor-parallel worker reads them
        from its host."""
        return self.broadcast is None

    def execute_ahead(self, seqs: list, tokens: torch.Tensor, greedy: bool = False) -> StepResult:
        """The decode step after one whose sampled ``tokens`` [len(seqs)] are still on the device (not yet read by
        the host): each sequence feeds that token, copied into the step's input on the device (a greedy graph left
        them there already), so the host can queue this step before it reads the previous one's tokens.
        ``greedy`` as in ``execute``."""
        inp = self._pack_decode(seqs, ahead=True)
        if inp.graph:
            with torch.inference_mode():
                logits, out = self._replay(inp, device_ids=tokens, greedy=greedy)
            return StepResult(logits, list(range(len(seqs))), True, out)
        inp.input_ids = tokens
        return StepResult(self.run(inp), list(range(len(seqs))), True)

    def all_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits at every new token of the batch, [T, V] (parity checks, prompt scoring)."""
        inp, _ = self.pack(batch, all_logits=True)
        return self._run_everywhere(inp)

    def load_named_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors into this rank's shard (``LLMEngine.update_weights``)."""
        from .loader import load_weights

        load_weights(self.model, iter(named_tensors), self.model.map_hf_name)
