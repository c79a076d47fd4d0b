#!/usr/bin/env python3
"""Golden files for the element formats, from ml_dtypes and onnx.reference (no torch needed).

Writes raw little-endian .bin files into tests/golden/quant/ (tests/quant_formats.rs reads them):
  f16_all.<fmt>.<mode>.bin   codes of all 65,536 f16 bit patterns (as f32) for e4m3fn / e5m2 / e2m1,
                             mode "ml" = ml_dtypes cast (no saturation), "sat" = onnx Cast(saturate=1)
  f32_edge.in.bin            random and edge f32 values; f32_edge.<fmt>.<mode>.bin their codes
  mxfp8.in.bin [R,C] f32 -> mxfp8.codes.bin, mxfp8.scales.bin (OCP MX v1.0 rule, elements cast by ml_dtypes)
  int.in.bin [R,C] f32   -> int8_{tensor,channel,block32}.{q,s}.bin, int4_block32.{q,s}.bin via QuantizeLinear
Run with the CI venv:  .cache/venv/bin/python scripts/golden/quant_formats.py
"""
import pathlib

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "golden" / "quant"
OUT.mkdir(parents=True, exist_ok=True)
FMTS = {
    "e4m3fn": (ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E4M3FN),
    "e5m2": (ml_dtypes.float8_e5m2, TensorProto.FLOAT8E5M2),
    "e2m1": (ml_dtypes.float4_e2m1fn, TensorProto.FLOAT4E2M1),
}


def put(name, arr):
    (OUT / name).write_bytes(np.ascontiguousarray(arr).tobytes())


def onnx_cast(x, to, saturate):
    node = helper.make_node("Cast", ["x"], ["y"], to=to, saturate=saturate)
    g = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", to, [None])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    return ReferenceEvaluator(m).run(None, {"x": x})[0]


def codes(arr):
    # ml_dtypes stores one code per byte; FP4 codes are the low nibble.
    return np.asarray(arr).view(np.uint8).copy()


def edge_f32():
    rng = np.random.default_rng(3)
    parts = [
        rng.standard_normal(4000).astype(np.float32) * 10.0 ** rng.integers(-8, 6, 4000),
        rng.uniform(-600, 600, 2000).astype(np.float32),
        rng.uniform(-70000, 70000, 1000).astype(np.float32),
        rng.uniform(-8, 8, 2000).astype(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 448, 464, 465, 480, 500, 57344, 61440, 61441,
                  1e30, -1e30, 6.0, 5.0, 7.0, 2.5, 0.25, 0.75, 1.25, 1.75, 3.5, 1e-45, -1e-45,
                  np.finfo(np.float32).max, np.finfo(np.float32).tiny], np.float32),
    ]
    # Exact ties and neighbours of every E4M3/E5M2/E2M1 midpoint, and the subnormal ranges.
    for dt in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float4_e2m1fn):
        bits = np.arange(256 if dt != ml_dtypes.float4_e2m1fn else 16, dtype=np.uint8)
        vals = bits.view(dt).astype(np.float32)
        vals = np.sort(vals[np.isfinite(vals)])
        mids = ((vals[:-1].astype(np.float64) + vals[1:]) / 2).astype(np.float32)
        for m in (mids, vals):
            parts += [m, np.nextafter(m, np.float32(np.inf)), np.nextafter(m, np.float32(-np.inf))]
    parts.append(np.float32(2.0) ** np.arange(-30, 20, 0.25).astype(np.float32))
    x = np.concatenate(parts).astype(np.float32)
    return np.concatenate([x, -x])


def formats():
    f16 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    edge = edge_f32()
    put("f32_edge.in.bin", edge)
    for label, x in (("f16_all", f16), ("f32_edge", edge)):
        for name, (dt, to) in FMTS.items():
            with np.errstate(all="ignore"):
                put(f"{label}.{name}.ml.bin", codes(x.astype(dt)))
            put(f"{label}.{name}.sat.bin", codes(onnx_cast(x, to, 1)))
            if name != "e2m1":
                put(f"{label}.{name}.nosat.bin", codes(onnx_cast(x, to, 0)))


def mxfp8():
    rng = np.random.default_rng(5)
    r, c = 48, 256
    x = (rng.standard_normal((r, c)) * 10.0 ** rng.integers(-6, 6, (r, 1))).astype(np.float32)
    x[3, :32] = 0  # zero block
    x[5, 40] = 3e4  # outlier
    x[7, 64:96] = np.float32(1e-40)  # subnormal block
    x[9, 100] = 448 * 2 ** 5 * 1.999  # saturates after scaling
    put("mxfp8.in.bin", x)
    b = x.reshape(r, c // 32, 32)
    amax = np.abs(b).max(-1)
    m, e = np.frexp(amax)
    e = np.where(amax > 0, e - 1, -127).astype(np.int32) - 8  # floor(log2 amax) - emax(E4M3)
    e = np.clip(e, -127, 127)
    scale = np.ldexp(np.float32(1), e).astype(np.float32)
    y = np.clip(b / scale[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    put("mxfp8.codes.bin", codes(y))
    put("mxfp8.scales.bin", (e + 127).astype(np.uint8))
    # The E8M0 codes are the ml_dtypes float8_e8m0fnu encodings of the scales.
    assert (codes(scale.astype(ml_dtypes.float8_e8m0fnu)) == (e + 127)).all()


def quantize_linear(x, scale, to, axis=None, block=None):
    zp_type = {TensorProto.INT8: np.int8, TensorProto.INT4: ml_dtypes.int4}[to]
    zp = np.zeros(scale.shape, zp_type)
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block is not None:
        attrs["block_size"] = block
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    g = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, list(scale.shape)),
         helper.make_tensor_value_info("z", to, list(scale.shape))],
        [helper.make_tensor_value_info("y", to, list(x.shape))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    return ReferenceEvaluator(m).run(None, {"x": x, "s": scale, "z": zp})[0].astype(np.int8)


def ints():
    rng = np.random.default_rng(7)
    r, c = 32, 128
    x = (rng.standard_normal((r, c)) * rng.uniform(0.01, 3, (r, 1))).astype(np.float32)
    x[2] = 0  # all-zero channel: scale 1
    x[4, :32] = 0
    x[6, 7] = 50
    x[8, :4] = [0.5, 1.5, 2.5, -2.5]  # ties once scaled by amax/127 = 1
    x[8, 4] = 127.0
    put("int.in.bin", x)
    f = np.float32

    def sc(a, qmax):
        a = a.astype(np.float32)
        return np.where(a > 0, a / f(qmax), f(1)).astype(np.float32)

    s = sc(np.abs(x).max(), 127).reshape(())
    put("int8_tensor.q.bin", quantize_linear(x, s, TensorProto.INT8)); put("int8_tensor.s.bin", s)
    s = sc(np.abs(x).max(1), 127)
    put("int8_channel.q.bin", quantize_linear(x, s, TensorProto.INT8, axis=0)); put("int8_channel.s.bin", s)
    s = sc(np.abs(x.reshape(r, c // 32, 32)).max(-1), 127)
    put("int8_block32.q.bin", quantize_linear(x, s, TensorProto.INT8, axis=1, block=32)); put("int8_block32.s.bin", s)
    s = sc(np.abs(x.reshape(r, c // 32, 32)).max(-1), 7)
    put("int4_block32.q.bin", quantize_linear(x, s, TensorProto.INT4, axis=1, block=32)); put("int4_block32.s.bin", s)


if __name__ == "__main__":
    formats()
    mxfp8()
    ints()
    print("onnx", onnx.__version__, "ml_dtypes", ml_dtypes.__version__, "->", OUT)
