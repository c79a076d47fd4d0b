"""Checks the CPU pass against onnx.reference.

usage: fp4_reference.py ORIGINAL.onnx PASSED.onnx NAME=INPUT.npy ...
Evaluates ORIGINAL (with TensorRT's NVFP4 ops) in onnx.reference, giving `trt::TRT_FP4DynamicQuantize` its
TensorRT semantics via ml_dtypes (per 16-block: scale = fp8_e4m3(min(amax / (6 * sx), 448)), x_fp4 = e2m1(x / (scale * sx)),
round to nearest even, saturating), then evaluates PASSED (standard ops only) in onnx.reference and in ONNX
Runtime, and prints one JSON line with the max abs differences and the output scale."""
import json
import sys

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun


class TRT_FP4DynamicQuantize(OpRun):
    op_domain = "trt"

    def _run(self, x, sx, axis=-1, block_size=16, scale_type=17):
        assert axis in (-1, x.ndim - 1) and block_size == 16
        xb = x.astype(np.float32).reshape(*x.shape[:-1], -1, 16)
        amax = np.abs(xb).max(axis=-1, keepdims=True)
        # Saturating FP8 conversion (ml_dtypes alone turns overflow into NaN).
        scale = np.minimum(amax / (6.0 * np.float32(sx)), 448.0).astype(ml_dtypes.float8_e4m3fn)
        s = scale.astype(np.float32) * np.float32(sx)
        q = np.where(s == 0, 0.0, xb / np.where(s == 0, 1.0, s))
        q = np.clip(q, -6.0, 6.0).astype(ml_dtypes.float4_e2m1fn)
        return (q.reshape(x.shape), scale.reshape(*x.shape[:-1], -1))


def main(original, passed, *inputs):
    feeds = {k: np.load(v) for k, v in (a.split("=", 1) for a in inputs)}
    ref = ReferenceEvaluator(original, new_ops=[TRT_FP4DynamicQuantize]).run(None, feeds)[0]
    ref_passed = ReferenceEvaluator(passed).run(None, feeds)[0]

    # whose negative values survive): basic optimizations keep the graph's numerics.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(passed, so, providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0]
    print(json.dumps({
        "ref_vs_passed_ref": float(np.abs(ref.astype(np.float64) - ref_passed).max()),
        "ref_vs_ort": float(np.abs(ref.astype(np.float64) - got).max()),
        "scale": float(np.abs(ref).max()),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
