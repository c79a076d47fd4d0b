#!/usr/bin/env python3
"""Golden file from ModelOpt's INT8 SmoothQuant (mtq.quantize with the INT8_SMOOTHQUANT_CFG preset, alpha 0.5) on
one linear layer, on the CPU: the smoothing scales, the smoothed weight, its per-output-channel INT8 amax and
fake-quantized values, the per-tensor input amax and the quantized layer's output.

Needs /work/refvenv (torch, nvidia-modelopt, safetensors); not CI:
  timeout 300 /work/refvenv/bin/python scripts/golden/quant_smoothquant.py
Writes tests/golden/quant/smoothquant.safetensors (read by tests/quant_reference.rs).
"""
import copy
import pathlib

import torch
from safetensors.torch import save_file

import modelopt.torch.quantization as mtq

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "golden" / "quant" / "smoothquant.safetensors"
ALPHA = 0.5


def main():
    g = torch.Generator().manual_seed(5)
    k, n = 32, 24
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    # Activations with outlier channels (what SmoothQuant is for) and one all-zero channel (kept at scale 1).
    x = torch.randn(64, k, generator=g)
    x[:, 3] *= 40.0
    x[:, 17] *= 15.0
    x[:, 9] = 0.0
    w0 = lin.weight.detach().clone()
    b0 = lin.bias.detach().clone()
    model = torch.nn.Sequential(copy.deepcopy(lin))
    cfg = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    cfg["algorithm"] = {"method": "smoothquant", "alpha": ALPHA}
    mtq.quantize(model, cfg, forward_loop=lambda m: m(x))
    q = model[0]
    iq, wq = q.input_quantizer, q.weight_quantizer
    with torch.no_grad():
        y = model(x)
        # The weight as the quantized layer uses it: the pre-quant scale folded in (or applied by the quantizer).
        w_eff = q.weight * iq.pre_quant_scale.float()[None, :] if wq.pre_quant_scale is None else q.weight
        w_smooth = q.weight.detach().clone()
        if wq.pre_quant_scale is not None:
            w_smooth = w_smooth * wq.pre_quant_scale.float()
        w_fq = wq(q.weight)
    assert w_eff is not None
    save_file(
        {
            "x": x.contiguous(),
            "weight": w0.contiguous(),
            "bias": b0.contiguous(),
            "act_amax": iq._amax_for_smoothing.float().reshape(-1).contiguous(),
            "pre_quant_scale": iq.pre_quant_scale.float().reshape(-1).contiguous(),
            "smoothed_weight": w_smooth.float().contiguous(),
            "weight_amax": wq.amax.float().reshape(-1).contiguous(),
            "weight_fq": w_fq.float().contiguous(),
            "input_amax": iq.amax.float().reshape(1).contiguous(),
            "y": y.float().contiguous(),
            "alpha": torch.tensor([ALPHA]),
        },
        str(OUT),
    )
    print("wrote", OUT, "input amax", float(iq.amax), "pqs range", float(iq.pre_quant_scale.min()),
          float(iq.pre_quant_scale.max()))


if __name__ == "__main__":
    main()
