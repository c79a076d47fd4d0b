#!/usr/bin/env python3
"""Golden files from ModelOpt (NVFP4QTensor) and bitsandbytes (quantize_4bit), both on the CPU.

Needs a venv outside the repository with torch, nvidia-modelopt, bitsandbytes (not CI):
  python3 -m venv /work/refvenv
  /work/refvenv/bin/pip install torch nvidia-modelopt bitsandbytes ml-dtypes onnx numpy safetensors
  /work/refvenv/bin/python scripts/golden/quant_torch.py
Writes raw little-endian .bin files into tests/golden/quant/ (read by tests/quant_reference.rs):
  nvfp4.in.<dt>.bin [64,256] -> nvfp4.<dt>.{packed,scales,global}.bin
  bnb.in.<dt>.bin [96,320], bnb.odd.in.bin [4099] f32 -> bnb.<case>.{packed,absmax,qabsmax,absmax2,offset}.bin
  bnb.{nf4,fp4}.map.bin, bnb.dynamic.map.bin   the code tables
"""
import json
import pathlib
import sys

import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "golden" / "quant"
OUT.mkdir(parents=True, exist_ok=True)
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def put(name, t):
    if isinstance(t, torch.Tensor):
        t = t.detach().contiguous()
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):
            t = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.view(torch.int16)
        t = t.numpy()
    (OUT / name).write_bytes(np.ascontiguousarray(t).tobytes())


def nvfp4():
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 2, 64).unsqueeze(1)
    x[1, :16] = 0  # zero block -> scale 1.0
    x[2, 16:32] = -0.0  # negative zeros
    x[3, 5] = 9000.0  # outlier sets the global amax
    x[4, :16] = 1e-9  # block scale below 2^-9 -> clamped
    x[5, :16] = torch.tensor([6, 5, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25, -6, -5, -3.5, -2.5, -1.75, -1.25, -0.75, -0.25])
    x[6, :16] = torch.linspace(-1, 1, 16) * 1e-3
    for name, dt in DTYPES.items():
        xi = x.to(dt)
        put(f"nvfp4.in.{name}.bin", xi)
        qt, scale, sw = NVFP4QTensor.quantize(xi, 16)
        put(f"nvfp4.{name}.packed.bin", qt._quantized_data)
        put(f"nvfp4.{name}.scales.bin", scale)
        put(f"nvfp4.{name}.global.bin", sw.float().reshape(1))


def bnb():
    import bitsandbytes.functional as F

    put("bnb.nf4.map.bin", F.get_4bit_type("nf4", device="cpu").float())
    put("bnb.fp4.map.bin", F.get_4bit_type("fp4", device="cpu").float())
    put("bnb.dynamic.map.bin", F.create_dynamic_map(signed=True).float())

    g = torch.Generator().manual_seed(13)
    x = torch.randn(96, 320, generator=g) * torch.logspace(-2, 1, 96).unsqueeze(1)
    x[0, :64] = 0  # zero block (absmax clamps to 1e-38)
    x[1, 3] = 500.0  # outlier
    x[2, :64] = torch.linspace(-1, 1, 64)  # exact NF4/FP4 levels and midpoints near them
    odd = torch.randn(4099, generator=g) * 0.05  # remainder block and an odd element count
    odd[-2:] = torch.tensor([0.0, 1e-4])
    put("bnb.odd.in.bin", odd)

    cases = []
    for dtn, dt in DTYPES.items():
        put(f"bnb.in.{dtn}.bin", x.to(dt))
        for kind in ("nf4", "fp4"):
            for bs in (64, 128, 256) if dtn == "bf16" else (64,):
                for dq in (False, True):
                    cases.append((f"bnb.{kind}.{dtn}.{bs}.{int(dq)}", x.to(dt), kind, bs, dq))
    for kind in ("nf4", "fp4"):
        for dq in (False, True):
            cases.append((f"bnb.{kind}.odd.64.{int(dq)}", odd, kind, 64, dq))
    for name, t, kind, bs, dq in cases:
        packed, st = F.quantize_4bit(t, blocksize=bs, compress_statistics=dq, quant_type=kind)
        put(f"{name}.packed.bin", packed.view(-1))
        if dq:
            put(f"{name}.qabsmax.bin", st.absmax)
            put(f"{name}.absmax2.bin", st.state2.absmax)
            put(f"{name}.offset.bin", st.offset.float().reshape(1))
        else:
            put(f"{name}.absmax.bin", st.absmax)
        # The values bitsandbytes reconstructs, for the Rust dequantizer (a few cases: size budget).
        if ".odd." in name or name.startswith("bnb.nf4.bf16.64") or name.startswith("bnb.fp4.bf16.64"):
            put(f"{name}.deq.bin", F.dequantize_4bit(packed, st).float().view(-1))
    (OUT / "bnb.cases.json").write_text(json.dumps([c[0] for c in cases], indent=0) + "\n")


if __name__ == "__main__":
    for old in [*OUT.glob("bnb.*"), *OUT.glob("nvfp4.*")]:
        old.unlink()
    torch.set_num_threads(1)
    nvfp4()
    bnb()
    import bitsandbytes
    import modelopt

    print("torch", torch.__version__, "modelopt", modelopt.__version__, "bitsandbytes", bitsandbytes.__version__,
          "->", OUT, file=sys.stderr)
