"""Continuous batching of `trt-diff serve --parallel N`, with the official `openai` client (run by
tests/server_batching.rs).

    python tests/py/batching.py ALONE_URL BATCHED_URL MODEL_KIND

ALONE_URL serves with --parallel 1, BATCHED_URL with --parallel 4, both fresh, same engine. MODEL_KIND is
"stories" (stories260K, 512 positions: also checks prefix reuse on a chat history) or "qwen" (a tiny Qwen2 GGUF of
64 positions). Prints one line per check; exits non-zero at the first failure.
"""
import json
import sys
import threading
import urllib.request

import openai

alone_url, batched_url, kind = sys.argv[1], sys.argv[2], sys.argv[3]


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


alone, batched = client(alone_url), client(batched_url)


def check(name, cond, detail=""):
    if not cond:
        raise SystemExit(f"FAIL {name}: {detail}")
    print(f"ok {name}")


def metric(base, name):
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise SystemExit(f"FAIL metric {name} missing")


def complete(c, req):
    """(text, finish_reason, completion_tokens) of one completion, streamed or not."""
    req = dict(req)
    if req.pop("stream", False):
        parts, finish, used = [], None, None
        for ch in c.completions.create(model="m", stream=True, stream_options={"include_usage": True}, **req):
            for choice in ch.choices:
                parts.append(choice.text)
                finish = choice.finish_reason or finish
            if ch.usage:
                used = ch.usage.completion_tokens
        return "".join(parts), finish, used
    r = c.completions.create(model="m", **req)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


def concurrently(c, reqs):
    results = [None] * len(reqs)
    errors = []

    def run(i):
        try:
            results[i] = complete(c, reqs[i])
        except Exception as e:  # reported below with the request
            errors.append((reqs[i], repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check("concurrent requests succeed", not errors, errors)
    return results


if kind == "stories":
    prompts = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day, a big", "Sam had a red ball",
               "The sun was", "Mom said", "There was a tree"]
    lengths = [40, 7, 25, 60, 12, 33, 18, 50]
    stops = [None, None, ["."], None, [" the", "!"], ["\n"], None, ["ball"]]
else:
    prompts = ["Hello", "The weather", "A B C", "one two three", "Paris is", "I think"]
    lengths = [20, 6, 30, 11, 25, 15]
    stops = [None, None, ["a"], None, [" "], None]

# Prefix reuse on a chat history: the second turn starts with the first turn's tokens, which stay in the slot.
if kind == "stories":
    first = [{"role": "user", "content": "Tell me a story about a cat."}]
    r1 = batched.chat.completions.create(model="m", messages=first, max_tokens=30, temperature=0)
    check("first turn runs the whole prompt", r1.usage.prompt_tokens_details.cached_tokens == 0, r1.usage)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And then what happened to the cat?"}]
    # The same request on the other (fresh) server: nothing cached to reuse.
    fresh = alone.chat.completions.create(model="m", messages=second, max_tokens=30, temperature=0)
    check("no cache, no reuse", fresh.usage.prompt_tokens_details.cached_tokens == 0, fresh.usage)
    before = metric(batched_url, "trt_diff_prompt_tokens_total")
    reused = batched.chat.completions.create(model="m", messages=second, max_tokens=30, temperature=0)
    cached = reused.usage.prompt_tokens_details.cached_tokens
    run = metric(batched_url, "trt_diff_prompt_tokens_total") - before
    check("prefix reused", cached >= 10, reused.usage)
    check("only the rest of the prompt runs", run == reused.usage.prompt_tokens - cached,
          (run, reused.usage.prompt_tokens, cached))
    check("reuse gives the same reply", reused.choices[0].message.content == fresh.choices[0].message.content,
          (reused.choices[0].message.content, fresh.choices[0].message.content))
    check("cached-token metric", metric(batched_url, "trt_diff_prompt_tokens_cached_total") >= cached)

# Greedy: each request alone on the one-slot server, then all at once on the four-slot one (more requests than
# slots, so some wait and join between steps), streamed and not.
reqs = [dict(prompt=p, max_tokens=m, temperature=0, **({"stop": s} if s else {}), stream=i % 2 == 1)
        for i, (p, m, s) in enumerate(zip(prompts, lengths, stops))]
want = [complete(alone, r) for r in reqs]
check("alone: some stop strings matched", any(w[1] == "stop" for w in want), want)
check("alone: some hit max_tokens", any(w[1] == "length" for w in want), want)
got = concurrently(batched, reqs)
for r, w, g in zip(reqs, want, got):
    check(f"greedy batched = alone ({r['prompt']!r}, {r['max_tokens']})", g == w, (g, w))
got = concurrently(alone, reqs)
check("greedy queued on one slot = alone", got == want, (got, want))

# Seeded sampling with several sequences at once: the same tokens as alone, and as a second batched run.
sampled = [dict(prompt=p, max_tokens=m, temperature=0.9, top_p=0.95, seed=100 + i, stream=i % 3 == 0)
           for i, (p, m) in enumerate(zip(prompts, lengths))]
want = [complete(alone, r) for r in sampled]
check("seeds differ", len({w[0] for w in want}) > 1, want)
got = concurrently(batched, sampled)
check("seeded batched = alone", got == want, (got, want))
check("seeded batched twice", concurrently(batched, sampled) == want)

# n choices of one request run in several slots at once.
r = batched.completions.create(model="m", prompt=prompts[0], max_tokens=lengths[0], temperature=0.9, seed=7, n=3)
for j, choice in enumerate(r.choices):
    one = alone.completions.create(model="m", prompt=prompts[0], max_tokens=lengths[0], temperature=0.9, seed=7 + j)
    check(f"choice {j} of n=3 = seed + {j} alone", choice.text == one.choices[0].text, (choice.text, one.choices[0].text))

props = json.load(urllib.request.urlopen(batched_url + "/props"))
check("props total_slots", props["total_slots"] == 4, props["total_slots"])
check("nothing left running", metric(batched_url, "llamacpp:requests_processing") == 0
      and metric(batched_url, "llamacpp:kv_cache_tokens") == 0)
print("all ok")
