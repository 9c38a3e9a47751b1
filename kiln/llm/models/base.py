"""What every model family provides to the loader and the runner."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from kiln.llm.config import ModelConfig
from kiln.llm.distributed import TensorParallel


@dataclass(frozen=True)
class ParamTarget:
    """Where one Hugging Face tensor goes: a parameter, optionally one shard of it, optionally transposed."""

    name: str
    shard: str | None = None
    transpose: bool = False


class CausalLM(nn.Module, ABC):
    """Base class: ``forward(input_ids [T], positions [T]) -> hidden [T, H]``; ``compute_logits`` on chosen rows."""

    config: ModelConfig
    tp: "TensorParallel"   # this rank's tensor-parallel group (size 1: the whole model)

    @abstractmethod
    def map_hf_name(self, hf_name: str) -> ParamTarget | None:
        """Target of a checkpoint tensor; None for tensors the model legitimately ignores (buffers)."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] packed tokens of the step's sequences -> final hidden states [T, H]."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @abstractmethod
    def input_embeddings(self) -> nn.Embedding:
        """The token embedding table (tied to the LM head in some checkpoints)."""

    def tie_weights(self) -> None:
        """Share the LM head with the input embedding when the config ties them (``to_empty`` unties). A quantized
        head (``kiln build --quant ...``) holds its own quantized copy of the table: nothing to share."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.input_embeddings().weight

    def init_buffers(self, device: torch.device) -> None:
        """Recompute non-persistent buffers after ``to_empty`` (rotary tables and the like)."""

    def attention_layers(self) -> list[nn.Module]:
        from kiln.llm.layers.attention import PagedAttention

        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def engine_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters to save in an engine directory: tied weights once."""
        sd = {k: v for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd
