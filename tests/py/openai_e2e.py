"""End-to-end checks of `trt-diff serve` with the official `openai` Python client (run by tests/server_openai.rs).

    python tests/py/openai_e2e.py BASE_URL API_KEY

BASE_URL is the server's root (http://127.0.0.1:PORT); the server serves stories260K (llama2.c) with --api-key.
Prints one line per check; exits non-zero at the first failure.
"""
import json
import sys
import threading
import urllib.request

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
REFERENCE = ", there was a little girl named Lily"


def check(name, cond, detail=""):
    if not cond:
        raise SystemExit(f"FAIL {name}: {detail}")
    print(f"ok {name}")


def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    return json.load(urllib.request.urlopen(req))


def raises(name, status, fn, needle=""):
    try:
        fn()
    except openai.APIStatusError as e:
        msg = str(e)
        check(name, e.status_code == status and needle in msg, f"status {e.status_code}: {msg}")
        return
    raise SystemExit(f"FAIL {name}: no error")


# Models.
models = client.models.list()
ids = [m.id for m in models.data]
check("models.list", len(ids) == 1, ids)
model = ids[0]
check("models.retrieve", client.models.retrieve(model).id == model)
raises("models.retrieve unknown", 404, lambda: client.models.retrieve("no-such-model"), "does not exist")

# Completions: greedy reference, exact usage.
prompt = "Once upon a time"
n_prompt = len(post("/tokenize", {"content": prompt, "add_special": True})["tokens"])
r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
text = r.choices[0].text
check("completion greedy", text.startswith(REFERENCE), text)
check("completion usage", (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens)
      == (n_prompt, 12, n_prompt + 12), r.usage)
check("completion finish_reason", r.choices[0].finish_reason == "length", r.choices[0].finish_reason)
check("detokenize", post("/detokenize", {"tokens": post("/tokenize", {"content": prompt})["tokens"]})["content"]
      .strip() == prompt)

# Streaming equals non-streaming; stream_options.include_usage gives a last chunk with usage and no choices.
chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
streamed = "".join(c.choices[0].text for c in chunks if c.choices)
check("completion stream == non-stream", streamed == text, (streamed, text))
check("completion stream usage", chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
      and chunks[-1].usage.prompt_tokens == n_prompt, chunks[-1])

# Chat: non-streamed and streamed agree, role first, exact usage.
msgs = [{"role": "user", "content": "Once upon a time"}]
c = client.chat.completions.create(model=model, messages=msgs, max_completion_tokens=20, temperature=0)
reply = c.choices[0].message.content
check("chat", c.choices[0].message.role == "assistant" and len(reply) > 0, c)
check("chat max_completion_tokens", c.usage.completion_tokens == 20, c.usage)
chunks = list(client.chat.completions.create(model=model, messages=msgs, max_completion_tokens=20, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
check("chat stream role first", chunks[0].choices[0].delta.role == "assistant", chunks[0])
streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
check("chat stream == non-stream", streamed == reply, (streamed, reply))
check("chat stream usage", chunks[-1].usage.prompt_tokens == c.usage.prompt_tokens
      and chunks[-1].usage.completion_tokens == 20, chunks[-1].usage)

# Content parts: text parts equal the plain string; other parts are refused clearly.
parts = [{"role": "user", "content": [{"type": "text", "text": "Once upon "}, {"type": "text", "text": "a time"}]}]
c2 = client.chat.completions.create(model=model, messages=parts, max_tokens=20, temperature=0)
check("content parts", c2.choices[0].message.content == reply, c2.choices[0].message.content)
raises("image part refused", 400, lambda: client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
    "text only")

# Logprobs: each <= 0, tokens join to the text, top alternatives sorted, the greedy pick is the best one.
r = client.completions.create(model=model, prompt=prompt, max_tokens=15, temperature=0, logprobs=3)
lp = r.choices[0].logprobs
check("completion logprobs join", "".join(lp.tokens) == r.choices[0].text, (lp.tokens, r.choices[0].text))
check("completion logprobs <= 0", all(v <= 0 for v in lp.token_logprobs) and len(lp.token_logprobs) == 15)
check("completion top_logprobs", all(len(t) == 3 and max(t.values()) <= 0 for t in lp.top_logprobs))
check("greedy token is the most likely", all(abs(v - max(t.values())) < 1e-5
                                              for v, t in zip(lp.token_logprobs, lp.top_logprobs)))
c = client.chat.completions.create(model=model, messages=msgs, max_tokens=15, temperature=0.9, seed=3,
                                   logprobs=True, top_logprobs=2)
content = c.choices[0].logprobs.content
check("chat logprobs join", "".join(t.token for t in content) == c.choices[0].message.content)
check("chat logprobs <= 0", all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content))
chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=15, temperature=0.9, seed=3,
                                             logprobs=True, top_logprobs=2, stream=True))
streamed_lp = [t.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
               for t in ch.choices[0].logprobs.content]
check("chat stream logprobs", streamed_lp == [t.logprob for t in content], (streamed_lp, content))

# Prompt arrays (strings and token ids) and n.
ids_prompt = post("/tokenize", {"content": prompt, "add_special": True})["tokens"]
r = client.completions.create(model=model, prompt=[prompt, ids_prompt], max_tokens=12, temperature=0, n=2)
check("prompt array + n", [c.index for c in r.choices] == [0, 1, 2, 3], r.choices)
check("prompt array texts", all(c.text == text for c in r.choices), [c.text for c in r.choices])
check("prompt array usage", r.usage.prompt_tokens == 2 * n_prompt and r.usage.completion_tokens == 48, r.usage)
r = client.completions.create(model=model, prompt=ids_prompt, max_tokens=12, temperature=0)
check("token-id prompt", r.choices[0].text == text, r.choices[0].text)

# Seeds: the same seed gives the same text, also with several requests at once; n choices differ.
kw = dict(model=model, prompt="The dog", max_tokens=20, temperature=1.0, seed=42)
first = client.completions.create(**kw).choices[0].text
results = [None] * 6
def one(i):
    results[i] = client.completions.create(**kw).choices[0].text
threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
check("seed determinism (concurrent)", all(x == first for x in results), results)
r = client.completions.create(**kw, n=3)
check("n with a seed", r.choices[0].text == first and len({c.text for c in r.choices}) > 1,
      [c.text for c in r.choices])

# Errors before a stream's first byte are 4xx answers, not 200 with an error event.
raises("too-long prompt, streamed", 400, lambda: list(client.completions.create(
    model=model, prompt="story " * 600, max_tokens=10, stream=True)), "context")
raises("unknown field", 400, lambda: client.completions.create(
    model=model, prompt=prompt, max_tokens=2, extra_body={"bogus": 1}), "unknown field `bogus`")
client.completions.create(model=model, prompt=prompt, max_tokens=2, user="someone")
print("ok OpenAI-defined field accepted (user)")

# response_format through constrained decoding: the output parses and matches the schema, streamed or not.
schema = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "word"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9},
                         "word": {"type": "string", "enum": ["cat", "dog"]}}}
rf = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
for temperature, seed in [(0, 0), (1.0, 5), (1.0, 6)]:
    c = client.chat.completions.create(model=model, messages=msgs, max_tokens=60, temperature=temperature, seed=seed,
                                       response_format=rf)
    doc = json.loads(c.choices[0].message.content)
    check(f"json_schema (temperature {temperature})",
          set(doc) == {"ok", "n", "word"} and isinstance(doc["ok"], bool) and isinstance(doc["n"], int)
          and 0 <= doc["n"] <= 9 and doc["word"] in ("cat", "dog") and c.choices[0].finish_reason == "stop", doc)
chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=60, temperature=1.0, seed=6,
                                             response_format=rf, stream=True))
check("json_schema streamed", "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
      == c.choices[0].message.content)
c = client.chat.completions.create(model=model, messages=msgs, max_tokens=30, temperature=0,
                                   response_format={"type": "json_object"})
check("json_object", c.choices[0].message.content.startswith("{"), c.choices[0].message.content)
raises("bad schema", 400, lambda: client.chat.completions.create(
    model=model, messages=msgs, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
    "nonsense")
raises("tools refused", 400, lambda: client.chat.completions.create(
    model=model, messages=msgs, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tool")

# An empty reply (a stop string matches at once) still streams the role delta, then finish_reason "stop".
stops = [reply[0]]  # the greedy reply's first character
chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0,
                                             stop=stops, stream=True))
check("empty reply role delta", chunks[0].choices[0].delta.role == "assistant", chunks[0])
check("empty reply", "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""
      and chunks[-1].choices[0].finish_reason == "stop", chunks)

# The key.
bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
raises("wrong api key", 401, lambda: bad.models.list(), "invalid API key")
print("all ok")
