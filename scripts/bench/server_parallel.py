"""Concurrent streaming clients against `trt-diff serve --parallel N` and llama-cpp-python's server on the same
GGUF, CPU: aggregate generated tokens/s and time to first token (p50/p99), in alternating rounds (the machine is
shared and noisy: every configuration runs once per round, and the table gives the median and the range).

usage: python scripts/bench/server_parallel.py --trt-diff target/release/trt-diff --model MODEL.gguf|PLAN
         [--llama-server PATH/llama-server] [--peer-python /work/llamavenv/bin/python] [--clients 64]
         [--parallel 1,8] [--max-tokens 32] [--rounds 3] [--threads 2]

Needs only the standard library (the peer's Python needs `llama-cpp-python[server]`). Every client sends one
streaming /v1/completions request (a different short prompt each, temperature 0, ignore_eos so that every request
generates --max-tokens tokens) at the same moment. Servers start once per configuration and get one warm-up request.
llama-cpp-python's server (`python -m llama_cpp.server`) serves one request at a time: it has no slots, so it runs
as its own row (parallelism 1) whatever --parallel says. llama.cpp's own C++ `llama-server` (not in the wheel: built
from the llama.cpp sources inside llama-cpp-python's sdist, `cmake --build build --target llama-server`) runs at every
--parallel value, with continuous batching and 512 tokens of context per slot, as the same-parallelism peer.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day, a big", "Sam had a red ball",
           "The sun was", "Mom said", "There was a tree"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base, proc, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(base + "/v1/models", timeout=2).read()
            return
        except Exception:
            time.sleep(0.5)
    raise SystemExit("server did not start")


def one_stream(base, prompt, max_tokens, out, i, t_start):
    try:
        stream(base, prompt, max_tokens, out, i, t_start)
    except Exception as e:  # counted and shown per round
        out[i] = e


def stream(base, prompt, max_tokens, out, i, t_start):
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "model": "m"}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    first, tokens = None, 0
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[5:])
            for c in ev.get("choices", []):
                if c.get("text"):
                    if first is None:
                        first = time.perf_counter() - t_start
                    tokens += 1
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    out[i] = (first, tokens, time.perf_counter() - t_start)


def round_once(base, clients, max_tokens):
    out = [None] * clients
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one_stream, args=(base, PROMPTS[i % len(PROMPTS)] + f" {i}", max_tokens, out, i, t0))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    errors = [o for o in out if isinstance(o, Exception)]
    if errors:
        print(f"{len(errors)} of {clients} clients failed, e.g. {errors[0]!r}", file=sys.stderr)
    out = [o for o in out if isinstance(o, tuple)]
    ttft = sorted(o[0] for o in out if o and o[0] is not None)
    tokens = sum(o[1] for o in out if o)
    pct = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")
    return {"tok_s": tokens / wall, "ttft_p50": pct(0.5), "ttft_p99": pct(0.99), "tokens": tokens, "wall": wall}


def start_trt_diff(exe, model, parallel, threads):
    port = free_port()
    env = dict(os.environ)
    proc = subprocess.Popen([exe, "serve", "--engine", model, "--port", str(port), "--parallel", str(parallel)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return proc, f"http://127.0.0.1:{port}"


def start_peer(python, model, threads, n_ctx):
    port = free_port()
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", model, "--port", str(port), "--n_ctx",
                             str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--interrupt_requests", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def start_llama_server(exe, model, parallel, threads, n_ctx):
    port = free_port()
    proc = subprocess.Popen([exe, "-m", model, "--port", str(port), "--parallel", str(parallel), "--cont-batching",
                             "-c", str(n_ctx * parallel), "-t", str(threads), "-tb", str(threads), "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trt-diff", required=True)
    ap.add_argument("--model", required=True, help="what `serve --engine` takes (a GGUF or a plan)")
    ap.add_argument("--peer-model", help="the GGUF llama-cpp-python serves (default: --model)")
    ap.add_argument("--peer-python")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary: the same-parallelism peer")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--parallel", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    configs = [(f"trt-diff --parallel {p}", "trt", int(p)) for p in a.parallel.split(",")]
    if a.llama_server:
        configs += [(f"llama.cpp llama-server --parallel {p}", "lserver", int(p)) for p in a.parallel.split(",")]
    if a.peer_python:
        configs.append(("llama-cpp-python server (one at a time)", "peer", 1))
    servers = {}
    try:
        for name, kind, p in configs:
            if kind == "trt":
                proc, base = start_trt_diff(a.trt_diff, a.model, p, a.threads)
            elif kind == "lserver":
                proc, base = start_llama_server(a.llama_server, a.peer_model or a.model, p, a.threads, 512)
            else:
                proc, base = start_peer(a.peer_python, a.peer_model or a.model, a.threads, 512)
            wait_ready(base, proc)
            round_once(base, 1, 4)  # warm-up
            servers[name] = (proc, base)
        results = {name: [] for name, _, _ in configs}
        for r in range(a.rounds):
            for name, _, _ in configs:
                res = round_once(servers[name][1], a.clients, a.max_tokens)
                results[name].append(res)
                print(f"round {r}: {name}: {res['tok_s']:.1f} tok/s, TTFT p50 {res['ttft_p50']:.2f} s, "
                      f"p99 {res['ttft_p99']:.2f} s ({res['tokens']} tokens in {res['wall']:.1f} s)", file=sys.stderr)
        print(f"\n{a.clients} streaming clients x {a.max_tokens} tokens, {a.rounds} alternating rounds: median (min-max)")
        print("| server | tokens/s | TTFT p50 (s) | TTFT p99 (s) |")
        print("|---|---|---|---|")
        for name, _, _ in configs:
            rs = results[name]

            def cell(k, fmt):
                v = [x[k] for x in rs]
                return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"
            print(f"| {name} | {cell('tok_s', '{:.1f}')} | {cell('ttft_p50', '{:.2f}')} | {cell('ttft_p99', '{:.2f}')} |")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
