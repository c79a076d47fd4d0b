#!/usr/bin/env python3
"""Golden file for RES4LYF's per-channel renormalization of SDE noise: `latents.normalize_zscore(noise,
channelwise=True, inplace=True)`, which RES4LYF's `RK_NoiseSampler.add_noise` applies to every noise draw
(mean and unbiased std over the last two dims, i.e. per channel of each latent).

    /path/to/venv/bin/python scripts/golden/samplers_res4lyf_noise.py /path/to/RES4LYF \
        tests/golden/samplers/res4lyf_noise.json

(a venv with torch; RES4LYF checked at 022c873). The function is taken from RES4LYF's latents.py by `ast` (the
module imports ComfyUI) and run unmodified in float64 on deterministic inputs; nothing of RES4LYF is committed.
"""
import ast
import json
import math
import os
import sys


def main():
    root, path = sys.argv[1], sys.argv[2]
    import torch

    src = open(os.path.join(root, "latents.py")).read()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "normalize_zscore")
    ns = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "latents.py", "exec"), ns)
    cases = []
    for shape in [(1, 4, 3, 5), (2, 3, 4, 4), (1, 16, 8, 8)]:
        n = math.prod(shape)
        x = [math.sin(0.37 * i * i + 0.5) * (1.0 + 0.3 * math.cos(0.11 * i)) + 0.2 * (i % 7) for i in range(n)]
        t = torch.tensor(x, dtype=torch.float64).reshape(shape)
        out = ns["normalize_zscore"](t.clone(), channelwise=True, inplace=True)
        cases.append({"shape": list(shape), "x": x, "out": [float(v) for v in out.flatten()]})
    with open(path, "w") as f:
        json.dump({"zscore": cases}, f, separators=(",", ":"))
    print(f"wrote {path}: {len(cases)} cases")


if __name__ == "__main__":
    main()
