#!/usr/bin/env python3
"""Writes a tiny ONNX model (MatMul+Add+LayerNormalization, Conv+Relu) and its inputs/expected outputs
(float64 numpy reference, stored as little-endian f32) for scripts/gpu/ort_cuda_check.
Usage: ort_cuda_model.py OUTDIR"""
import os, sys
import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(1234)
M, K, N = 64, 256, 128
C, O, HW = 4, 8, 16
x = rng.standard_normal((M, K)).astype(np.float32)
w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
b = rng.standard_normal(N).astype(np.float32)
g = (1 + 0.1 * rng.standard_normal(N)).astype(np.float32)
beta = (0.1 * rng.standard_normal(N)).astype(np.float32)
img = rng.standard_normal((1, C, HW, HW)).astype(np.float32)
cw = (rng.standard_normal((O, C, 3, 3)) / 6).astype(np.float32)
cb = (0.1 * rng.standard_normal(O)).astype(np.float32)

nodes = [
    helper.make_node("MatMul", ["X", "W"], ["XW"]),
    helper.make_node("Add", ["XW", "B"], ["H"]),
    helper.make_node("LayerNormalization", ["H", "G", "BETA"], ["Y_MM"], axis=-1, epsilon=1e-5),
    helper.make_node("Conv", ["IMG", "CW", "CB"], ["CONV"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
    helper.make_node("Relu", ["CONV"], ["Y_CONV"]),
]
inits = [numpy_helper.from_array(a, n) for a, n in
         [(w, "W"), (b, "B"), (g, "G"), (beta, "BETA"), (cw, "CW"), (cb, "CB")]]
graph = helper.make_graph(
    nodes, "ort_cuda_check",
    [helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, K]),
     helper.make_tensor_value_info("IMG", TensorProto.FLOAT, [1, C, HW, HW])],
    [helper.make_tensor_value_info("Y_MM", TensorProto.FLOAT, [M, N]),
     helper.make_tensor_value_info("Y_CONV", TensorProto.FLOAT, [1, O, HW, HW])],
    inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, os.path.join(out, "model.onnx"))

# float64 reference
h = x.astype(np.float64) @ w.astype(np.float64) + b
mu = h.mean(-1, keepdims=True); var = h.var(-1, keepdims=True)
y_mm = (h - mu) / np.sqrt(var + 1e-5) * g + beta
p = np.pad(img.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
conv = np.zeros((1, O, HW, HW))
for dy in range(3):
    for dx in range(3):
        conv += np.einsum("oc,nchw->nohw", cw[:, :, dy, dx].astype(np.float64), p[:, :, dy:dy + HW, dx:dx + HW])
conv += cb[None, :, None, None]
y_conv = np.maximum(conv, 0)
for name, a in [("x", x), ("img", img), ("y_mm", y_mm), ("y_conv", y_conv)]:
    a.astype("<f4").tofile(os.path.join(out, name + ".bin"))
print("wrote", out, "Y_MM", y_mm.shape, "Y_CONV", y_conv.shape)
