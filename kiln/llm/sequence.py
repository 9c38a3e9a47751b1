"""One generated sample: its tokens, progress through the model, KV blocks and detokenisation state."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from .outputs import Logprob
from .sampler import SeedStream
from .sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int                       # which of the request's n samples
    token_ids: list[int]             # prompt + generated
    num_prompt_tokens: int
    params: SamplingParams
    rng: SeedStream | None = None     # a seeded sample's random stream (None: the engine's)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    num_computed_tokens: int = 0     # tokens whose K/V are in the cache
    num_cached_tokens: int = 0       # of those, how many came from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks registered so far
    num_preemptions: int = 0
    # output state
    output_text: str = ""
    visible_len: int = 0             # chars of output_text already handed to the caller (stream deltas)
    num_emitted_tokens: int = 0      # output tokens already handed out (delta outputs)
    prefix_offset: int = 0           # incremental detokenisation window (token indices into token_ids)
    read_offset: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def __post_init__(self):
        self.read_offset = self.num_prompt_tokens
        self.prefix_offset = max(self.num_prompt_tokens - 6, 0)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
