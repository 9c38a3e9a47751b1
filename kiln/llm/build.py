"""Checkpoint -> engine. ``load_model`` gives a ready model from a Hugging Face checkpoint or an engine directory;
``build_engine`` writes an engine directory (TensorRT-LLM's "build" step): config, fused weights with any LoRA
adapters merged in, and the tokenizer files."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

import kiln
from kiln.ops._dispatch import resolve_device

from .config import ModelConfig, dtype_name, parse_dtype
from .distributed import SINGLE, TensorParallel
from .layers.parallel import quantize_parallel_
from .loader import checkpoint_files, iter_safetensors, load_weights, num_tensors
from .lora import LoraAdapter, LoraMerger
from .models import CausalLM, model_class
from .models.base import ParamTarget
from .quantize import (CalibrationConfig, activation_quant, check_build_quant, fill_dummy_quant_,
                       prepare_engine_model_, quantize_for_build_)
from .tokenizer import TOKENIZER_FILES

logger = logging.getLogger(__name__)
ENGINE_KEY = "kiln_engine"


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    source: Path
    is_engine: bool
    build_info: dict


def read_config(path: str | Path) -> tuple[dict, bool]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json (not a Hugging Face checkpoint or kiln engine)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt config.json in {path}: {exc}") from exc
    return cfg, ENGINE_KEY in cfg


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "auto",
               loras: list[tuple[str, float]] | None = None, show_progress: bool = False,
               load_format: str = "auto", tp: TensorParallel = SINGLE) -> LoadedModel:
    """Instantiate the model on ``device`` without initialising it, then stream the weights in.

    With tensor parallelism (``tp``) the model holds this rank's shard and reads only that from the weight files.

    ``load_format="dummy"`` (as in vLLM) fills the weights with seeded random values instead of reading any
    weight file: benchmarks of a model's shape need only its config.json.
    """
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    path = Path(path)
    device = resolve_device(device)
    hf_cfg, is_engine = read_config(path)
    config = ModelConfig.from_hf(hf_cfg)
    torch_dtype = parse_dtype(dtype, device)
    if is_engine and loras:
        raise ValueError(f"{path} is a built engine; merge LoRA adapters when building it (kiln build --lora)")
    quant = hf_cfg.get(ENGINE_KEY, {}).get("quant") if is_engine else None
    build_info = hf_cfg.get(ENGINE_KEY, {}) if is_engine else {}
    if activation_quant(build_info):  # w8a8 / fp8: kiln.llm.quantize swaps those modules in
        quant = None
    with torch.device("meta"):
        model = model_class(config)(config, tp)
    model = model.to(dtype=torch_dtype)
    prepare_engine_model_(model, build_info, device)  # W8A8 / FP8 linears, KV-cache scales (empty, on meta)
    wo_extra = {"lm_head": bool(quant.get("lm_head")), "embedding": quant.get("embedding") or False} if quant else {}
    if quant and load_format != "dummy":  # empty quantized linears (on meta), filled from the engine's file
        quantize_parallel_(model, quant["mode"], quant.get("group_size"), quantize_weights=False, **wo_extra)
    model = model.to_empty(device=device)
    model.tie_weights()
    model.init_buffers(device)
    if load_format == "dummy":
        if loras:
            raise ValueError("LoRA adapters need real weights (load_format='auto')")
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight") or ".ln_" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        if quant:  # random float weights quantized as the engine's build would
            quantize_parallel_(model, quant["mode"], quant.get("group_size"), **wo_extra)
        fill_dummy_quant_(model, gen)
        model.eval().requires_grad_(False)
        return LoadedModel(model, config, path, is_engine, hf_cfg.get(ENGINE_KEY, {}))
    files = checkpoint_files(path)
    merger = LoraMerger([LoraAdapter.load(p, w) for p, w in loras]) if loras else None
    name_map = (lambda name: ParamTarget(name)) if is_engine else model.map_hf_name
    bar = tqdm(total=num_tensors(files), desc="loading weights", unit="tensor", disable=not show_progress)
    with bar:
        load_weights(model, iter_safetensors(files, lazy=True), name_map, transform=merger, progress=bar)
    if merger is not None:
        merger.check_all_applied()
    model.eval().requires_grad_(False)
    return LoadedModel(model, config, path, is_engine, hf_cfg.get(ENGINE_KEY, {}))


def build_engine(checkpoint: str | Path, output_dir: str | Path, dtype: str = "auto",
                 loras: list[tuple[str, float]] | None = None, show_progress: bool = True,
                 quant: str | None = None, group_size: int | None = None, kv_cache_dtype: str | None = None,
                 smoothquant_alpha: float = 0.5, calibration: CalibrationConfig | None = None,
                 quantize_lm_head: bool | None = None, quantize_embedding: bool | None = None) -> Path:
    """Write an engine directory: config.json (model config + build options + kiln version), model.safetensors
    in the engine's fused layout, tokenizer files.

    ``quant`` ("int8-wo" or "int4-wo", with ``group_size`` 32/64/128 for int4, default 128; "w8a8" SmoothQuant
    with migration strength ``smoothquant_alpha``; "fp8") stores the decoder linears quantized (kiln.quant.llm);
    ``kv_cache_dtype`` ("int8" / "fp8") makes the engine's KV cache quantized with calibrated static scales.
    Calibration (w8a8, KV cache) reads ``calibration``'s text (default: held-out Shakespeare). Weight-only modes
    quantize the LM head and the input embedding as well unless ``quantize_lm_head=False`` /
    ``quantize_embedding=False`` (kiln.llm.quantize says how each is stored, and what tied embeddings cost).
    Every option is validated before anything is loaded or written (kiln.llm.quantize).
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    hf_cfg, is_engine = read_config(checkpoint)
    if is_engine:
        raise ValueError(f"{checkpoint} is already a kiln engine")
    spec = check_build_quant(hf_cfg, quant, group_size, kv_cache_dtype, smoothquant_alpha, calibration,
                             quantize_lm_head, quantize_embedding)
    if dtype == "auto":
        dtype = hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32"
    torch_dtype = parse_dtype(dtype, torch.device("cpu"))
    t0 = time.time()
    loaded = load_model(checkpoint, "cpu", torch_dtype, loras, show_progress=show_progress)
    # validates every layer's dimensions (int4 group size) before anything is written
    entries = quantize_for_build_(loaded.model, spec, checkpoint)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in loaded.model.engine_state_dict().items()}
    save_file(state, str(output_dir / "model.safetensors"))
    for name in TOKENIZER_FILES:
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, output_dir / name)
    for extra in checkpoint.glob("*.model"):  # sentencepiece models some tokenizers keep beside tokenizer.json
        shutil.copy2(extra, output_dir / extra.name)
    cfg = dict(hf_cfg)
    cfg["torch_dtype"] = dtype_name(torch_dtype)
    cfg[ENGINE_KEY] = {
        "kiln_version": kiln.__version__,
        "source": str(checkpoint.resolve()),
        "dtype": dtype_name(torch_dtype),
        "layout": {"fused_qkv": True, "fused_gate_up": loaded.config.family != "gpt2"},
        "quant": entries["quant"],
        "kv_cache": entries["kv_cache"],
        "loras": [{"path": str(Path(p).resolve()), "weight": w} for p, w in (loras or [])],
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "build_seconds": round(time.time() - t0, 3),
    }
    (output_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    logger.info("built engine %s from %s in %.1fs", output_dir, checkpoint, time.time() - t0)
    return output_dir
