"""Checkpoint tensors -> model parameters, one tensor at a time.

Tensors are read with ``safetensors.safe_open`` one by one and copied straight into their (possibly fused)
parameter, so the host never holds a second full copy of the model. Every missing, unexpected or mis-shaped
tensor is collected and reported in one error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from .models.base import CausalLM, ParamTarget

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or sharded with an index)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    index = path / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"corrupt safetensors index {index}: {exc}") from exc
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index.name} names shard files that do not exist: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    raise FileNotFoundError(f"no model.safetensors (or {SAFETENSORS_INDEX}) in {path}")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except SafetensorError as exc:
            raise ValueError(f"corrupt weight file {f}: {exc}") from exc
        except OSError as exc:
            raise ValueError(f"cannot read weight file {f}: {exc}") from exc


def num_tensors(files: list[Path]) -> int:
    total = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                total += len(list(handle.keys()))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"corrupt weight file {f}: {exc}") from exc
    return total


def load_weights(model: CausalLM, tensors: Iterator[tuple[str, torch.Tensor]],
                 name_map: Callable[[str], ParamTarget | None],
                 transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                 progress=None) -> None:
    """Copy ``tensors`` into ``model``'s parameters through ``name_map``; raise ValueError listing all problems.

    ``transform(name, tensor)`` may rewrite a checkpoint tensor first (the LoRA merge does).
    """
    params = dict(model.named_parameters())
    # persistent buffers are weights too (the quantized tensors of weight-only linears); non-persistent ones
    # (rotary tables) are not in state_dict and are never loaded
    persistent = set(model.state_dict(keep_vars=True))
    params.update((n, b) for n, b in model.named_buffers() if n in persistent)
    owners = {name: _owner(model, name) for name in params}
    filled: dict[str, set] = {name: set() for name in params}
    unexpected, misshaped = [], []
    with torch.no_grad():
        for hf_name, tensor in tensors:
            if progress is not None:
                progress.update(1)
            target = name_map(hf_name)
            if target is None:
                continue
            param = params.get(target.name)
            if param is None:
                unexpected.append(hf_name)
                continue
            if transform is not None:
                tensor = transform(hf_name, tensor)
            if target.transpose:
                tensor = tensor.t()
            dest = param.data
            if target.shard is not None:
                owner = owners[target.name]
                if target.shard not in getattr(owner, "shard_offsets", {}):
                    unexpected.append(hf_name)
                    continue
                dest = owner.shard_view(param, target.shard)
            if tuple(dest.shape) != tuple(tensor.shape):
                expected = tuple(dest.shape) if not target.transpose else tuple(dest.shape)[::-1]
                got = tuple(tensor.shape) if not target.transpose else tuple(tensor.shape)[::-1]
                misshaped.append(f"{hf_name}: expected {expected}, got {got}")
                continue
            dest.copy_(tensor)
            filled[target.name].add(target.shard)
    missing = []
    for name, shards in filled.items():
        if None in shards:  # loaded whole (engine directories store fused tensors)
            continue
        owner = owners[name]
        expected = set(getattr(owner, "shard_offsets", {})) if _is_sharded(owner, name) else {None}
        for shard in sorted(expected - shards, key=str):
            missing.append(name if shard is None else f"{name} (shard {shard!r})")
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {'; '.join(misshaped)}")
    if problems:
        raise ValueError("checkpoint does not match the model: " + " | ".join(problems))


def _owner(model: torch.nn.Module, param_name: str) -> torch.nn.Module:
    module_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    return model.get_submodule(module_name)


def _is_sharded(owner: torch.nn.Module, param_name: str) -> bool:
    return bool(getattr(owner, "shard_offsets", None)) and param_name.rsplit(".", 1)[-1] in ("weight", "bias")
