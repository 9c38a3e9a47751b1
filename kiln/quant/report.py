"""Per-layer sensitivity: where does quantization error come from?

``layer_report(model_fp, model_q, loader)`` runs the float model and its quantized copy on the same batches and,
for every quantized layer, measures the SQNR (signal-to-quantization-noise ratio, dB; higher is better) of

- ``weight``: the fake-quantized weight against the float weight,
- ``output``: the layer's output in the fully quantized model against the float model's (accumulated error),
- ``alone``: the layer's output with only its own input and weight quantized, fed the float model's input
  (the error this layer adds by itself).

A low ``alone`` SQNR marks a layer to keep in float (``Int8Config(skip=...)``) or to calibrate differently.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .nn import QUANT_MODULES


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - test|^2); inf when identical."""
    ref, test = ref.detach().double(), test.detach().double()
    noise = (ref - test).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


@torch.no_grad()
def layer_report(model_fp: nn.Module, model_q: nn.Module, loader, num_batches: int = 4) -> list[dict]:
    qlayers = {n: m for n, m in model_q.named_modules() if isinstance(m, tuple(QUANT_MODULES.values()))}
    if not qlayers:
        raise ValueError("model_q has no quantized layers: quantize_ and calibrate it first")
    fp_layers = dict(model_fp.named_modules())
    missing = [n for n in qlayers if n not in fp_layers]
    if missing:
        raise ValueError(f"model_fp has no layers named {missing}: pass the float model model_q came from")
    sums = {n: {"sig": 0.0, "out": 0.0, "alone": 0.0} for n in qlayers}
    cap_fp, cap_q = {}, {}
    hooks = [fp_layers[n].register_forward_hook(lambda m, i, o, n=n: cap_fp.__setitem__(n, (i[0], o)))
             for n in qlayers]
    hooks += [m.register_forward_hook(lambda m, i, o, n=n: cap_q.__setitem__(n, o)) for n, m in qlayers.items()]
    model_fp.eval()
    model_q.eval()
    device = next(model_q.parameters()).device
    try:
        for bi, batch in enumerate(loader):
            if bi >= num_batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            x = x.to(device)
            model_fp(x)
            model_q(x)
            for n, qm in qlayers.items():
                x_in, y_fp = cap_fp[n]
                y_alone = qm(x_in)
                s = sums[n]
                s["sig"] += y_fp.double().pow(2).sum().item()
                s["out"] += (y_fp.double() - cap_q[n].double()).pow(2).sum().item()
                s["alone"] += (y_fp.double() - y_alone.double()).pow(2).sum().item()
    finally:
        for h in hooks:
            h.remove()

    def db(sig, noise):
        return math.inf if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)

    rows = []
    for n, qm in qlayers.items():
        s = sums[n]
        rows.append({"layer": n, "type": type(qm).__name__,
                     "input_amax": float(qm.input_quantizer.amax.detach().max()),
                     "weight_sqnr_db": sqnr_db(qm.weight, qm.weight_quantizer(qm.weight)),
                     "output_sqnr_db": db(s["sig"], s["out"]), "alone_sqnr_db": db(s["sig"], s["alone"])})
    return rows


def format_report(rows: list[dict]) -> str:
    w = max(len("layer"), *(len(r["layer"]) for r in rows)) + 2
    lines = [f"{'layer':<{w}}{'type':<22}{'input amax':>12}{'weight dB':>11}{'alone dB':>10}{'output dB':>11}"]
    worst = min(rows, key=lambda r: r["alone_sqnr_db"])["layer"]
    for r in rows:
        mark = "  <- most sensitive" if r["layer"] == worst and len(rows) > 1 else ""
        lines.append(f"{r['layer']:<{w}}{r['type']:<22}{r['input_amax']:>12.4g}{r['weight_sqnr_db']:>11.2f}"
                     f"{r['alone_sqnr_db']:>10.2f}{r['output_sqnr_db']:>11.2f}{mark}")
    return "\n".join(lines)
