"""kiln: an LLM engine, 3D sparse convolution, INT8 quantization and PPO on one PyTorch kernel layer."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public API, imported on first use so `import kiln` (and the CLI) stay fast and each subsystem's optional
# dependencies are needed only by those who use it.
_EXPORTS = {
    "LLM": "kiln.llm", "LLMEngine": "kiln.llm", "SamplingParams": "kiln.llm", "RequestOutput": "kiln.llm",
    "build_engine": "kiln.llm",
    "SparseConvTensor": "kiln.sparse",
    "quantize_": "kiln.quant", "Int8Config": "kiln.quant", "calibrate": "kiln.quant", "convert": "kiln.quant",
    "export_onnx": "kiln.quant",
    "PPOConfig": "kiln.rl", "PPOTrainer": "kiln.rl",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
