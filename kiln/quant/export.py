"""ONNX export with QuantizeLinear / DequantizeLinear pairs, the form TensorRT builds INT8 engines from.

Every calibrated quantizer becomes a Q/DQ pair: activations per tensor, weights per channel (``axis`` on the
Q/DQ nodes, which needs opset >= 13). Scales are the quantizer's ``amax / 127``; ONNX's int8 grid is
[-128, 127], so a value below ``-128.5 * scale`` maps to -128 in ONNX where kiln saturates at -127 (the same
convention as pytorch-quantization's exporter; weights never reach it, post-ReLU activations neither).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .nn import quantizers


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, opset: int = 13,
                input_names=("input",), output_names=("output",), dynamic_batch: bool = True) -> Path:
    """Write ``model`` (quantized with ``quantize_`` and calibrated) to ``path`` as ONNX with Q/DQ nodes."""
    if not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be >= 13 for per-channel QuantizeLinear axis, got {opset!r}")
    qs = quantizers(model)
    if not qs:
        raise ValueError("the model has no quantizers: quantize_ and calibrate it before export_onnx")
    for name, q in qs:
        if q._quant and not q.calibrated:
            raise ValueError(f"{name}: amax is not set; calibrate before export_onnx")
    m = copy.deepcopy(model).eval().cpu()
    for _, q in quantizers(m):
        q.disable_calib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dyn = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter maps torch's fake-quantize ops to Q/DQ pairs; it needs no onnxscript.
        torch.onnx.export(m, (example_input.detach().cpu(),), str(path), opset_version=opset,
                          input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dyn, dynamo=False, do_constant_folding=True)
    return path
