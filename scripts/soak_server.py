#!/usr/bin/env python3
"""Soak test for `trt-diff serve` (issue 21): N concurrent clients for some minutes doing normal and streamed
completions and chats, random disconnects mid-stream, slow readers, half-sent headers and bodies, idle
connections; RSS, open fds and threads of the server are recorded before, during and after; then a graceful stop
(SIGTERM) under full load, timed. Standard library only.

    python3 scripts/soak_server.py --minutes 10 --streams 64 [--engine stories.plan] [--binary target/debug/trt-diff]
        [--json out.json]

Without --engine it builds stories260K (../shared/data/llm) into a temporary folder. Exit status 1 when a check
fails: an unexpected answer, growth of fds/threads after the load, or a stop slower than the grace period.
"""
import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def proc_figures(pid):
    status = open(f"/proc/{pid}/status").read()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_kib": rss, "fds": fds, "threads": threads}


class Stats:
    def __init__(self):
        self.counts = {}
        self.failures = []

    def ok(self, kind):
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def fail(self, kind, msg):
        self.counts[kind + "_failed"] = self.counts.get(kind + "_failed", 0) + 1
        if len(self.failures) < 50:
            self.failures.append(f"{kind}: {msg}")


async def request(host, port, method, path, body, read_delay=0.0, read_chunk=65536, cut_after=None):
    """One request with Connection: close; returns (status, raw body). `cut_after` bytes: disconnect early."""
    r, w = await asyncio.open_connection(host, port)
    try:
        data = json.dumps(body).encode() if body is not None else b""
        w.write(
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
        )
        await w.drain()
        got = b""
        while True:
            chunk = await asyncio.wait_for(r.read(read_chunk), 120)
            if not chunk:
                break
            got += chunk
            if cut_after is not None and len(got) >= cut_after:
                return None, got
            if read_delay:
                await asyncio.sleep(read_delay)
        head, _, rest = got.partition(b"\r\n\r\n")
        status = int(head.split()[1]) if head.startswith(b"HTTP/1.1") else 0
        return status, rest
    finally:
        w.close()


async def half_request(host, port, stats, rng):
    """Half of a head or a body, then either hang up or wait for the server to close (its timeouts)."""
    r, w = await asyncio.open_connection(host, port)
    kind = rng.choice(["half_head", "half_body", "idle"])
    if kind == "half_head":
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    elif kind == "half_body":
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\n\r\n{\"prompt\": \"On")
    await w.drain()
    if rng.random() < 0.5:
        await asyncio.sleep(rng.uniform(0, 2))
        w.close()
        stats.ok(kind + "_hangup")
        return
    t0 = time.monotonic()
    try:
        while await asyncio.wait_for(r.read(4096), 60):
            pass
        stats.ok(kind + "_closed_by_server")
    except asyncio.TimeoutError:
        stats.fail(kind, f"still open after {time.monotonic() - t0:.1f} s")
    except ConnectionError:
        stats.ok(kind + "_closed_by_server")
    finally:
        w.close()


async def client(host, port, stats, rng, deadline):
    prompts = ["Once upon a time", "The little dog", "Lily and Ben went", "One day"]
    while time.monotonic() < deadline:
        action = rng.choices(
            ["stream", "complete", "chat_stream", "disconnect", "slow_reader", "half", "json", "logprobs_n"],
            [28, 12, 13, 15, 10, 15, 4, 3]
        )[0]
        try:
            body = {"prompt": rng.choice(prompts), "max_tokens": rng.randint(8, 64),
                    "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 1000)}
            if action == "half":
                await half_request(host, port, stats, rng)
                continue
            if action == "chat_stream":
                body = {"messages": [{"role": "user", "content": body["prompt"]}],
                        "max_tokens": body["max_tokens"], "stream": True}
                status, raw = await request(host, port, "POST", "/v1/chat/completions", body)
            elif action == "json":
                schema = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
                          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
                body = {"messages": [{"role": "user", "content": body["prompt"]}], "max_tokens": 40,
                        "temperature": 1.0, "seed": body["seed"], "stream": rng.random() < 0.5,
                        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
                status, raw = await request(host, port, "POST", "/v1/chat/completions", body)
            elif action == "logprobs_n":
                body.update(n=2, logprobs=3, stream=rng.random() < 0.5)
                status, raw = await request(host, port, "POST", "/v1/completions", body)
            elif action == "complete":
                status, raw = await request(host, port, "POST", "/v1/completions", body)
            else:
                body["stream"] = True
                if action == "disconnect":
                    body["max_tokens"] = 200
                    status, raw = await request(host, port, "POST", "/v1/completions", body,
                                                read_chunk=256, cut_after=rng.randint(1, 3000))
                    if status is None:
                        stats.ok(action)
                        continue
                elif action == "slow_reader":
                    status, raw = await request(host, port, "POST", "/v1/completions", body,
                                                read_delay=0.05, read_chunk=64)
                else:
                    status, raw = await request(host, port, "POST", "/v1/completions", body)
            if status != 200:
                stats.fail(action, f"status {status}: {raw[:200]!r}")
            elif body.get("stream") and b"data: [DONE]" not in raw:
                stats.fail(action, f"stream without [DONE]: {raw[-200:]!r}")
            else:
                stats.ok(action)
        except (ConnectionError, asyncio.TimeoutError, OSError) as e:
            stats.fail(action, repr(e))


async def load(host, port, streams, seconds, stats, seed):
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client(host, port, stats, random.Random(seed + i), deadline) for i in range(streams)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--engine")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/debug/trt-diff"))
    ap.add_argument("--grace", type=float, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="soak-")
    engine = args.engine
    if not engine:
        shared = os.environ.get("TRT_DIFF_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
        engine = os.path.join(tmp, "stories.plan")
        subprocess.run([args.binary, "build", os.path.join(shared, "llm/stories260K.bin"), "--arch", "llama2c",
                        "--tokenizer", os.path.join(shared, "llm/tok512.bin"), "--out", engine, "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
    server = subprocess.Popen(
        [args.binary, "serve", "--engine", engine, "--port", "0", "--header-timeout", "5", "--body-timeout", "5",
         "--write-timeout", "10", "--shutdown-grace", str(args.grace), "--max-connections", "512"],
        stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "server.log"), "w"), text=True)
    line = server.stdout.readline()
    m = re.match(r"listening on http://(.+):(\d+)", line.strip())
    if not m:
        sys.exit(f"server did not start: {line!r}")
    host, port = m.group(1), int(m.group(2))
    pid = server.pid

    # Warm up (allocations that happen once), then the figures "before".
    warm = Stats()
    asyncio.run(load(host, port, 4, 5, warm, 999))
    time.sleep(1)
    before = proc_figures(pid)
    print(f"before: {before}", flush=True)

    stats = Stats()
    samples = []
    seconds = args.minutes * 60

    async def sampled():
        task = asyncio.ensure_future(load(host, port, args.streams, seconds, stats, 0))
        while not task.done():
            await asyncio.sleep(min(30, seconds / 4 + 1))
            f = proc_figures(pid)
            f["t"] = round(time.monotonic() - t0)
            samples.append(f)
            print(f"t={f['t']}s {f} {stats.counts}", flush=True)
        await task

    t0 = time.monotonic()
    asyncio.run(sampled())
    # Let the server's timeouts close whatever the clients left half-open.
    time.sleep(7)
    after = proc_figures(pid)
    print(f"after: {after}", flush=True)

    # Graceful stop under full load.
    stop_stats = Stats()

    async def stop_under_load():
        task = asyncio.ensure_future(load(host, port, args.streams, 30, stop_stats, 10_000))
        await asyncio.sleep(3)
        t = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        while server.poll() is None and time.monotonic() - t < args.grace + 10:
            await asyncio.sleep(0.02)
        took = time.monotonic() - t
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        return took

    stop_seconds = asyncio.run(stop_under_load())
    code = server.poll()
    if code is None:
        server.kill()
    result = {
        "minutes": args.minutes, "streams": args.streams, "before": before, "after": after, "samples": samples,
        "requests": stats.counts, "failures": stats.failures,
        "stop_seconds": round(stop_seconds, 2), "stop_exit_code": code, "grace_seconds": args.grace,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    problems = []
    if stats.failures:
        problems.append(f"{len(stats.failures)} failed requests")
    if after["fds"] > before["fds"] + 4:
        problems.append(f"fds grew {before['fds']} -> {after['fds']}")
    if after["threads"] > before["threads"] + 2:
        problems.append(f"threads grew {before['threads']} -> {after['threads']}")
    if code != 0 or stop_seconds > args.grace + 1:
        problems.append(f"stop took {stop_seconds:.1f} s with exit code {code}")
    if problems:
        print("FAILED: " + "; ".join(problems))
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
