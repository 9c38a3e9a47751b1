"""In-flight batching under one token budget per step (vLLM v1's scheme).

Every sequence is just "num_tokens - num_computed_tokens still to compute": a fresh prompt, a prompt chunk, a
decode step and a recompute after preemption are all that one number, so chunked prefill, prefix caching and
mixed prefill/decode batches need no separate phases. Running sequences are served first (oldest first), then
waiting ones in arrival order (FCFS). When the KV pool runs dry the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue to be recomputed later.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from .config import EngineConfig
from .kv_cache import BlockManager
from .sequence import Sequence, Status

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        logger.debug("preempted %s (recompute %d tokens)", seq.request_id, seq.num_tokens)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            scheduled = True
            while not self.bm.ensure_capacity(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        if preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.bm.allocate_prefix(seq)
            n = seq.num_tokens - seq.num_computed_tokens
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    if not batch.seqs:  # can never fit: EngineConfig guarantees this does not happen
                        raise RuntimeError(f"prompt of {n} tokens exceeds max_num_batched_tokens={budget} "
                                           "with chunked prefill off")
                    self._release(seq)
                    break
                n = budget
            if not self.bm.ensure_capacity(seq, seq.num_computed_tokens + n):
                self._release(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _release(self, seq: Sequence) -> None:
        """Undo a tentative admission (prefix-cache hits stay cached for the next try)."""
        self.bm.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from either queue and free its blocks."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.bm.free_sequence(seq)
