"""kiln.quant: INT8 post-training quantization and quantization-aware training, with real INT8 execution.

    from kiln.quant import quantize_, calibrate, convert, export_onnx, Int8Config
    quantize_(model, Int8Config())            # swap Linear/Conv layers for fake-quantized ones, in place
    calibrate(model, loader, method="entropy")  # PTQ (max / entropy / percentile / mse)
    int8 = convert(model)                     # INT8 GEMMs with INT32 accumulation (im2col for convs)
    export_onnx(model, example, "m.onnx")     # QuantizeLinear/DequantizeLinear pairs for TensorRT
"""

from .api import (calibrate, collect_stats, compute_amax, convert, enable_quant, quantize_,
                  set_learn_amax)
from .calib import HistogramCalibrator, MaxCalibrator
from .int8 import Int8ConvNd, Int8ConvTranspose2d, Int8Linear
from .nn import (Int8Config, QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose2d, QuantLinear,
                 TensorQuantizer)
from .export import export_onnx
from .llm import (Fp8Linear, Int4WeightOnlyLinear, Int8WeightOnlyLinear, W8A8Linear, quantize_activations_,
                  quantize_weight_only_)
from .tensor_quant import dequantize, fake_quant, fake_quant_asym, quantize, quantize_asym

__all__ = ["Int8Config", "quantize_", "export_onnx", "calibrate", "collect_stats", "compute_amax", "convert", "enable_quant",
           "set_learn_amax", "TensorQuantizer", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantConv3d",
           "QuantConvTranspose2d", "Int8Linear", "Int8ConvNd", "Int8ConvTranspose2d", "MaxCalibrator",
           "HistogramCalibrator", "quantize", "dequantize", "fake_quant", "quantize_asym", "fake_quant_asym",
           "Int8WeightOnlyLinear", "Int4WeightOnlyLinear", "quantize_weight_only_", "W8A8Linear", "Fp8Linear",
           "quantize_activations_"]
