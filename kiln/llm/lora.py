"""LoRA adapters in peft's format, merged into base weights at build time.

An adapter directory holds ``adapter_config.json`` (r, lora_alpha, use_rslora, target_modules, ...) and
``adapter_model.safetensors`` with ``...<module>.lora_A.weight`` [r, in] and ``...<module>.lora_B.weight`` [out, r].
Merging adds ``weight * scale * B @ A`` (scale = alpha / r, or alpha / sqrt(r) with rsLoRA) to the module's weight
before it is fused, so the engine runs at base-model speed with no adapter at run time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraDelta:
    a: torch.Tensor      # [r, in]
    b: torch.Tensor      # [out, r]
    scale: float
    fan_in_fan_out: bool  # GPT-2's Conv1D stores weights [in, out]


@dataclass
class LoraAdapter:
    path: Path
    weight: float = 1.0
    deltas: dict[str, LoraDelta] = field(default_factory=dict)  # keyed by the base tensor's HF name

    @classmethod
    def load(cls, path: str | Path, weight: float = 1.0) -> "LoraAdapter":
        path = Path(path)
        cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not cfg_file.exists():
            raise FileNotFoundError(f"LoRA adapter {path} has no adapter_config.json")
        if not weights_file.exists():
            raise FileNotFoundError(f"LoRA adapter {path} has no adapter_model.safetensors")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter {path} is {cfg.get('peft_type')!r}, only LORA adapters can be merged")
        if cfg.get("use_dora"):
            raise ValueError(f"adapter {path} uses DoRA, which kiln does not merge")
        if cfg.get("bias", "none") != "none":
            raise ValueError(f"adapter {path} trains biases (bias={cfg['bias']!r}); only bias='none' is supported")
        if cfg.get("modules_to_save"):
            raise ValueError(f"adapter {path} has modules_to_save {cfg['modules_to_save']}; kiln merges LoRA "
                             "deltas only")
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"corrupt adapter weights {weights_file}: {exc}") from exc
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _KEY.match(key)
            if not m:
                raise ValueError(f"unexpected tensor {key!r} in {weights_file} (expected lora_A / lora_B weights)")
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        alpha = float(cfg.get("lora_alpha", 8))
        alpha_pattern = cfg.get("alpha_pattern") or {}
        deltas = {}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"adapter {path}: module {module} has lora_{'A' if 'A' in ab else 'B'} only")
            a, b = ab["A"], ab["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"adapter {path}: module {module} has mismatched shapes lora_A {tuple(a.shape)} "
                                 f"and lora_B {tuple(b.shape)}")
            r = a.shape[0]
            mod_alpha = next((float(v) for k, v in alpha_pattern.items() if module.endswith(k)), alpha)
            scale = mod_alpha / math.sqrt(r) if cfg.get("use_rslora") else mod_alpha / r
            deltas[f"{module}.weight"] = LoraDelta(a, b, scale, bool(cfg.get("fan_in_fan_out", False)))
        if not deltas:
            raise ValueError(f"adapter {path} contains no LoRA weights")
        return cls(path, weight, deltas)


def parse_lora_arg(spec: str) -> tuple[str, float]:
    """'path[:weight]' -> (path, weight)."""
    path, sep, w = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(w)
        except ValueError:
            raise ValueError(f"bad --lora {spec!r}: the weight after ':' must be a number") from None
    return spec, 1.0


class LoraMerger:
    """A ``transform`` for the loader: adds every adapter's delta to the base tensors it targets."""

    def __init__(self, adapters: list[LoraAdapter]):
        self.adapters = adapters
        self.applied: set[tuple[int, str]] = set()

    def __call__(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        merged = None
        for i, adapter in enumerate(self.adapters):
            delta = adapter.deltas.get(hf_name)
            if delta is None:
                continue
            d = delta.b.double() @ delta.a.double()
            if delta.fan_in_fan_out:
                d = d.t()
            if tuple(d.shape) != tuple(tensor.shape):
                raise ValueError(f"adapter {adapter.path}: delta for {hf_name} has shape {tuple(d.shape)} but the "
                                 f"base weight is {tuple(tensor.shape)} (adapter made for another model?)")
            if merged is None:
                merged = tensor.double()
            merged = merged + adapter.weight * delta.scale * d
            self.applied.add((i, hf_name))
        return tensor if merged is None else merged.to(tensor.dtype)

    def check_all_applied(self) -> None:
        for i, adapter in enumerate(self.adapters):
            left = [n for n in adapter.deltas if (i, n) not in self.applied]
            if left:
                raise ValueError(f"adapter {adapter.path} targets tensors the base model does not have: "
                                 f"{', '.join(sorted(left))}")
