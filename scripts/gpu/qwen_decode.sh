#!/usr/bin/env bash
# On the lent GPU machine (after scripts/gpu/ort_cuda_env.sh has the ONNX Runtime GPU parts): LLM decode at
# Qwen2.5-0.5B's shapes with random weights. transformers makes the model (saved as a Hugging Face folder) and
# times its own `generate` in fp16 (512-token prompt, 128 new tokens, greedy); trt-diff builds an fp16 ONNX-only
# bundle from the same folder (no TensorRT there) and generates the same lengths with --backend cuda.
# Also checks 32 greedy tokens of the CUDA graph, the TensorRT graph on CUDA and the CPU graph against transformers.
# ROUNDS (3) timing rounds, SERVER_VARIANTS (graph:cuda-graphs pairs) for the server, NO_PROFILE=1 skips the profile.
# Needs .devcarry/gpu/trt-diff and .devcarry/gpu/ggml-vocab-qwen2.gguf. Output: $OUT/qwen_decode.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
exec > >(tee "$out/qwen_decode.txt") 2>&1
source scripts/gpu/ort_cuda_env.sh >/dev/null 2>&1
source scripts/gpu/limited.sh
g=.devcarry/gpu
bin=$g/trt-diff
chmod +x "$bin"
# The vocabulary may come in a call of its own (.devcarry/extra) when the carried parts are tight.
vocab=$g/ggml-vocab-qwen2.gguf
[ -f "$vocab" ] || vocab=.devcarry/extra/ggml-vocab-qwen2.gguf
# The tiny Qwen2 golden model (bf16 weights, exact in f16): the CUDA graph against the CPU graph, by `generate`
# and through the server's batched slots (--parallel 2, two requests at once).
t=/tmp/tinyq
limited 120 "$bin" build tests/golden/llm/tiny_qwen2 --tokenizer tests/golden/llm/wpm/wpm.gguf --precision fp16 \
  --onnx-only --out $t/q.plan --no-progress
for b in cpu cuda; do
  limited 60 "$bin" generate --engine $t/q.plan.json --backend $b --prompt "hello world" --max-tokens 24 \
    --ignore-eos >$t/$b.txt
done
TRT_DIFF_CUDA_LLM_GRAPH=tensorrt limited 60 "$bin" generate --engine $t/q.plan.json --backend cuda \
  --prompt "hello world" --max-tokens 24 --ignore-eos >$t/cuda_tensorrt.txt
for f in cuda cuda_tensorrt; do
  if cmp -s $t/cpu.txt $t/$f.txt; then echo "PASS tiny qwen2 $f: same 24 tokens as the CPU graph"; else
    echo "FAIL tiny qwen2 $f: '$(cat $t/$f.txt)' vs cpu '$(cat $t/cpu.txt)'"; fi
done
"$bin" serve --engine $t/q.plan.json --backend cuda --parallel 2 --port 8391 >$t/serve.log 2>&1 &
spid=$!
for i in $(seq 50); do curl -s localhost:8391/v1/models >/dev/null 2>&1 && break; sleep 0.2; done
req='{"prompt": "hello world", "max_tokens": 24, "temperature": 0, "ignore_eos": true}'
pids=()
for i in 1 2; do
  curl -s --max-time 60 localhost:8391/v1/completions -H 'content-type: application/json' -d "$req" >$t/s$i.json &
  pids+=($!)
done
wait "${pids[@]}"
kill $spid; wait $spid 2>/dev/null
for i in 1 2; do
  python3 - $t/s$i.json $t/cpu.txt <<'PY'
import json, sys
got = json.load(open(sys.argv[1]))["choices"][0]["text"]
want = open(sys.argv[2]).read().rstrip("\n")
print(("PASS" if got == want else "FAIL") + f" server slot request: {got!r}" + ("" if got == want else f" vs {want!r}"))
PY
done
grep -iE "error|warn" $t/serve.log | head -5
q=/tmp/qwen05
prompt=$(python3 -c "print(' '.join(['the quick brown fox jumps over the lazy dog'] * 57))")
"$bin" tokenize --vocab "$vocab" "$prompt" >/tmp/qwen_prompt_ids.txt
rounds=${ROUNDS:-3}
python3 - "$q" /tmp/qwen_prompt_ids.txt /tmp/qwen_hf_ids.txt "$rounds" <<'PY'
import sys, time, torch, transformers
cfg = transformers.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
torch.manual_seed(0)
m = transformers.Qwen2ForCausalLM(cfg).to(torch.float16)
m.save_pretrained(sys.argv[1])
m = m.cuda().eval()
ids = torch.randint(0, 150000, (1, 512), device="cuda")
kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
m.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
for r in range(int(sys.argv[4])):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.no_grad():
        m(ids)
    torch.cuda.synchronize(); prefill = time.perf_counter() - t
    t = time.perf_counter()
    m.generate(ids, max_new_tokens=128, min_new_tokens=128, **kw)
    torch.cuda.synchronize(); total = time.perf_counter() - t
    print(f"transformers {transformers.__version__} fp16 round {r}: prefill 512 tokens {prefill*1e3:.1f} ms; "
          f"generate 128 tokens {total:.3f} s; decode {127 / (total - prefill):.1f} tok/s")
# The reference continuation of the prompt trt-diff runs (same token ids), greedy, for the correctness check.
prompt = torch.tensor([[int(x) for x in open(sys.argv[2]).read().split()]], device="cuda")
out = m.generate(prompt, max_new_tokens=32, min_new_tokens=32, **kw)
open(sys.argv[3], "w").write(" ".join(str(int(x)) for x in out[0, prompt.shape[1]:]))
PY
same_prefix() { # A B: how many leading tokens two texts share (tokenized with the model's vocabulary)
  python3 - "$("$bin" tokenize --vocab "$vocab" "$1")" "$("$bin" tokenize --vocab "$vocab" "$2")" <<'PY'
import sys
a, b = sys.argv[1].split(), sys.argv[2].split()
n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"{n} of {max(len(a), len(b))} tokens agree")
PY
}
for p in ${PRECISIONS:-fp16}; do
  echo "== trt-diff build ($p, ONNX-only)"
  limited 300 "$bin" build "$q" --tokenizer "$vocab" --precision "$p" --max-context 1024 \
    --onnx-only --out "/tmp/qb_$p/qwen.plan" --no-progress
  ls -la /tmp/qb_$p
  # The CUDA graph (flash attention, KV cache in place on the GPU) with decode steps replayed as CUDA graphs (the
  # default) and without (TRT_DIFF_CUDA_GRAPHS=0), and the TensorRT graph (KV cache passed between calls),
  # alternating.
  variants="cuda:1 cuda:0 tensorrt:0"
  for r in $(seq 1 "$rounds"); do
    for v in $variants; do
      graph=${v%:*}; graphs=${v#*:}
      echo "== trt-diff generate --backend cuda ($p, $graph graph, CUDA graphs $graphs), round $r"
      TRT_DIFF_CUDA_LLM_GRAPH=$graph TRT_DIFF_CUDA_GRAPHS=$graphs limited 120 "$bin" generate \
        --engine "/tmp/qb_$p/qwen.plan.json" --backend cuda --prompt "$prompt" --max-tokens 128 --ignore-eos \
        >/dev/null
    done
  done
  echo "== correctness: 32 greedy tokens after the same prompt"
  ref=$("$bin" tokenize --vocab "$vocab" --decode "$(cat /tmp/qwen_hf_ids.txt)")
  for graph in cuda tensorrt; do
    TRT_DIFF_CUDA_LLM_GRAPH=$graph limited 120 "$bin" generate --engine "/tmp/qb_$p/qwen.plan.json" \
      --backend cuda --prompt "$prompt" --max-tokens 32 --ignore-eos >"/tmp/qwen_$graph.txt"
  done
  TRT_DIFF_CUDA_GRAPHS=0 limited 120 "$bin" generate --engine "/tmp/qb_$p/qwen.plan.json" \
    --backend cuda --prompt "$prompt" --max-tokens 32 --ignore-eos >"/tmp/qwen_nographs.txt"
  limited 300 "$bin" generate --engine "/tmp/qb_$p/qwen.plan.json" --backend cpu --prompt "$prompt" \
    --max-tokens 32 --ignore-eos >/tmp/qwen_cpu.txt 2>/dev/null
  echo "cuda graph vs transformers: $(same_prefix "$(cat /tmp/qwen_cuda.txt)" "$ref")"
  echo "tensorrt graph on cuda vs transformers: $(same_prefix "$(cat /tmp/qwen_tensorrt.txt)" "$ref")"
  echo "cpu graph vs transformers: $(same_prefix "$(cat /tmp/qwen_cpu.txt)" "$ref")"
  echo "cuda graph without CUDA graphs vs transformers: $(same_prefix "$(cat /tmp/qwen_nographs.txt)" "$ref")"
  echo "cuda graph vs cpu graph: $(same_prefix "$(cat /tmp/qwen_cuda.txt)" "$(cat /tmp/qwen_cpu.txt)")"
  # A warm prefill: the server keeps the session open; after a warm-up request, the wall time of a request for one
  # token after the 513-token prompt is the prefill (plus tokenizing and HTTP, well under a millisecond here).
  for v in ${SERVER_VARIANTS:-$variants}; do
    graph=${v%:*}; graphs=${v#*:}
    TRT_DIFF_CUDA_LLM_GRAPH=$graph TRT_DIFF_CUDA_GRAPHS=$graphs "$bin" serve --engine "/tmp/qb_$p/qwen.plan.json" --backend cuda --port 8392 \
      >/tmp/qserve.log 2>&1 &
    spid=$!
    for i in $(seq 150); do curl -s localhost:8392/v1/models >/dev/null 2>&1 && break; sleep 0.2; done
    body() { python3 -c "import json,sys; print(json.dumps({'prompt': sys.argv[1], 'max_tokens': int(sys.argv[2]), 'temperature': 0, 'ignore_eos': True}))" "$prompt" "$1"; }
    post() { curl -s -o /dev/null -w '%{time_total}(%{http_code})' --max-time 60 localhost:8392/v1/completions -H 'content-type: application/json' -d "$(body "$1")"; }
    post 8 >/dev/null
    pre=$(for r in 1 2 3; do post 1; echo -n " "; done)
    full=$(for r in 1 2 3; do post 129; echo -n " "; done)
    echo "server, $graph graph, CUDA graphs $graphs (warm): 513-token prompt + 1 token: ${pre}s; + 129 tokens: ${full}s"
    grep -i "warn\|error" /tmp/qserve.log | head -3
    kill $spid; wait $spid 2>/dev/null
  done
  [ -z "${NO_PROFILE:-}" ] || continue
  # Where the time goes: ONNX Runtime's per-node profile of one run (prefill + 16 tokens) on the CUDA graph.
  rm -rf "/tmp/qprof_$p"; mkdir -p "/tmp/qprof_$p"
  TRT_DIFF_ORT_PROFILE="/tmp/qprof_$p" limited 120 "$bin" generate --engine "/tmp/qb_$p/qwen.plan.json" \
    --backend cuda --prompt "$prompt" --max-tokens 16 --ignore-eos >/dev/null
  python3 scripts/gpu/ort_profile_summary.py /tmp/qprof_$p/*.json --top 12
done
