"""Configs: ModelConfig (what the checkpoint is) and EngineConfig (how we run it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

LLAMA_FAMILY = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
GPT2_FAMILY = {"GPT2LMHeadModel": "gpt2"}
SUPPORTED_ARCHITECTURES = {**LLAMA_FAMILY, **GPT2_FAMILY}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA (fp16 without bf16 support), fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def generation_eos_ids(path: str | Path) -> list[int]:
    """End-of-sequence ids from a checkpoint's ``generation_config.json``: Hugging Face ``generate`` and vLLM stop on
    them too, and models often end a turn with a token other than config.json's ``eos_token_id``."""
    f = Path(path) / "generation_config.json"
    if not f.exists():
        return []
    try:
        eos = json.loads(f.read_text()).get("eos_token_id")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{f} is not valid JSON: {exc}") from exc
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{f}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return ids


@dataclass
class ModelConfig:
    """The model's shape, read from a Hugging Face config.json (any supported family)."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False       # bias on q/k/v (Qwen2; Llama's attention_bias also covers o_proj)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False              # Qwen3: RMSNorm on each head of q and k
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    hf_config: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}; kiln supports: "
                             f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        family = SUPPORTED_ARCHITECTURES[arch]
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if family == "gpt2":
            hidden = cfg["n_embd"]
            heads = cfg["n_head"]
            return cls(architecture=arch, family=family, vocab_size=cfg["vocab_size"], hidden_size=hidden,
                       num_layers=cfg["n_layer"], num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                       intermediate_size=cfg.get("n_inner") or 4 * hidden,
                       max_position_embeddings=cfg["n_positions"], norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                       tie_word_embeddings=cfg.get("tie_word_embeddings", True), attention_bias=True,
                       o_proj_bias=True, mlp_bias=True, hidden_act=cfg.get("activation_function", "gelu_new"),
                       bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos, hf_config=cfg)
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        attn_bias = bool(cfg.get("attention_bias", False))
        sliding = cfg.get("sliding_window") if (family == "mistral" or cfg.get("use_sliding_window")) else None
        return cls(
            architecture=arch, family=family, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"], max_position_embeddings=cfg["max_position_embeddings"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta), rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attn_bias or family == "qwen2", o_proj_bias=attn_bias and family == "llama",
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=family == "qwen3", sliding_window=sliding,
            hidden_act=cfg.get("hidden_act", "silu"), bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos,
            hf_config=cfg)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_hf(json.loads(Path(path).read_text()))

    @property
    def max_context(self) -> int:
        """Longest context the model computes exactly (a sliding window caps it: we attend to all keys)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, int(self.sliding_window))
        return self.max_position_embeddings


@dataclass
class EngineConfig:
    """How to run a model: device, memory for the KV cache and batching limits (vLLM's names)."""

    device: str | None = None
    dtype: str = "auto"
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None   # explicit KV pool size; overrides the utilisation budget
    num_kv_blocks: int | None = None           # explicit block count (tests: force preemption)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    # decode steps queued one ahead of the host's token processing (LLMEngine.step); None: on CUDA, single rank
    async_scheduling: bool | None = None
    seed: int = 0
    tensor_parallel_size: int = 1              # ranks (one GPU each; gloo processes on the CPU); rank 0 schedules

    def validate(self) -> None:
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tp!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")

    def to_dict(self) -> dict:
        return asdict(self)
