"""Golden files for the GGUF path, from gguf-py (llama.cpp's Python package).

usage: python scripts/golden/llm_gguf.py TRT_DIFF_BINARY ../shared/data/llm tests/golden/llm
Needs `gguf` (0.19) and numpy (the reference venv, not CI). Writes:
- dequant.gguf: for each ggml type, a tensor `<type>` (gguf.quants.quantize of random data for the types gguf-py can
  quantize, random blocks with finite f16 scales for the K-quants it only dequantizes) and `<type>.expected`, the F32
  result of gguf.quants.dequantize. The test dequantizes `<type>` with our reader and compares bit for bit.
- stories260K_gguf.json: `trt-diff convert llama2c` output read back with gguf.GGUFReader: metadata, tensor names,
  shapes, types and sha256 of the data, so the test can check that what we write is what gguf-py reads."""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

ROWS, COLS = 2, 512


def k_blocks(rng, qtype):
    """Random K-quant blocks with finite positive f16 scales (byte offsets from ggml's block layouts)."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    n_blocks = ROWS * COLS // 256
    b = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    d = rng.uniform(0.001, 0.05, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:
        b[:, 208:210] = d[:, 0:2]
    else:
        b[:, 0:4] = d[:, 0:4]
    return b.reshape(ROWS, -1)


def dequant_file(out):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(out, arch="dequant-test")
    for qtype in [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]:
        name = qtype.name.lower()
        if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
            raw = k_blocks(rng, qtype)
        elif qtype == T.F16:
            raw = rng.normal(size=(ROWS, COLS)).astype(np.float16).view(np.uint8)
        else:
            raw = quantize(rng.normal(size=(ROWS, COLS)).astype(np.float32), qtype)
        expected = dequantize(raw, qtype).astype(np.float32)
        assert expected.shape == (ROWS, COLS), (name, expected.shape)
        w.add_tensor(name, raw, raw_dtype=qtype)
        w.add_tensor(name + ".expected", expected)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def plain(v):
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer, int, bool, np.bool_)):
        return v.item() if hasattr(v, "item") else v
    return v


def convert_summary(binary, data, out):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "stories260K.gguf")
        subprocess.run([binary, "convert", "llama2c", os.path.join(data, "stories260K.bin"),
                        "--tokenizer", os.path.join(data, "tok512.bin"), "--out", path], check=True)
        r = gguf.GGUFReader(path)
        meta = {}
        for k, f in r.fields.items():
            if k.startswith("GGUF."):
                continue
            meta[k] = plain(f.contents())
        tensors = [{"name": t.name, "shape": [int(x) for x in reversed(t.shape.tolist())],
                    "type": t.tensor_type.name,
                    "sha256": hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()}
                   for t in r.tensors]
    json.dump({"metadata": meta, "tensors": tensors}, open(out, "w"), indent=1)


def main(binary, data, out_dir):
    dequant_file(os.path.join(out_dir, "dequant.gguf"))
    convert_summary(binary, data, os.path.join(out_dir, "stories260K_gguf.json"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
