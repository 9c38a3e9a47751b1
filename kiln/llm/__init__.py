"""kiln.llm: build engines from Hugging Face checkpoints and run them with a paged KV cache."""

from .build import build_engine, load_model
from .config import EngineConfig, ModelConfig
from .distributed import EngineDeadError
from .engine import LLM, LLMEngine
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineConfig",
           "ModelConfig", "EngineDeadError", "build_engine", "load_model"]
