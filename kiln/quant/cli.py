"""``kiln quant ptq`` and ``kiln quant report``: INT8 PTQ of a saved model with a calibration set.

The model is an architecture (``module:callable`` building an nn.Module, e.g. ``kiln.quant.examples:DigitsCNN``)
plus its weights (``.safetensors``, or a ``.pt`` state_dict loaded with ``weights_only=True``). The calibration
set is ``digits`` (scikit-learn's, for the demo) or a tensor file: ``.pt`` holding a tensor or a dict with key
``x`` (optionally ``y`` labels, which add accuracy to the report), or ``.npy``.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quant", help="INT8 quantization: PTQ of a saved model, per-layer sensitivity report")
    qsub = p.add_subparsers(dest="quant_command", metavar="QUANT_COMMAND")

    def common(sp):
        sp.add_argument("--arch", required=True, help="module:callable that builds the float model")
        sp.add_argument("--weights", required=True, help="state_dict file (.safetensors or .pt)")
        sp.add_argument("--calib", required=True, help="'digits' or a .pt/.npy tensor file of inputs")
        sp.add_argument("--method", default="max", choices=["max", "entropy", "percentile", "mse"])
        sp.add_argument("--percentile", type=float, default=99.99)
        sp.add_argument("--num-batches", type=int, default=None)
        sp.add_argument("--batch-size", type=int, default=64)
        sp.add_argument("--skip", nargs="*", default=[], help="layer names / patterns to keep in float")

    ptq = qsub.add_parser("ptq", help="quantize, calibrate and save (state_dict with amax, optional ONNX)")
    common(ptq)
    ptq.add_argument("--out", required=True, help="output .safetensors for the calibrated fake-quant model")
    ptq.add_argument("--onnx", default=None, help="also export ONNX with Q/DQ nodes to this path")
    ptq.set_defaults(func=_ptq)

    rep = qsub.add_parser("report", help="per-layer SQNR table to find sensitive layers")
    common(rep)
    rep.add_argument("--json", default=None, help="also write the rows as JSON here")
    rep.set_defaults(func=_report)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _build(arch: str):
    if ":" not in arch:
        raise ValueError(f"--arch must be 'module:callable', got {arch!r}")
    mod_name, fn_name = arch.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {arch!r}: {exc}") from exc
    return fn()


def _load_state(path: str):
    import torch

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    return torch.load(str(p), map_location="cpu", weights_only=True)


def _calib_data(spec: str):
    import numpy as np
    import torch

    if spec == "digits":
        from kiln.data.digits import digits_tensors

        (xtr, _), (xte, yte) = digits_tensors()
        return xtr, xte, yte
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"calibration file {spec} does not exist")
    if p.suffix == ".npy":
        x, y = torch.from_numpy(np.load(str(p))).float(), None
    else:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
        x, y = (obj["x"], obj.get("y")) if isinstance(obj, dict) else (obj, None)
    if not isinstance(x, torch.Tensor) or x.numel() == 0:
        raise ValueError(f"{spec} holds no calibration inputs")
    return x.float(), x.float(), y


def _prepare(args):
    import copy

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from kiln.quant import Int8Config, calibrate, quantize_

    model = _build(args.arch)
    model.load_state_dict(_load_state(args.weights))
    model.eval()
    xcal, xeval, yeval = _calib_data(args.calib)
    loader = DataLoader(TensorDataset(xcal), batch_size=args.batch_size)
    qmodel = quantize_(copy.deepcopy(model), Int8Config(skip=tuple(args.skip)))
    calibrate(qmodel, loader, method=args.method, num_batches=args.num_batches, percentile=args.percentile)
    eval_loader = DataLoader(TensorDataset(xeval, yeval if yeval is not None else torch.zeros(len(xeval))),
                             batch_size=256)
    return model, qmodel, eval_loader, yeval is not None, xcal


def _accuracies(model, qmodel, loader):
    from kiln.quant import convert
    from kiln.quant.examples import accuracy

    return {"fp32": accuracy(model, loader), "int8_fake_quant": accuracy(qmodel, loader),
            "int8_real": accuracy(convert(qmodel), loader)}


def _ptq(args) -> int:
    from safetensors.torch import save_file

    from kiln.quant import export_onnx

    model, qmodel, eval_loader, labelled, xcal = _prepare(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in qmodel.state_dict().items()}, str(out))
    print(f"calibrated ({args.method}) INT8 model state_dict -> {out}")
    if args.onnx:
        print(f"ONNX with Q/DQ nodes -> {export_onnx(qmodel, xcal[:1], args.onnx)}")
    if labelled:
        acc = _accuracies(model, qmodel, eval_loader)
        print("accuracy: " + "  ".join(f"{k} {v:.2f}%" for k, v in acc.items()))
    return 0


def _report(args) -> int:
    from kiln.quant.report import format_report, layer_report

    model, qmodel, eval_loader, labelled, _ = _prepare(args)
    rows = layer_report(model, qmodel, eval_loader)
    print(format_report(rows))
    payload = {"method": args.method, "layers": rows}
    if labelled:
        payload["accuracy"] = _accuracies(model, qmodel, eval_loader)
        print("accuracy: " + "  ".join(f"{k} {v:.2f}%" for k, v in payload["accuracy"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0
