"""Evaluates an ONNX model with onnx.reference and saves each output as OUTDIR/NAME.npy.

usage: reference_outputs.py MODEL.onnx OUTDIR NAME=INPUT.npy ..."""
import os
import sys

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator


def main(model, outdir, *inputs):
    feeds = {k: np.load(v) for k, v in (a.split("=", 1) for a in inputs)}
    names = [o.name for o in onnx.load(model, load_external_data=False).graph.output]
    for name, value in zip(names, ReferenceEvaluator(model).run(None, feeds)):
        np.save(os.path.join(outdir, name + ".npy"), value)
        print(f"ok {name}")


if __name__ == "__main__":
    main(*sys.argv[1:])
