"""Llama 2/3, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm): one decoder, differences as config flags.

Module names mirror Hugging Face's, except the fused ``qkv_proj`` and ``gate_up_proj``, so checkpoint tensors map
one-to-one onto parameters (or onto one shard of a fused one).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from kiln.llm.config import ModelConfig
from kiln.llm.distributed import SINGLE, TensorParallel
from kiln.llm.layers.attention import PagedAttention
from kiln.llm.layers.norm import RMSNorm
from kiln.llm.layers.parallel import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding,
                                      kv_replicas, lm_head_logits)
from kiln.ops import rope_cos_sin_cache, silu_and_mul
from kiln.ops.gemm import silu_and_mul_quantize
from kiln.ops.gemv import linear, rms_norm_linear, silu_mul_linear

from .base import CausalLM, ParamTarget


class LlamaAttention(nn.Module):
    """Each tensor-parallel rank holds its q heads and its (possibly replicated) KV heads; o_proj all-reduces."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        d = cfg.head_dim
        self.tp = tp
        replicas = kv_replicas(cfg.num_kv_heads, tp)
        self.num_heads = cfg.num_heads // tp.size
        self.num_kv_heads = cfg.num_kv_heads * replicas // tp.size
        self.head_dim = d
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        full_kv = cfg.num_kv_heads * d
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, {"q": cfg.num_heads * d, "k": full_kv, "v": full_kv},
                                             bias=cfg.attention_bias, tp=tp, replicas={"k": replicas, "v": replicas})
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, bias=cfg.o_proj_bias, tp=tp)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.norm_eps)
            self.k_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, d ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(x), cos_sin)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, cos_sin: torch.Tensor,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """Everything after the qkv projection: q/k norm, rotary + KV store (one launch), attention, o_proj.
        ``residual`` (one rank, a weight-only o_proj): returns ``residual + o_proj(...)``, added in its epilogue."""
        T = qkv.shape[0]
        q = qkv[:, : self.q_size].view(T, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size: self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        o = self.attn(q, k, v, rotary=(positions, cos_sin, True))
        if residual is not None:
            return self.o_proj.fused_forward(o, residual=residual)
        if not isinstance(self.o_proj, nn.Linear):  # weight-only quantized (kiln.quant.llm)
            return self.tp.all_reduce(self.o_proj(o))
        return self.tp.all_reduce(linear(o, self.o_proj.weight, self.o_proj.bias))


class LlamaMLP(nn.Module):
    """Each rank holds its slices of gate and up and the matching columns of down_proj; down_proj all-reduces."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} for {cfg.architecture}; expected 'silu'")
        inter = cfg.intermediate_size
        self.tp = tp
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, {"gate": inter, "up": inter}, bias=cfg.mlp_bias,
                                                 tp=tp)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias=cfg.mlp_bias, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.gate_up_proj, "glu_forward"):  # weight-only quantized: SiLU-and-mul in the GEMV's epilogue
            return self.tp.all_reduce(self.down_proj(self.gate_up_proj.glu_forward(x)))
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """down_proj(silu(gate) * up); float weights fold the activation into the GEMV, activation-quantized ones
        (W8A8, FP8) into the kernel that quantizes their input."""
        quantization = getattr(self.down_proj, "input_quantization", None)
        if quantization is not None:
            q, scale = silu_and_mul_quantize(gate_up.reshape(-1, gate_up.shape[-1]), *quantization())
            y = self.down_proj.forward_quantized(q, scale, gate_up.dtype)
            return self.tp.all_reduce(y.view(*gate_up.shape[:-1], -1))
        if not isinstance(self.down_proj, nn.Linear):  # weight-only quantized (kiln.quant.llm)
            return self.tp.all_reduce(self.down_proj(silu_and_mul(gate_up)))
        return self.tp.all_reduce(silu_mul_linear(gate_up, self.down_proj.weight, self.down_proj.bias))


def _norm_proj(norm: RMSNorm, proj: nn.Module, x: torch.Tensor, residual: torch.Tensor | None):
    """``proj(norm(x, residual))`` (plus the residual sum when given): float projections fold the norm into the
    GEMV; activation-quantized ones (W8A8, FP8) take their input quantized by the norm's kernel; weight-only
    quantized ones fold it into an int8 decode GEMV and run after it otherwise, as any other module does."""
    if isinstance(proj, nn.Linear):
        return rms_norm_linear(x, norm.weight, norm.eps, proj.weight, proj.bias, residual)
    quantization = getattr(proj, "input_quantization", None)
    if quantization is not None:
        out = norm.quantized(x, residual, *quantization())
        y = proj.forward_quantized(out[0], out[1], x.dtype).view(*x.shape[:-1], -1)
        return y if residual is None else (y, out[2].view(x.shape))
    if hasattr(proj, "norm_forward"):  # weight-only quantized: one int8 decode row folds the norm in
        return proj.norm_forward(norm, x, residual)
    if residual is None:  # any other module (a calibration observer)
        return proj(norm(x))
    h, residual = norm(x, residual)
    return proj(h), residual


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, tp)
        self.mlp = LlamaMLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, positions, hidden, residual, cos_sin):
        # each RMSNorm is folded into the projection after it (one GEMV launch at decode; norm + cuBLAS otherwise)
        attn, mlp, ln1, ln2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        if residual is None and self._folded_row(hidden):
            return self._folded_forward(positions, hidden, cos_sin), None
        if residual is None:
            residual = hidden
            qkv = _norm_proj(ln1, attn.qkv_proj, hidden, None)
        else:
            qkv, residual = _norm_proj(ln1, attn.qkv_proj, hidden, residual)
        hidden = attn.attend(positions, qkv, cos_sin)
        if hasattr(mlp.gate_up_proj, "glu_forward"):  # weight-only quantized: the norm kernel, then the MLP
            h, residual = ln2(hidden, residual)
            return mlp(h), residual
        gate_up, residual = _norm_proj(ln2, mlp.gate_up_proj, hidden, residual)
        return mlp.down(gate_up), residual

    def _folded_row(self, hidden: torch.Tensor) -> bool:
        """One decode row through weight-only linears whose norms' gains were folded into them at build (unit
        gains, checked at start-up), on one rank, where that pays (``kiln.quant.llm.takes_folded_decode_layer``):
        the layer can run without norm kernels (``_folded_forward``)."""
        from kiln.quant.llm import takes_folded_decode_layer

        attn, mlp = self.self_attn, self.mlp
        return (hidden.shape[0] == 1 and self.input_layernorm.unit_gain and self.post_attention_layernorm.unit_gain
                and attn.tp.size == 1
                and takes_folded_decode_layer(attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))

    def _folded_forward(self, positions, hidden, cos_sin) -> torch.Tensor:
        """The layer on the residual stream ``hidden`` (the previous layer's down_proj added its residual): each
        norm is the 1 / rms in the next GEMV's epilogue, and o_proj and down_proj add the residual in theirs
        (``kiln.ops.wo_gemm.wo_fused_linear``). Returns the new residual stream."""
        attn, mlp = self.self_attn, self.mlp
        qkv = attn.qkv_proj.fused_forward(hidden, rms_eps=self.input_layernorm.eps)
        h = attn.attend(positions, qkv, cos_sin, residual=hidden)
        act = mlp.gate_up_proj.fused_forward(h, rms_eps=self.post_attention_layernorm.eps, glu=True)
        return mlp.down_proj.fused_forward(act, residual=h)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


_PACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
           "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}
_PACKED_RE = re.compile(r"^(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config, self.tp = cfg, tp
        self.model = LlamaModel(cfg, tp)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, bias=False, tp=tp)
        self.tie_weights()
        rot_dim = cfg.head_dim
        self.register_buffer("cos_sin_cache", torch.empty(cfg.max_position_embeddings, rot_dim), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        cfg = self.config
        self.cos_sin_cache = rope_cos_sin_cache(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                                cfg.rope_scaling, device=device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual, self.cos_sin_cache)
        if residual is None:  # the layers' residual adds were in their GEMVs (``_folded_forward``)
            return self.model.norm(hidden)
        return self.model.norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head_logits(self.lm_head, hidden)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def map_hf_name(self, hf_name: str) -> ParamTarget | None:
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        m = _PACKED_RE.match(hf_name)
        if m:
            fused, shard = _PACKED[m.group(2)]
            return ParamTarget(f"{m.group(1)}.{fused}.{m.group(3)}", shard)
        return ParamTarget(hf_name)
