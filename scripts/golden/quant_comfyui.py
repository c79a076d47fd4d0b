#!/usr/bin/env python3
"""ComfyUI-layout checkpoints against ComfyUI's own quantization code (comfy-kitchen, which ComfyUI's
comfy/quant_ops.py imports its NVFP4 and FP8 layouts from; PyPI `comfy-kitchen`, eager CPU backend).

1. Writes a small input checkpoint (tests/golden/quant/comfy.in.safetensors).
2. Runs `trt-diff quantize --layout comfyui` on it (nvfp4, fp8) and loads each output the way ComfyUI's
   mixed-precision loader does: the `<layer>.comfy_quant` JSON picks the format; `weight_scale` (viewed as
   float8_e4m3fn) and `weight_scale_2` become TensorCoreNVFP4Layout's block_scale and scale, `weight_scale` is
   TensorCoreFP8Layout's scale; comfy-kitchen's QuantizedTensor.dequantize gives the values (float32).
3. Quantizes the same weights with comfy-kitchen itself and saves them in ComfyUI's checkpoint form
   (state_dict_tensors suffixes, markers and the _quantization_metadata header) with their dequantized values,
   for trt-diff's reader.
Nothing here implements a format: every value comes from comfy-kitchen or from trt-diff.
  /work/refvenv/bin/python scripts/golden/quant_comfyui.py [path/to/trt-diff]
(default binary: target/debug/trt-diff, built first).
"""
import hashlib
import json
import pathlib
import subprocess
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from comfy_kitchen.tensor import QuantizedTensor, TensorCoreFP8Layout, TensorCoreNVFP4Layout

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "quant"
# ComfyUI's QUANT_ALGOS: format -> layout.
LAYOUT = {"nvfp4": TensorCoreNVFP4Layout, "float8_e4m3fn": TensorCoreFP8Layout}
CONFIGS = {"nvfp4": "nvfp4", "fp8": "float8_e4m3fn"}


def make_input(path):
    g = torch.Generator().manual_seed(23)
    t = {
        # 48 rows, 5 blocks per row: both padded in the swizzled scale layout.
        "blocks.0.attn.qkv.weight": torch.randn(48, 80, generator=g) * 0.05,
        "blocks.0.attn.qkv.bias": torch.randn(48, generator=g) * 0.01,
        # 144 rows: two 128-row tiles.
        "blocks.0.mlp.0.weight": (torch.randn(144, 64, generator=g) * 0.2).to(torch.bfloat16),
        "norm.weight": torch.ones(64),
    }
    t["blocks.0.mlp.0.weight"][3, 5] = 9.0
    t["blocks.0.attn.qkv.weight"][1, :16] = 0
    save_file(t, str(path), metadata={"format": "pt"})
    return t


def binary():
    if len(sys.argv) > 1:
        return sys.argv[1]
    subprocess.run(["cargo", "build", "--quiet"], cwd=ROOT, check=True)
    return str(ROOT / "target" / "debug" / "trt-diff")


def comfy_dequantize(path):
    """Every quantized layer of a ComfyUI-layout file, dequantized as ComfyUI's loader would (float32)."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for key in sorted(keys):
            if not key.endswith(".comfy_quant"):
                continue
            layer = key[: -len(".comfy_quant")]
            conf = json.loads(f.get_tensor(key).numpy().tobytes())
            layout = LAYOUT[conf["format"]]
            w = f.get_tensor(f"{layer}.weight")
            if layout is TensorCoreNVFP4Layout:
                params = layout.Params(
                    scale=f.get_tensor(f"{layer}.weight_scale_2"),
                    block_scale=f.get_tensor(f"{layer}.weight_scale").view(torch.float8_e4m3fn),
                    orig_dtype=torch.float32,
                    orig_shape=(w.shape[0], w.shape[1] * 2),
                )
                qdata = w.to(torch.uint8)
            else:
                params = layout.Params(
                    scale=f.get_tensor(f"{layer}.weight_scale"),
                    orig_dtype=torch.float32,
                    orig_shape=tuple(w.shape),
                )
                qdata = w.to(torch.float8_e4m3fn)
            name = layout.__name__
            out[f"{layer}.weight"] = QuantizedTensor(qdata, name, params).dequantize().float().contiguous()
    return out


def save_theirs(inputs, fmt, path):
    """comfy-kitchen's own quantization of the weights, in ComfyUI's checkpoint form."""
    layout = LAYOUT[fmt]
    tensors, layers, deq = {}, {}, {}
    for name, t in inputs.items():
        if not name.endswith(".weight") or t.dim() != 2:
            tensors[name] = t
            continue
        layer = name[: -len(".weight")]
        qdata, params = layout.quantize(t.float())
        for suffix, v in layout.state_dict_tensors(qdata, params).items():
            tensors[name + suffix] = v.contiguous()
        conf = {"format": fmt}
        tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
        layers[layer] = conf
        deq[name] = QuantizedTensor(qdata, layout.__name__, params).dequantize().float().contiguous()
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(tensors, str(path), metadata=meta)
    return deq


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    inp = OUT / "comfy.in.safetensors"
    inputs = make_input(inp)
    exe = binary()
    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cfg, fmt in CONFIGS.items():
            ours = pathlib.Path(tmp) / f"{cfg}.safetensors"
            subprocess.run(
                [exe, "quantize", str(inp), "--format", cfg, "--layout", "comfyui", "--out", str(ours),
                 "--no-progress"],
                check=True,
            )
            deq = comfy_dequantize(ours)
            assert deq, f"{cfg}: no .comfy_quant marker in trt-diff's output"
            for name, v in deq.items():
                (OUT / f"comfy.ours.{cfg}.{name}.deq.bin").write_bytes(v.numpy().tobytes())
            theirs = OUT / f"comfy.theirs.{cfg}.safetensors"
            tdeq = save_theirs(inputs, fmt, theirs)
            for name, v in tdeq.items():
                (OUT / f"comfy.theirs.{cfg}.{name}.deq.bin").write_bytes(v.numpy().tobytes())
            record[cfg] = {
                "sha256": hashlib.sha256(ours.read_bytes()).hexdigest(),
                "quantized": sorted(deq),
            }
    (OUT / "comfy.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
