"""GPT-2: learned positions, LayerNorm, GELU MLP, MHA with a fused c_attn.

Hugging Face stores GPT-2's projections as Conv1D ([in, out]); they load transposed into nn.Linear ([out, in]).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from kiln.llm.config import ModelConfig
from kiln.llm.distributed import SINGLE, TensorParallel
from kiln.llm.layers.attention import PagedAttention
from kiln.llm.layers.parallel import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

from .base import CausalLM, ParamTarget

_ACTS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh":
         lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


class GPT2Attention(nn.Module):
    """c_attn is column-parallel by head (q, k and v split separately), c_proj row-parallel with one all-reduce."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        h = cfg.hidden_size
        self.tp = tp
        self.num_heads, self.head_dim = cfg.num_heads // tp.size, cfg.head_dim
        self.c_attn = ColumnParallelLinear(h, {"q": h, "k": h, "v": h}, bias=True, tp=tp)
        self.c_proj = RowParallelLinear(h, h, bias=True, tp=tp)
        scale = cfg.head_dim ** -0.5 if cfg.hf_config.get("scale_attn_weights", True) else 1.0
        self.attn = PagedAttention(self.num_heads, self.num_heads, cfg.head_dim, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.c_attn(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        return self.tp.all_reduce(self.c_proj(self.attn(q, k, v)))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        if cfg.hidden_act not in _ACTS:
            raise ValueError(f"unsupported activation_function {cfg.hidden_act!r}; supported: {', '.join(_ACTS)}")
        self.tp = tp
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True, tp=tp)
        self.c_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True, tp=tp)
        self.act = _ACTS[cfg.hidden_act]

    def forward(self, x):
        return self.tp.all_reduce(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, tp)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg, tp)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, tp) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


_CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_MASK_BUFFERS = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


class GPT2LMHeadModel(CausalLM):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config, self.tp = cfg, tp
        self.transformer = GPT2Model(cfg, tp)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, bias=False, tp=tp)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.gather(self.lm_head(hidden))

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def map_hf_name(self, hf_name: str) -> ParamTarget | None:
        if _MASK_BUFFERS.match(hf_name) or (hf_name == "lm_head.weight" and self.config.tie_word_embeddings):
            return None
        name = hf_name if hf_name.startswith(("transformer.", "lm_head.")) else f"transformer.{hf_name}"
        return ParamTarget(name, transpose=bool(_CONV1D.match(name)))
