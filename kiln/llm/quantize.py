"""Quantized engines: the build-time options (``kiln build --quant ... --kv-cache-dtype ...``), calibration on
held-out text, and the hooks that give a loaded engine its quantized modules and KV-cache scales.

Modes (kiln.quant.llm does the per-layer math):
  int8-wo / int4-wo   weight-only (W8A16 / W4A16)
  w8a8                SmoothQuant: per-channel int8 weights, dynamic per-token int8 activations. Per-channel input
                      amax is calibrated over the calibration text; migration strength ``alpha`` (default 0.5).
                      Smoothing of qkv_proj and gate_up_proj folds into the RMSNorm weight in front of them;
                      o_proj and down_proj keep a run-time smoother fused into their activation quantization.
  fp8                 e4m3 per-channel weights, dynamic per-token e4m3 activations.
KV cache (any mode, or none): ``int8`` or ``fp8`` with static per-KV-head scales (``amax / qmax`` of K after
rotary and of V over the calibration text; see kiln/ops/kv_cache.py for why static and per head).

FP8 needs compute capability >= 8.9 on CUDA. The build checks the card it would run on (CUDA device 0 when
one is present) and refuses with a ValueError at build time; a CPU-only build is allowed (the CPU reference
path computes FP8 exactly as the spec says), and loading such an engine on a card without FP8 fails at load.
LM head and embedding (weight-only modes): the LM head is quantized with the body's mode and group size by default
(``lm_head=False`` / ``kiln build --no-quantize-lm-head`` keeps it float): on the Llama-3.1-8B shape a bf16 head is
~22% of the bytes an int4-wo decode step reads and on the 1B shape the tied table is a fifth of all weight bytes,
and the held-out perplexity stays within the mode's bar with it quantized (tests/llm/test_quant_build.py).
The input embedding is quantized by default too (``embedding=False`` / ``--no-quantize-embedding`` keeps it float):
it is only gathered, so this costs no speed, and a bf16 table is 1 GB of the 8B, what kept its int4-wo engine
above 30% of bf16. Untied, it becomes int8 rows with one fp32 scale per row (exact to dequantize). Tied to a
quantized head, it reads the head's own tensors, int8 per row or int4 in groups, so the table is stored once
(``lm_head.*``; bytes per table element: bf16 tied 2; int4 g128 shared 0.54; int8 shared 1). A tied float head
keeps the float table for both (an explicit ``embedding=True`` is then refused). w8a8 / fp8 keep both float.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from kiln.ops.gemm import fp8_supported
from kiln.ops.kv_cache import KV_CACHE_DTYPES

from .context import AttentionContext, set_context

logger = logging.getLogger(__name__)

RUNTIME_SMOOTH = ("*.o_proj", "*.down_proj")  # w8a8 layers with no norm in front: a run-time smoother


@dataclass
class CalibrationConfig:
    """What the calibration forward reads: ``num_samples`` windows of ``seq_len`` tokens at ``offset`` into each
    text (default texts: the bundled model's held-out plays; ``text_files`` replaces them)."""

    num_samples: int = 8
    seq_len: int = 256
    offset: int = 20000
    text_files: tuple[str, ...] = ()

    def validate(self) -> None:
        for name in ("num_samples", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "num_samples" else 2):
                raise ValueError(f"calibration {name} must be a positive int, got {v!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise ValueError(f"calibration offset must be an int >= 0, got {self.offset!r}")


@dataclass
class QuantSpec:
    """The validated quantization options of one build."""

    mode: str | None = None
    group_size: int | None = None
    kv_cache_dtype: str | None = None
    alpha: float = 0.5
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    lm_head: bool = False
    embedding: bool = False

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "w8a8" or self.kv_cache_dtype is not None


def check_build_quant(hf_cfg: dict, quant: str | None, group_size: int | None, kv_cache_dtype: str | None,
                      alpha: float = 0.5, calibration: CalibrationConfig | None = None,
                      quantize_lm_head: bool | None = None, quantize_embedding: bool | None = None) -> QuantSpec:
    """Validate every quantization option before anything is loaded or written (ValueError naming the value).

    ``quantize_lm_head``: None = on for the weight-only modes (off otherwise); ``quantize_embedding``: None = on for
    the weight-only modes, unless the embedding is tied to a float head."""
    from kiln.quant.llm import check_alpha, check_quant_args

    from .config import ModelConfig

    if quant is not None:
        group_size = check_quant_args(quant, group_size)
    elif group_size is not None:
        raise ValueError(f"group_size={group_size!r} needs a quantization mode (quant='int4-wo')")
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; expected one of "
                         f"{', '.join(KV_CACHE_DTYPES)} (or none for the model's float dtype)")
    if quant is not None or kv_cache_dtype is not None:
        family = ModelConfig.from_hf(hf_cfg).family
        if family == "gpt2":
            raise ValueError(f"quantized engines support the Llama-family models (llama, mistral, qwen2, qwen3), "
                             f"not {family}")
    wants_fp8 = [what for what, on in (("quant='fp8'", quant == "fp8"), ("kv_cache_dtype='fp8'",
                                                                          kv_cache_dtype == "fp8")) if on]
    if wants_fp8 and torch.cuda.is_available() and not fp8_supported("cuda"):
        cap = torch.cuda.get_device_capability()
        raise ValueError(f"{' and '.join(wants_fp8)} needs FP8 tensor cores (compute capability >= 8.9: Ada, "
                         f"Hopper); {torch.cuda.get_device_name()} has {cap[0]}.{cap[1]}. Use w8a8 / int8 instead")
    from kiln.quant.llm import WEIGHT_ONLY_MODES

    for what, v in (("quantize_lm_head", quantize_lm_head), ("quantize_embedding", quantize_embedding)):
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{what} must be True or False, got {v!r}")
    weight_only = quant in WEIGHT_ONLY_MODES
    if quantize_lm_head and not weight_only:
        raise ValueError(f"quantize_lm_head needs a weight-only mode (int8-wo / int4-wo), not quant={quant!r}")
    if quantize_embedding and not weight_only:
        raise ValueError(f"quantize_embedding needs a weight-only mode (int8-wo / int4-wo), not quant={quant!r}")
    lm_head = weight_only if quantize_lm_head is None else quantize_lm_head
    tied_float_head = not lm_head and ModelConfig.from_hf(hf_cfg).tie_word_embeddings
    if quantize_embedding and tied_float_head:
        raise ValueError("quantize_embedding with tied embeddings needs the LM head quantized too (a float head "
                         "keeps the float table in the engine anyway); drop --no-quantize-lm-head")
    embedding = weight_only and not tied_float_head if quantize_embedding is None else quantize_embedding
    calibration = calibration or CalibrationConfig()
    calibration.validate()
    return QuantSpec(quant, group_size, kv_cache_dtype, check_alpha(alpha), calibration, lm_head, embedding)


# ------------------------------------------------------------------------------------------------ calibration
class _ObservedLinear(nn.Module):
    """Stands in for a float linear during calibration: records its input's per-channel amax, computes as before
    (not an nn.Linear, so model code calls it instead of reading its weight)."""

    def __init__(self, inner: nn.Linear, name: str):
        super().__init__()
        from kiln.quant.calib import MaxCalibrator

        self.inner = inner
        self.calib = MaxCalibrator(axis=1, name=name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calib.collect(x.reshape(-1, x.shape[-1]))
        return nn.functional.linear(x, self.inner.weight, self.inner.bias)


def calibration_windows(tokenizer_dir, cfg: CalibrationConfig) -> list[list[int]]:
    from pathlib import Path

    from kiln.data.shakespeare import token_windows

    from .tokenizer import Tokenizer

    if not (Path(tokenizer_dir) / "tokenizer.json").exists():
        raise ValueError(f"calibration needs the checkpoint's tokenizer; {tokenizer_dir} has no tokenizer.json")
    tok = Tokenizer(tokenizer_dir)
    texts = None
    if cfg.text_files:
        texts = []
        for f in cfg.text_files:
            p = Path(f)
            if not p.is_file():
                raise ValueError(f"calibration text file {str(p)!r} does not exist")
            texts.append(p.read_text(encoding="utf-8"))
    return token_windows(lambda t: tok.encode(t, add_special_tokens=False), cfg.num_samples, cfg.seq_len,
                         cfg.offset, texts)


@torch.no_grad()
def calibrate(model: nn.Module, windows: list[list[int]], linears: bool = True, kv: bool = True,
              batch: int = 4) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run the float model over ``windows`` (a scratch paged KV cache, one forward per ``batch`` windows).
    Returns (per-input-channel amax of every decoder linear by module name, per-layer (K amax [Hkv], V amax
    [Hkv]) of what the attention layers store)."""
    from kiln.quant.calib import MaxCalibrator

    device = next(model.parameters()).device
    layers = model.attention_layers()
    # 16-bit matmuls are slow on CPUs: calibrate in fp32 there (exact round trip: the float weights come back
    # bit for bit), with the 16-bit model's statistics within one rounding
    widened = _widen_to_fp32(model) if device.type == "cpu" else {}
    observed = {}
    if linears:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and name.startswith("model.layers."):
                obs = _ObservedLinear(mod, name)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, obs)
                observed[name] = obs
    kv_calib = [(MaxCalibrator(axis=1, name=f"layer {i} K"), MaxCalibrator(axis=1, name=f"layer {i} V"))
                for i in range(len(layers))]
    hooks = []
    if kv:
        for attn, (kc, vc) in zip(layers, kv_calib):
            def hook(mod, args, kwargs, out, kc=kc, vc=vc):  # k was rotated in place before the store
                kc.collect(args[1].float())
                vc.collect(args[2].float())
            hooks.append(attn.register_forward_hook(hook, with_kwargs=True))
    saved = [(a.k_cache, a.v_cache) for a in layers]
    try:
        for i in range(0, len(windows), batch):
            _forward_windows(model, windows[i:i + batch], device)
    finally:
        for h in hooks:
            h.remove()
        for (k, v), a in zip(saved, layers):
            a.k_cache, a.v_cache = k, v
        for name, obs in observed.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, obs.inner)
        _restore_dtypes(model, widened)
    act = {name: obs.calib.compute_amax() for name, obs in observed.items()}
    kv_amax = [(kc.compute_amax(), vc.compute_amax()) for kc, vc in kv_calib] if kv else []
    return act, kv_amax


def _widen_to_fp32(model: nn.Module) -> dict[str, torch.dtype]:
    saved = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.dtype in (torch.float16, torch.bfloat16):
            saved[name] = t.dtype
            t.data = t.data.float()
    return saved


def _restore_dtypes(model: nn.Module, saved: dict[str, torch.dtype]) -> None:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, dtype in saved.items():
        tensors[name].data = tensors[name].data.to(dtype)


def _forward_windows(model: nn.Module, windows: list[list[int]], device: torch.device) -> None:
    """One prefill of the windows as a packed batch through a scratch KV cache in the model's dtype."""
    attn0 = model.attention_layers()[0]
    bs = 16
    lens = [len(w) for w in windows]
    nblk = [-(-n // bs) for n in lens]
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    pool = torch.zeros(2, sum(nblk), bs, attn0.num_kv_heads, attn0.head_dim, dtype=dtype, device=device)
    for a in model.attention_layers():  # layers run one after another: one scratch cache serves all
        a.k_cache, a.v_cache = pool[0], pool[1]
    width = max(nblk)
    tables, slots, first = [], [], 0
    for n, nb in zip(lens, nblk):
        table = list(range(first, first + nb))
        tables.append(table + [-1] * (width - nb))
        slots += [table[p // bs] * bs + p % bs for p in range(n)]
        first += nb
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    ctx = AttentionContext(slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                           cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
                           seqlens_k=torch.tensor(lens, dtype=torch.int32, device=device),
                           block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
                           max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    ids = torch.tensor([t for w in windows for t in w], dtype=torch.long, device=device)
    pos = torch.tensor([p for n in lens for p in range(n)], dtype=torch.long, device=device)
    set_context(ctx)
    try:
        model(ids, pos)
    finally:
        set_context(None)


# ------------------------------------------------------------------------------------------------ build
def fold_decoder_norm_gains_(model: nn.Module) -> list[str]:
    """Weight-only modes: every decoder layer's two RMSNorm gains folded into the linears after them
    (``kiln.quant.llm.fold_norm_gains_``), so the engine's decode GEMVs take the norms in their epilogues.
    Returns what was folded (for the engine's config); models without such layers (GPT-2's LayerNorms) fold
    nothing."""
    from kiln.quant.llm import fold_norm_gains_

    from .layers.norm import RMSNorm

    pairs = (("input_layernorm", "self_attn", "qkv_proj"), ("post_attention_layernorm", "mlp", "gate_up_proj"))
    layers = getattr(getattr(model, "model", None), "layers", ())
    folded = []
    for norm_name, block, proj in pairs:
        found = [(getattr(layer, norm_name), getattr(getattr(layer, block), proj)) for layer in layers
                 if isinstance(getattr(layer, norm_name, None), RMSNorm)
                 and isinstance(getattr(getattr(layer, block, None), proj, None), nn.Linear)]
        if found and len(found) == len(layers):
            for norm, lin in found:
                fold_norm_gains_(norm.weight, [lin])
            folded.append(f"{norm_name} -> {proj}")
    return folded


def quantize_for_build_(model: nn.Module, spec: QuantSpec, tokenizer_dir) -> dict:
    """Quantize a loaded float model in place as ``spec`` says (calibrating first where needed); returns the
    engine config entries {"quant": ..., "kv_cache": ...} that ``prepare_engine_model_`` reads back."""
    from kiln.quant.llm import fold_smoothing_into_norm_, quantize_activations_

    from .layers.parallel import quantize_parallel_

    act, kv_amax = {}, []
    calib_info = None
    if spec.needs_calibration:
        windows = calibration_windows(tokenizer_dir, spec.calibration)
        act, kv_amax = calibrate(model, windows, linears=spec.mode == "w8a8", kv=spec.kv_cache_dtype is not None)
        calib_info = {**asdict(spec.calibration), "text_files": list(spec.calibration.text_files),
                      "source": "files" if spec.calibration.text_files else "held-out Shakespeare",
                      "tokens": sum(len(w) for w in windows)}
    quant_entry = None
    if spec.mode in ("int8-wo", "int4-wo"):
        folded = fold_decoder_norm_gains_(model)
        quantize_parallel_(model, spec.mode, spec.group_size, lm_head=spec.lm_head, embedding=spec.embedding)
        quant_entry = {"mode": spec.mode, "group_size": spec.group_size, "lm_head": spec.lm_head,
                       "embedding": False}
        if folded:
            quant_entry["norm_gains_folded"] = folded
        if spec.embedding:  # how it is stored: own int8 rows, or the tied head's table
            quant_entry["embedding"] = model.input_embeddings().stored_as
    elif spec.mode == "w8a8":
        for i, layer in enumerate(model.model.layers):
            p = f"model.layers.{i}."
            fold_smoothing_into_norm_(layer.input_layernorm.weight, [layer.self_attn.qkv_proj],
                                      act[p + "self_attn.qkv_proj"], spec.alpha)
            fold_smoothing_into_norm_(layer.post_attention_layernorm.weight, [layer.mlp.gate_up_proj],
                                      act[p + "mlp.gate_up_proj"], spec.alpha)
        runtime = {n: a for n, a in act.items() if n.endswith((".o_proj", ".down_proj"))}
        quantize_activations_(model, "w8a8", runtime, spec.alpha)
        quant_entry = {"mode": "w8a8", "group_size": None, "lm_head": False, "embedding": False,
                       "weights": "int8 per output channel", "activations": "int8 per token (dynamic)",
                       "smoothquant": {"alpha": spec.alpha,
                                       "folded": ["input_layernorm -> qkv_proj",
                                                  "post_attention_layernorm -> gate_up_proj"],
                                       "runtime_smooth": list(RUNTIME_SMOOTH)},
                       "calibration": calib_info}
    elif spec.mode == "fp8":
        quantize_activations_(model, "fp8")
        quant_entry = {"mode": "fp8", "group_size": None, "lm_head": False, "embedding": False,
                       "weights": "e4m3 per output channel", "activations": "e4m3 per token (dynamic)"}
    kv_entry = None
    if spec.kv_cache_dtype is not None:
        qdtype = KV_CACHE_DTYPES[spec.kv_cache_dtype]
        qmax = 127.0 if qdtype == torch.int8 else 448.0
        scales = [((k / qmax).clamp_min(1e-8), (v / qmax).clamp_min(1e-8)) for k, v in kv_amax]
        attach_kv_scales_(model, spec.kv_cache_dtype, scales)
        kv_entry = {"dtype": spec.kv_cache_dtype, "scales": "static per KV head (amax / qmax)",
                    "calibration": calib_info}
    return {"quant": quant_entry, "kv_cache": kv_entry}


def attach_kv_scales_(model: nn.Module, kv_cache_dtype: str, scales: list[tuple[torch.Tensor, torch.Tensor]]
                      | None = None, device=None) -> None:
    """Give every attention layer ``k_scale`` / ``v_scale`` [Hkv] fp32 buffers (saved in the engine file) and
    the model its KV-cache dtype (the runner allocates the pool in it). ``scales=None``: empty buffers."""
    layers = model.attention_layers()
    for i, attn in enumerate(layers):
        for j, name in enumerate(("k_scale", "v_scale")):
            if scales is None:
                t = torch.empty(attn.num_kv_heads, dtype=torch.float32, device=device)
            else:
                t = scales[i][j].float().reshape(-1).to(device or scales[i][j].device)
            if name in attn._buffers:
                del attn._buffers[name]
            elif hasattr(attn, name):
                delattr(attn, name)
            attn.register_buffer(name, t)
    model.kv_cache_dtype = KV_CACHE_DTYPES[kv_cache_dtype]


# ------------------------------------------------------------------------------------------------ load
def activation_quant(build_info: dict) -> dict | None:
    """The engine's quant entry when it is an activation-quantized mode (w8a8 / fp8), else None."""
    q = (build_info or {}).get("quant")
    return q if q and q.get("mode") in ("w8a8", "fp8") else None


def prepare_engine_model_(model: nn.Module, build_info: dict, device: torch.device) -> None:
    """Before the weights load (model on meta): swap in empty W8A8 / FP8 linears and KV-scale buffers as the
    engine was built. Weight-only modes are handled by the loader itself."""
    from kiln.quant.llm import quantize_activations_

    q = activation_quant(build_info)
    kv = (build_info or {}).get("kv_cache")
    fp8 = [w for w, on in (("fp8 weights", q is not None and q["mode"] == "fp8"),
                           ("an fp8 KV cache", kv is not None and kv["dtype"] == "fp8")) if on]
    if fp8 and device.type == "cuda" and not fp8_supported(device):
        cap = torch.cuda.get_device_capability(device)
        raise ValueError(f"this engine has {' and '.join(fp8)}, which need compute capability >= 8.9; "
                         f"{device} has {cap[0]}.{cap[1]}")
    tp = getattr(model, "tp", None)
    if (q is not None or kv is not None) and tp is not None and getattr(tp, "size", 1) > 1:
        raise ValueError(f"tensor parallelism (size {tp.size}) does not support {q['mode'] if q else 'int8/fp8 KV'} "
                         "engines yet; run this engine on one GPU or build it weight-only (int8-wo / int4-wo)")
    if q is not None:
        runtime = tuple((q.get("smoothquant") or {}).get("runtime_smooth", ()))
        quantize_activations_(model, q["mode"], quantize_weights=False, runtime_smooth=runtime)
    if kv is not None:
        attach_kv_scales_(model, kv["dtype"], None, device=torch.device("meta"))


@torch.no_grad()
def fill_dummy_quant_(model: nn.Module, gen: torch.Generator) -> None:
    """``load_format="dummy"``: random quantized weights of the right dtypes and sane scales (benchmarks of a
    quantized engine's shape need no weight file)."""
    from kiln.quant.llm import Fp8Linear, W8A8Linear

    for mod in model.modules():
        if isinstance(mod, W8A8Linear):
            mod.qweight.copy_(torch.randint(-127, 128, mod.qweight.shape, generator=gen, dtype=torch.int8,
                                            device=gen.device))
            mod.scale.fill_(0.02 * 3 / 127)
            if mod.smooth is not None:
                mod.smooth.fill_(1.0)
        elif isinstance(mod, Fp8Linear):
            mod.qweight.copy_((torch.randn(mod.qweight.shape, generator=gen, device=gen.device) * 100)
                              .clamp(-448, 448).to(mod.qweight.dtype))
            mod.scale.fill_(0.02 / 100)
        if isinstance(mod, (W8A8Linear, Fp8Linear)) and mod.bias is not None:
            mod.bias.zero_()
    if getattr(model, "kv_cache_dtype", None) is not None:
        for attn in model.attention_layers():
            attn.k_scale.fill_(1.0 / 32)
            attn.v_scale.fill_(1.0 / 32)
