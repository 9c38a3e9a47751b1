"""The workflow, torchao style: ``quantize_`` -> ``calibrate`` -> (QAT fine-tune) -> ``convert`` / ``export_onnx``.

    model = kiln.quant.quantize_(model, Int8Config(skip=("head",)))   # swap layers in place
    kiln.quant.calibrate(model, loader, method="entropy")             # PTQ: set every amax
    int8_model = kiln.quant.convert(model)                            # real INT8 execution
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from typing import Iterable

import torch
import torch.nn as nn

from .calib import METHODS
from .int8 import Int8ConvNd, Int8ConvTranspose2d, Int8Linear
from .nn import QUANT_MODULES, Int8Config, QuantConvTranspose2d, QuantLinear, TensorQuantizer, quantizers

log = logging.getLogger(__name__)


def _skipped(name: str, mod: nn.Module, skip: Iterable) -> bool:
    for s in skip:
        if isinstance(s, type) and isinstance(mod, s):
            return True
        if isinstance(s, str) and (fnmatch.fnmatchcase(name, s) or name == s):
            return True
    return False


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(model: nn.Module, config: Int8Config | None = None, skip: Iterable | None = None) -> nn.Module:
    """Swap every nn.Linear / Conv1d / Conv2d / Conv3d / ConvTranspose2d for its Quant* twin, in place.

    Weights are shared (not copied); weight amax is set from the weights right away (max), activation amax waits
    for ``calibrate``. ``skip`` (or ``config.skip``): module names, fnmatch patterns or classes to leave alone.
    Raises ValueError when nothing is left to quantize.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = config or Int8Config()
    skip = tuple(config.skip) + tuple(skip or ())
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) in QUANT_MODULES and not _skipped(n, m, skip)]
    if not targets:
        kinds = ", ".join(c.__name__ for c in QUANT_MODULES)
        raise ValueError(f"nothing to quantize: the model has no {kinds} layer"
                         + (f" outside the skip list {list(skip)}" if skip else ""))
    if isinstance(model, tuple(QUANT_MODULES)) and targets[0][0] == "":
        raise ValueError("quantize_ swaps children in place; wrap a bare layer in nn.Sequential first")
    for name, mod in targets:
        qmod = QUANT_MODULES[type(mod)].from_float(mod, config, name)
        _set_child(model, name, qmod)
    if config.learn_amax:
        model._kiln_learn_amax = True
    log.info("quantize_: %d layers swapped", len(targets))
    return model


def _inputs(batch):
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images", "input_ids"):
            if key in batch:
                return batch[key]
        raise ValueError(f"cannot find the model input in a batch dict with keys {list(batch)}")
    return batch


def _quantizers_or_raise(model: nn.Module):
    qs = quantizers(model)
    if not qs:
        raise ValueError("the model has no quantizers: call kiln.quant.quantize_(model, Int8Config()) first")
    return qs


@torch.no_grad()
def collect_stats(model: nn.Module, loader, calibrator: str = "histogram", num_batches: int | None = None,
                  device: torch.device | str | None = None) -> int:
    """Run ``loader`` through ``model`` (eval mode, quantization off) collecting activation statistics.

    ``calibrator``: 'max' or 'histogram' (histogram also answers 'max'). Batches are tensors, (input, target)
    tuples or dicts. Returns the number of samples seen. NaN/Inf -> ValueError naming the layer.
    """
    qs = _quantizers_or_raise(model)
    if calibrator not in ("max", "histogram"):
        raise ValueError(f"calibrator must be 'max' or 'histogram', got {calibrator!r}")
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    acts = [q for n, q in qs if not n.endswith("weight_quantizer")]
    for _, q in qs:
        q.disable_quant()
    for q in acts:
        q.enable_calib(calibrator)
    seen = 0
    try:
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            x = _inputs(batch)
            model(x.to(device) if isinstance(x, torch.Tensor) else x)
            seen += len(x) if hasattr(x, "__len__") else 1
    finally:
        for _, q in qs:
            q.disable_calib()
            q.enable_quant()
        model.train(was_training)
    if seen == 0:
        raise ValueError("the calibration loader produced no batches")
    return seen


def compute_amax(model: nn.Module, method: str = "max", percentile: float = 99.99, **kw) -> nn.Module:
    """Set every activation amax from the collected statistics, and every weight amax from its weights (max)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    for name, q in _quantizers_or_raise(model):
        if name.endswith("weight_quantizer"):
            continue
        q.load_calib_amax(method, percentile=percentile, **kw)
    _refresh_weight_amax(model)
    return model


def _refresh_weight_amax(model: nn.Module) -> None:
    from . import tensor_quant as tq

    for mod in model.modules():
        wq = getattr(mod, "weight_quantizer", None)
        if isinstance(wq, TensorQuantizer) and not wq.learn_amax:
            wq.set_amax(tq.reduce_amax(mod.weight, wq.axis))


def calibrate(model: nn.Module, loader, method: str = "max", num_batches: int | None = None,
              percentile: float = 99.99, device=None) -> nn.Module:
    """PTQ calibration: collect statistics over ``loader`` and set every amax by ``method``.

    method: 'max' (running max), or from a histogram: 'entropy' (KL), 'percentile' (``percentile``), 'mse'.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    collect_stats(model, loader, "max" if method == "max" else "histogram", num_batches, device)
    compute_amax(model, method, percentile=percentile)
    if getattr(model, "_kiln_learn_amax", False):
        set_learn_amax(model, True)
    return model


def set_learn_amax(model: nn.Module, learn: bool = True) -> list[nn.Parameter]:
    """QAT with learned scales: every amax becomes a Parameter (returned, for the optimizer); False freezes."""
    params = []
    for _, q in _quantizers_or_raise(model):
        q.set_learn_amax(learn)
        if learn:
            params.append(q.amax)
    return params


def enable_quant(model: nn.Module, on: bool = True) -> None:
    """Switch fake quantization on or off in every quantizer (off: the float model)."""
    for _, q in _quantizers_or_raise(model):
        q.enable_quant() if on else q.disable_quant()


_INT8 = {QuantLinear: Int8Linear, QuantConvTranspose2d: Int8ConvTranspose2d}


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every calibrated Quant* layer by its real INT8 twin (Int8Linear, Int8Conv*d, Int8ConvTranspose2d).

    Returns a new model unless ``inplace``. The result runs INT8 GEMMs with INT32 accumulation (Triton on CUDA,
    exact integer arithmetic on the CPU) and is meant for inference.
    """
    from .nn import QuantConv1d, QuantConv2d, QuantConv3d

    _quantizers_or_raise(model)
    out = model if inplace else copy.deepcopy(model)
    targets = [(n, m) for n, m in out.named_modules() if isinstance(m, tuple(QUANT_MODULES.values()))]
    for name, m in targets:
        if isinstance(m, (QuantConv1d, QuantConv2d, QuantConv3d)):
            new = Int8ConvNd(m)
        else:
            new = _INT8[type(m)](m)
        if name == "":
            return new
        _set_child(out, name, new)
    return out.eval()
