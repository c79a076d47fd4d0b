#!/usr/bin/env python3
"""Golden file for the resizing the pyramid noise types do: torch.nn.functional.interpolate (nearest,
nearest-exact, bilinear, bicubic; align_corners=False) of the 2-D field
src[y][x] = ((7 y + 13 x) mod 17) / 17 - 0.3 y / H, in float64.

    python scripts/golden/samplers_resize.py tests/golden/samplers    (needs torch)
"""
import json
import os
import sys

import torch


def main(out):
    cases = []
    # The source is a fixed formula (the test recomputes it), so only the outputs are stored.
    for (hi, wi), (ho, wo) in [((37, 23), (16, 16)), ((5, 7), (16, 12)), ((40, 24), (8, 8)), ((12, 12), (12, 12))]:
        src = torch.tensor([[((y * 7 + x * 13) % 17) / 17.0 - 0.3 * y / hi for x in range(wi)] for y in range(hi)],
                           dtype=torch.float64)
        for mode in ["nearest", "nearest-exact", "bilinear", "bicubic"]:
            kw = {} if mode.startswith("nearest") else {"align_corners": False}
            o = torch.nn.functional.interpolate(src[None, None], size=(ho, wo), mode=mode, **kw)[0, 0]
            cases.append({"mode": mode, "in": [hi, wi], "out": [ho, wo], "dst": o.flatten().tolist()})
    with open(os.path.join(out, "resize.json"), "w") as f:
        json.dump(cases, f, separators=(",", ":"))
    print("wrote", len(cases), "cases")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/samplers")
