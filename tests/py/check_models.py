"""Runs onnx.checker (full check) on each ONNX file given and prints `ok PATH` for each."""
import sys

import onnx


def main(paths):
    for p in paths:
        model = onnx.load(p)
        onnx.checker.check_model(model, full_check=True)
        print(f"ok {p}")


if __name__ == "__main__":
    main(sys.argv[1:])
