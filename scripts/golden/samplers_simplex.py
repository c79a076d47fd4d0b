#!/usr/bin/env python3
"""Golden file for noise type "simplex": RES4LYF's `SimplexNoiseGenerator` (beta/noise_classes.py) over the real
`opensimplex` package (0.4.5.1, pure Python without numba).

    /path/to/venv/bin/pip install --no-deps opensimplex
    /path/to/venv/bin/python scripts/golden/samplers_simplex.py /path/to/RES4LYF \
        tests/golden/samplers/simplex.json

(a venv with torch and numpy). RES4LYF's `NoiseGenerator` and `SimplexNoiseGenerator` classes are taken from its
source by `ast` (the module imports ComfyUI, and ships with OpenSimplex switched off) and run unmodified; nothing of
RES4LYF or opensimplex is committed. Stored: successive calls of the generator for a few seeds and shapes
(RES4LYF adds 1 to the OpenSimplex seed after each call), and raw `noise3` values at random non-integer points,
which reach every region of the algorithm.
"""
import ast
import json
import os
import random
import sys


def main():
    root, path = sys.argv[1], sys.argv[2]
    import numpy as np
    import opensimplex
    import torch
    from opensimplex import OpenSimplex

    src = open(os.path.join(root, "beta", "noise_classes.py")).read()
    wanted = {"NoiseGenerator", "SimplexNoiseGenerator"}
    body = [n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name in wanted]
    assert len(body) == 2, "classes not found"
    ns = {"torch": torch, "np": np, "OpenSimplex": OpenSimplex}
    exec(compile(ast.Module(body=body, type_ignores=[]), "noise_classes.py", "exec"), ns)

    fields = []
    for seed, shape, calls in [
        (42, (4, 16, 16), 2),
        (0, (3, 20, 12), 1),
        (123456789012, (2, 8, 40), 1),
        (2**64 - 3, (1, 9, 7), 2),
    ]:
        x = torch.zeros((1, *shape), dtype=torch.float64)
        gen = ns["SimplexNoiseGenerator"](x=x, seed=seed)
        outs = []
        for _ in range(calls):
            out = gen()
            assert tuple(out.shape) == (1, *shape)
            outs.append([float(v) for v in out.flatten()])
        fields.append({"seed": seed, "shape": list(shape), "calls": outs})

    rng = random.Random(5)
    points = []
    for seed in [3, 77, -12345]:
        gen = OpenSimplex(seed)
        for _ in range(300):
            # Multiples of 2^-10: short decimals that any JSON reader parses exactly.
            p = [round(rng.uniform(-40.0, 40.0) * 1024) / 1024 for _ in range(3)]
            points.append({"seed": seed, "p": p, "v": float(gen.noise3(*p))})
    with open(path, "w") as f:
        json.dump({"opensimplex": opensimplex.__version__ if hasattr(opensimplex, "__version__") else "0.4.5.1",
                   "fields": fields, "points": points}, f, separators=(",", ":"))
    print(f"wrote {path}: {len(fields)} generators, {len(points)} points")


if __name__ == "__main__":
    main()
