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


def iter_safetensors(files: list[Path], lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor; ``lazy`` yields ``get_slice`` handles instead, valid until the next item,
    from which the loader reads only the rows its (tensor-parallel) parameter holds."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, (handle.get_slice(name) if lazy else handle.get_tensor(name))
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
            owner = owners[target.name]
            if transform is not None:
                tensor = transform(hf_name, _read_all(tensor))
            if getattr(owner, "tp_slices", None) is not None:
                problem = _load_parallel(owner, target, param, tensor)
                if problem == "unexpected":
                    unexpected.append(hf_name)
                elif problem:
                    misshaped.append(f"{hf_name}: {problem}")
                else:
                    filled[target.name].add(target.shard)
                continue
            tensor = _read_all(tensor)
            if target.transpose:
                tensor = tensor.t()
            dest = param.data
            if target.shard is not None:
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


# ------------------------------------------------------------------------------------------------ sharded reads
def _shape(src) -> tuple[int, ...]:
    return tuple(src.get_shape()) if hasattr(src, "get_shape") else tuple(src.shape)


def _read_all(src) -> torch.Tensor:
    return src[:] if hasattr(src, "get_shape") else src


def _read_rows(src, dim: int, start: int, length: int, transpose: bool) -> torch.Tensor:
    """Rows ``[start, start + length)`` along ``dim`` of the parameter's frame, read from a tensor or a lazy
    safetensors slice (GPT-2's Conv1D weights are stored transposed: the parameter's dim 0 is the file's dim 1)."""
    file_dim = 1 - dim if transpose else dim
    part = src[start:start + length] if file_dim == 0 else src[:, start:start + length]
    return part.t() if transpose else part


def _load_parallel(owner: torch.nn.Module, target: ParamTarget, param: torch.Tensor, src) -> str | None:
    """Copy this rank's slice of checkpoint tensor ``src`` into ``param`` of a tensor-parallel layer.

    Column-parallel layers split every tensor along its rows (weights, biases, quantized weights and scales);
    row-parallel ones split 2-D tensors along their columns (int4's packed bytes and group scales in proportion)
    and replicate 1-D ones, except the bias, which rank 0 alone adds. Returns a problem description or None."""
    dim = owner.tp_dim
    leaf = target.name.rsplit(".", 1)[-1]
    shape = _shape(src)
    if target.transpose:
        shape = shape[::-1]
    data = param.data
    if dim >= data.dim():  # 1-D tensor of a row-parallel layer: replicated
        if target.shard is not None:
            return "unexpected"
        if shape != tuple(data.shape):
            return f"expected {tuple(data.shape)}, got {shape}"
        if leaf == "bias" and owner.tp.rank > 0:
            data.zero_()
        else:
            data.copy_(_read_all(src))
        return None
    slices = owner.tp_slices
    offsets = getattr(owner, "shard_offsets", {})
    # rows of this tensor per row of the layer: 1, or 1/2 for int4's packed bytes, 1/group for its group scales
    num, den = data.shape[dim], sum(s.size for s in slices.values())
    cuts = [v for s in slices.values() for v in (s.start, s.size, s.full)] + [o for o, _ in offsets.values()]
    if any(v * num % den for v in cuts):
        return f"this rank's slice does not fall on whole rows of a {tuple(data.shape)} tensor along dim {dim}"

    def scaled(n: int) -> int:
        return n * num // den

    if target.shard is not None:
        if target.shard not in offsets:
            return "unexpected"
        parts = [(slices[target.shard], offsets[target.shard][0], 0)]
        full = scaled(slices[target.shard].full)
    else:
        parts, file_off = [], 0
        for name, s in slices.items():
            parts.append((s, offsets[name][0] if name is not None else 0, file_off))
            file_off += s.full
        full = scaled(file_off)
    expected = list(data.shape)
    expected[dim] = full
    if shape != tuple(expected):
        if target.transpose:
            return f"expected {tuple(expected)[::-1]}, got {shape[::-1]}"
        return f"expected {tuple(expected)}, got {shape}"
    for s, local_off, file_off in parts:
        dest = data.narrow(dim, scaled(local_off), scaled(s.size))
        valid = scaled(s.valid)
        if valid:
            dest.narrow(dim, 0, valid).copy_(_read_rows(src, dim, scaled(file_off + s.start), valid,
                                                        target.transpose))
        if valid < dest.shape[dim]:
            dest.narrow(dim, valid, dest.shape[dim] - valid).zero_()
    return None
