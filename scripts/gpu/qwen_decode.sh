#!/usr/bin/env bash
# On the lent GPU machine (after scripts/gpu/ort_cuda_env.sh has the ONNX Runtime GPU parts): LLM decode at
# Qwen2.5-0.5B's shapes with random weights. transformers makes the model (saved as a Hugging Face folder) and
# times its own `generate` in fp16 (512-token prompt, 128 new tokens, greedy); trt-diff builds an fp16 ONNX-only
# bundle from the same folder (no TensorRT there) and generates the same lengths with --backend cuda.
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
q=/tmp/qwen05
python3 - "$q" <<'PY'
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
for r in range(3):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.no_grad():
        m(ids)
    torch.cuda.synchronize(); prefill = time.perf_counter() - t
    t = time.perf_counter()
    m.generate(ids, max_new_tokens=128, min_new_tokens=128, **kw)
    torch.cuda.synchronize(); total = time.perf_counter() - t
    print(f"transformers {transformers.__version__} fp16 round {r}: prefill 512 tokens {prefill*1e3:.1f} ms; "
          f"generate 128 tokens {total:.3f} s; decode {127 / (total - prefill):.1f} tok/s")
PY
prompt=$(python3 -c "print(' '.join(['the quick brown fox jumps over the lazy dog'] * 57))")
for p in ${PRECISIONS:-fp16}; do
  echo "== trt-diff build ($p, ONNX-only)"
  limited 300 "$bin" build "$q" --tokenizer "$vocab" --precision "$p" --max-context 1024 \
    --onnx-only --out "/tmp/qb_$p/qwen.plan" --no-progress
  for r in 0 1 2; do
    echo "== trt-diff generate --backend cuda ($p), round $r"
    limited 120 "$bin" generate --engine "/tmp/qb_$p/qwen.plan.json" --backend cuda --prompt "$prompt" \
      --max-tokens 128 --ignore-eos >/dev/null
  done
  # Where the time goes: ONNX Runtime's per-node profile of one run (prefill + 16 tokens).
  rm -rf "/tmp/qprof_$p"; mkdir -p "/tmp/qprof_$p"
  TRT_DIFF_ORT_PROFILE="/tmp/qprof_$p" limited 120 "$bin" generate --engine "/tmp/qb_$p/qwen.plan.json" \
    --backend cuda --prompt "$prompt" --max-tokens 16 --ignore-eos >/dev/null
  python3 scripts/gpu/ort_profile_summary.py /tmp/qprof_$p/*.json --top 12
done
