#!/usr/bin/env bash
# On the lent GPU machine (ONNX Runtime's GPU parts in place, the binary in .devcarry/gpu): the tiny golden Gemma 2 /
# Gemma 3 models served on the CPU backend (f32 CPU graph) and on CUDA (bf16 CUDA graph: GroupQueryAttention with
# soft-capping and per-layer windows, FastGelu), the top-5 log-probabilities of 8 greedy steps compared. bf16
# activations keep about 3 significant digits, so the two agree to about 1e-2; a dropped soft-cap or window would
# move them by far more. Output: $OUT/gemma_logprobs.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
exec > >(tee "$out/gemma_logprobs.txt") 2>&1
source scripts/gpu/ort_cuda_env.sh >/dev/null 2>&1
bin=.devcarry/gpu/trt-diff
chmod +x "$bin"
w=$(mktemp -d)
port=8393
for arch in gemma2 gemma3; do
  d=tests/golden/llm/tiny_$arch
  "$bin" build "$d" --tokenizer "$d/tiny_${arch}_q8_0.gguf" --onnx-only --out "$w/$arch.plan" --no-progress >/dev/null
  for b in cpu cuda; do
    "$bin" serve --engine "$w/$arch.plan.json" --backend "$b" --port $port >"$w/$arch.$b.serve.log" 2>&1 &
    pid=$!
    for i in $(seq 100); do curl -s localhost:$port/v1/models >/dev/null 2>&1 && break; sleep 0.1; done
    curl -s localhost:$port/v1/completions -H 'content-type: application/json' \
      -d '{"prompt": "t1 t2 t3 t4 t5 t6 t7", "max_tokens": 8, "temperature": 0, "logprobs": 5}' >"$w/$arch.$b.json"
    kill $pid
    wait $pid 2>/dev/null
  done
  python3 - "$w/$arch.cpu.json" "$w/$arch.cuda.json" "$arch" <<'PY'
import json, sys
a, b = (json.load(open(p))["choices"][0]["logprobs"]["top_logprobs"] for p in sys.argv[1:3])
worst, same = 0.0, 0
for sa, sb in zip(a, b):
    for tok, lp in sa.items():
        if tok in sb:
            worst = max(worst, abs(lp - sb[tok]))
            same += 1
n = sum(len(s) for s in a)
ok = len(a) == len(b) == 8 and same >= 0.9 * n and worst < 0.05
print(("PASS" if ok else "FAIL"), f"{sys.argv[3]}: {len(a)} steps, {same}/{n} top-5 tokens shared, max |logprob cuda - cpu| "
      f"{worst:.4f}; first step cpu {sorted(a[0].items(), key=lambda t: -t[1])[:3]}")
PY
done
grep -ih "error\|warn" "$w"/*.serve.log | head -5
rm -rf "$w"
