"""Sums an ONNX Runtime profile (TRT_DIFF_ORT_PROFILE=DIR; one JSON trace per session) by operator type.

    python3 scripts/gpu/ort_profile_summary.py DIR/transformer_*.json [--top 15]

Prints, per op type, the kernel time over the whole trace (ms), its share, the node runs, and the mean per run
(the events named `<node>_kernel_time`, which ONNX Runtime records for every node it executes), then the number
of session runs and their mean wall time (`model_run` events)."""
import argparse
import collections
import json

ap = argparse.ArgumentParser()
ap.add_argument("traces", nargs="+")
ap.add_argument("--top", type=int, default=15)
a = ap.parse_args()
for path in a.traces:
    events = json.load(open(path))
    per_op = collections.defaultdict(lambda: [0, 0])
    runs = []
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op][0] += e.get("dur", 0)
            per_op[op][1] += 1
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append(e.get("dur", 0))
    total = sum(v[0] for v in per_op.values()) or 1
    print(f"== {path}: {len(runs)} runs, mean {sum(runs) / max(len(runs), 1) / 1e3:.2f} ms per run; "
          f"node kernel time {total / 1e3:.1f} ms in all")
    print(f"{'op':<32} {'ms':>10} {'share':>7} {'runs':>8} {'us/run':>9}")
    for op, (us, n) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[: a.top]:
        print(f"{op:<32} {us / 1e3:>10.2f} {us / total * 100:>6.1f}% {n:>8} {us / n:>9.1f}")
