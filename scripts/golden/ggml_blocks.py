"""Golden vectors for the GGUF block kernels (src/backend/ggml_blocks.rs), from ggml itself.

Uses the ggml libraries that llama-cpp-python (0.3.36) builds: `ggml_quantize_chunk` quantizes random weight rows
in each block format, the CPU backend's `from_float` quantizes the activation rows into the format of the weight's
`vec_dot_type` (Q8_0, Q8_1 or Q8_K), and its `vec_dot` gives the dot products. Writes
tests/golden/ggml/blocks.bin:

    magic b"GGMLDOT1", u32 count of cases, then per case:
    u32 ggml type, u32 rows, u32 k, u32 act type,
    weight bytes (rows * row bytes), activation f32 (k), activation blocks (ggml bytes), f32 dots (rows)

Run: python scripts/golden/ggml_blocks.py  (in a venv with llama-cpp-python and numpy; no torch)
"""
import ctypes
import os
import struct
import sys

import numpy as np
import llama_cpp

LIB = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
base = ctypes.CDLL(os.path.join(LIB, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
cpu = ctypes.CDLL(os.path.join(LIB, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)

FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
VEC_DOT = ctypes.CFUNCTYPE(
    None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
)


class TraitsCpu(ctypes.Structure):
    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


cpu.ggml_cpu_init.restype = None
cpu.ggml_cpu_init()
cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TraitsCpu)
cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
base.ggml_quantize_chunk.restype = ctypes.c_size_t
base.ggml_quantize_chunk.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
]
base.ggml_row_size.restype = ctypes.c_size_t
base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def case(name, t, rows, k, rng):
    w = (rng.standard_normal((rows, k)) * 0.05).astype(np.float32)
    x = rng.standard_normal(k).astype(np.float32)
    x[::7] *= 4.0  # some outliers per block
    rb = base.ggml_row_size(t, k)
    wq = np.zeros(rows * rb, np.uint8)
    n = base.ggml_quantize_chunk(t, w.ctypes.data, wq.ctypes.data, 0, rows, k, None)
    assert n == rows * rb, (name, n, rows * rb)
    tr = cpu.ggml_get_type_traits_cpu(t).contents
    at = tr.vec_dot_type
    arb = base.ggml_row_size(at, k)
    xq = np.zeros(arb, np.uint8)
    FROM_FLOAT(cpu.ggml_get_type_traits_cpu(at).contents.from_float)(x.ctypes.data, xq.ctypes.data, k)
    dot = VEC_DOT(tr.vec_dot)
    out = np.zeros(rows, np.float32)
    s = ctypes.c_float()
    for r in range(rows):
        dot(k, ctypes.byref(s), 0, wq[r * rb:].ctypes.data, 0, xq.ctypes.data, 0, 1)
        out[r] = s.value
    return struct.pack("<4I", t, rows, k, at) + wq.tobytes() + x.tobytes() + xq.tobytes() + out.tobytes()


def main():
    rng = np.random.default_rng(19)
    cases = []
    for name, t in TYPES.items():
        # Nine rows: one group of eight as the CPU decoder repacks them (backend::ggml_repack) and one row left
        # in the file's layout.
        for k in ([256, 1024] if t >= 12 else [64, 896]):
            cases.append(case(name, t, 9, k, rng))
    out = os.path.join(os.path.dirname(__file__), "../../tests/golden/ggml/blocks.bin")
    with open(out, "wb") as f:
        f.write(b"GGMLDOT1" + struct.pack("<I", len(cases)) + b"".join(cases))
    print(f"wrote {len(cases)} cases, {os.path.getsize(out)} bytes to {os.path.normpath(out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
