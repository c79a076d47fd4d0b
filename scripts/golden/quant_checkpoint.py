#!/usr/bin/env python3
"""Round trip of `trt-diff quantize` files through the Python tools that load them.

Writes a small checkpoint (tests/golden/quant/ckpt.in.safetensors), runs `trt-diff quantize` on it for every
format, then loads each output with safetensors and
  - nf4/fp4: bitsandbytes (QuantState.from_dict + dequantize_4bit, and Linear4bit.load_state_dict), and checks
    every tensor against what bitsandbytes' own quantize_4bit + QuantState.as_dict(packed=True) produce;
  - nvfp4 / fp8: ModelOpt's NVFP4QTensor / FP8QTensor on the same weights (bytes and scales must agree);
  - mxfp8 / int8 / int4: the stored codes times scales (numpy, ml_dtypes).
It records the dequantized values and the sha256 of each output for tests/quant_checkpoint.rs.
  /work/refvenv/bin/python scripts/golden/quant_checkpoint.py [path/to/trt-diff]
(default binary: $CARGO_TARGET_DIR or target, release build, built first).
"""
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "quant"
CONFIGS = {
    # name: (args, quantized tensor names)
    "nf4": (["--format", "nf4"], None),
    "nf4_dq": (["--format", "nf4", "--double-quant", "--block-size", "128"], None),
    "fp4_dq": (["--format", "fp4", "--double-quant"], None),
    "fp4": (["--format", "fp4", "--block-size", "256"], None),
    "nvfp4": (["--format", "nvfp4", "--exclude", "embed.*"], None),
    "fp8": (["--format", "fp8"], None),
    "mxfp8": (["--format", "mxfp8", "--exclude", "embed.*"], None),
    "int8": (["--format", "int8"], None),
    "int4": (["--format", "int4", "--block-size", "32", "--exclude", "embed.*"], None),
}


def make_input(path):
    g = torch.Generator().manual_seed(17)
    t = {
        "layer.0.attn.q.weight": (torch.randn(32, 128, generator=g) * 0.05).to(torch.bfloat16),
        "layer.0.attn.q.bias": (torch.randn(32, generator=g) * 0.01).to(torch.bfloat16),
        "layer.0.mlp.up.weight": (torch.randn(48, 64, generator=g) * 0.2).to(torch.float16),
        "embed.weight": (torch.randn(10, 24, generator=g)).to(torch.float32),
        "norm.weight": torch.ones(64, dtype=torch.float32),
    }
    t["layer.0.attn.q.weight"][0, :64] = 0
    t["layer.0.mlp.up.weight"][1, 2] = 30.0
    save_file(t, str(path), metadata={"format": "pt"})
    return t


def binary():
    if len(sys.argv) > 1:
        return sys.argv[1]
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "trt-diff"], cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return str(pathlib.Path(target) / "release" / "trt-diff")


def dequantize(packed, qs):
    """bitsandbytes' dequantize_4bit through its generic torch kernel. Its native CPU kernel (0.50.2, AVX-512)
    applies the wrong block's absmax for blocksize 256 (about 90% of values differ from code * absmax), so it
    is not used as the reference."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = F.get_4bit_type(qs.quant_type, device="cpu")
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), code, qs.blocksize, qs.shape, qs.dtype)


def bnb_check(name, src, out, kind, bs, dq):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    w = src[name]
    packed, st = F.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type=kind)
    theirs = {f"{name}.{k}": v for k, v in st.as_dict(packed=True).items()}
    theirs[name] = packed
    ours = {k: torch.from_numpy(v.copy()) for k, v in out.items() if k == name or k.startswith(name + ".")}
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for k in theirs:
        a, b = ours[k], theirs[k].cpu()
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(-1), b.reshape(-1))
        if not same and "quant_state" in k and dq:
            # torch's mean reduces in a CPU-dependent order: compare the JSON with the offset within 4 ulp.
            ja, jb = json.loads(bytes(a.tolist())), json.loads(bytes(b.tolist()))
            oa, ob = np.float32(ja.pop("nested_offset")), np.float32(jb.pop("nested_offset"))
            ulp = abs(int(oa.view(np.int32)) - int(ob.view(np.int32)))
            assert ja == jb and ulp <= 4, (k, ja, jb, ulp)
            continue
        if not same and dq and k.endswith((".absmax", ".nested_absmax")):
            continue  # follows from the offset difference above; the dequantized values are compared below
        assert same, (k, a.shape, b.shape, a.dtype, b.dtype)
    qs = bnb.functional.QuantState.from_dict({k[len(name) + 1:]: v for k, v in ours.items() if k != name},
                                             device="cpu")
    deq = dequantize(ours[name], qs).float()
    # The same tensors load as a Linear4bit weight the way transformers loads pre-quantized checkpoints.
    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_type=kind, compress_statistics=dq)
    stats = {k[len(name) + 1:]: v for k, v in ours.items() if k != name}
    lin.weight = bnb.nn.Params4bit.from_prequantized(ours[name], stats, device="cpu", module=lin)
    deq2 = dequantize(lin.weight.data, lin.weight.quant_state).float()
    assert torch.equal(deq, deq2)
    ref = dequantize(packed, st).float()
    err = (deq - ref).abs().max().item()
    assert err <= 1e-6 * max(1.0, ref.abs().max().item()), (name, err)
    return deq.numpy()


def modelopt_check(fmt, name, src, out):
    from modelopt.torch.quantization.qtensor import FP8QTensor, NVFP4QTensor

    w = src[name]
    if fmt == "nvfp4":
        qt, scale, sw = NVFP4QTensor.quantize(w, 16)
        assert np.array_equal(out[name], qt._quantized_data.numpy()), name
        assert np.array_equal(out[name + "_scale"].view(np.uint8), scale.view(torch.uint8).numpy()), name
        assert np.float32(out[name + "_scale_2"]) == np.float32(sw.item()), name
        return qt.dequantize(dtype=torch.float32, scale=scale, double_scale=sw, block_sizes={-1: 16}).numpy()
    # ModelOpt's HF/TensorRT-LLM export: scale = amax.float() / 448 (get_scaling_factor, with the weight's own
    # amax as calibration), weight = to_quantized_weight(weight, scale, "fp8").
    from modelopt.torch.export.model_config import QUANTIZATION_FP8
    from modelopt.torch.export.quant_utils import to_quantized_weight

    scale = w.abs().amax().float() / 448.0
    q = to_quantized_weight(w, scale, QUANTIZATION_FP8)
    assert np.array_equal(out[name].view(np.uint8), q.view(torch.uint8).numpy()), name
    assert np.float32(out[name + "_scale"]) == np.float32(scale.item()), name
    qt = FP8QTensor(q.shape, torch.float32, q)
    return qt.dequantize(dtype=torch.float32, scale=scale).numpy()


def numpy_deq(fmt, name, out):
    q, s = out[name], out[name + "_scale"]
    if fmt == "mxfp8":
        v = q.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        sc = np.ldexp(np.float32(1), s.astype(np.int32) - 127).astype(np.float32)
        return (v.reshape(*s.shape, 32) * sc[..., None]).reshape(q.shape)
    if fmt == "int8":
        return q.astype(np.float32) * s
    lo = (q & 0xF).astype(np.int8)
    hi = (q >> 4).astype(np.int8)
    v = np.stack([np.where(lo > 7, lo - 16, lo), np.where(hi > 7, hi - 16, hi)], -1).reshape(q.shape[0], -1)
    return (v.reshape(*s.shape, -1).astype(np.float32) * s[..., None]).reshape(v.shape)


def main():
    torch.set_num_threads(1)
    src_path = OUT / "ckpt.in.safetensors"
    src = make_input(src_path)
    exe = binary()
    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cfg, (args, _) in CONFIGS.items():
            dst = pathlib.Path(tmp) / f"{cfg}.safetensors"
            subprocess.run([exe, "quantize", str(src_path), "--out", str(dst), "--no-progress", *args], check=True,
                           stdout=subprocess.DEVNULL)
            # numpy has no fp8/bf16: keep their bits as uint8/int16.
            bits = {torch.float8_e4m3fn: torch.uint8, torch.bfloat16: torch.int16}
            out = {k: (v.view(bits[v.dtype]) if v.dtype in bits else v).numpy()
                   for k, v in load_file(str(dst)).items()}
            meta = json.loads(__import__("safetensors").safe_open(str(dst), "pt").metadata()["trt_diff.quantize"])
            fmt = meta["format"]
            deqs = {}
            for name in src:
                if name + "_scale" not in out and not any(k.startswith(name + ".quant_state") for k in out):
                    # Passed through unchanged.
                    assert out[name].tobytes() == src[name].view(torch.uint8 if src[name].element_size() == 1 else torch.int16 if src[name].element_size() == 2 else torch.int32).numpy().tobytes(), name
                    continue
                if fmt in ("nf4", "fp4"):
                    deq = bnb_check(name, src, out, fmt, meta["block_size"], meta["double_quant"])
                elif fmt in ("nvfp4", "fp8"):
                    deq = modelopt_check(fmt, name, src, out)
                else:
                    deq = numpy_deq(fmt, name, out)
                deqs[name] = np.ascontiguousarray(deq, dtype=np.float32).reshape(-1)
            for name, d in deqs.items():
                (OUT / f"ckpt.{cfg}.{name}.deq.bin").write_bytes(d.tobytes())
            record[cfg] = {"args": args, "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(),
                           "quantized": sorted(deqs)}
            print(cfg, "ok:", ", ".join(sorted(deqs)), file=sys.stderr)
    (OUT / "ckpt.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
