"""Model code, one forward per family; ``build_model`` picks the class for a config."""

from __future__ import annotations

from kiln.llm.config import ModelConfig

from .base import CausalLM
from .gpt2 import GPT2LMHeadModel
from .llama import LlamaForCausalLM


def model_class(config: ModelConfig) -> type[CausalLM]:
    return GPT2LMHeadModel if config.family == "gpt2" else LlamaForCausalLM


__all__ = ["CausalLM", "GPT2LMHeadModel", "LlamaForCausalLM", "model_class"]
