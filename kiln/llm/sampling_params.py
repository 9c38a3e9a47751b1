"""SamplingParams with vLLM's field names, validated when constructed."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                  # -1 or 0: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16      # None: up to the model's context
    min_tokens: int = 0
    logprobs: int | None = None      # top-k log-probabilities per generated token (plus the sampled one)
    skip_special_tokens: bool = True
    detokenize: bool = True          # False: token ids only (benchmarks, RL rollouts); stop strings need text
    # vLLM's RequestOutputKind: "cumulative" (all tokens so far, every step), "delta" (only what is new) or
    # "final_only" (one output when the request finishes; what LLM.generate uses, so long outputs cost O(n))
    output_kind: str = "cumulative"
    stop_strings: list[str] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self):
        def number(name, value, kind=(int, float)):
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            number(name, getattr(self, name))
        for name in ("n", "top_k", "min_tokens"):
            number(name, getattr(self, name), int)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None:
            number("max_tokens", self.max_tokens, int)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.seed is not None:
            number("seed", self.seed, int)
        if self.logprobs is not None:
            number("logprobs", self.logprobs, int)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_strings = list(self.stop)
        else:
            raise TypeError(f"stop must be a string or a list of strings, got {type(self.stop).__name__}"
                            + (f" containing {type(next(s for s in self.stop if not isinstance(s, str))).__name__}"
                               if isinstance(self.stop, (list, tuple)) else ""))
        if self.output_kind not in ("cumulative", "delta", "final_only"):
            raise ValueError(f"output_kind must be 'cumulative', 'delta' or 'final_only', got {self.output_kind!r}")
        if self.stop_strings and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")
        if any(s == "" for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
                raise TypeError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")
            self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
