#!/usr/bin/env python3
"""Overload and slow clients against a real `helpline serve` (issue 12's evidence).

Starts the release binary on a free loopback port (throwaway data and index directories), then:

1. baseline: the latency of sequential chat turns;
2. overload: 10x saturation (saturation = decoding slots + queue places) of clients, each sending
   chat turns in a loop: every answer must be a 200, or a 429 with `Retry-After`; none may hang;
   the server's resident memory is sampled throughout;
3. recovery: sequential turns again, and how long until their latency is back near the baseline;
4. slow clients: 1,000 sockets (from 127.0.0.2-127.0.0.5, under the per-address cap) that send a
   request head and then trickle the body a byte at a time, while the latency of others is
   measured; the trickled requests are cut with 408 at the body-read timeout.

Prints the figures and exits non-zero when a check fails. Needs `cargo build --release` and the
default model (`helpline models pull`).

    python3 scripts/overload.py [--seconds 30] [--slow 1000]
"""

import argparse
import http.client
import json
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "helpline")
QUESTION = "How do I reset my password?"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def chat(port, timeout=300):
    """One chat turn; returns (status, retry_after, seconds)."""
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24, "temperature": 0})
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("retry-after"), time.monotonic() - started
    finally:
        conn.close()


def latencies(port, n):
    out = []
    for _ in range(n):
        status, _, took = chat(port)
        if status != 200:
            raise SystemExit(f"a sequential turn got {status}")
        out.append(took)
    return out


def p(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def overload(port, pid, clients, seconds):
    statuses = {}
    missing_retry_after = 0
    slowest = 0.0
    errors = []
    peak = [rss_kib(pid)]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client():
        nonlocal missing_retry_after, slowest
        while time.monotonic() < stop:
            try:
                status, retry_after, took = chat(port)
            except Exception as e:  # a hang or a dropped connection is a failure
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                slowest = max(slowest, took)
                if status == 429 and not retry_after:
                    missing_retry_after += 1
            if status == 429:
                time.sleep(float(retry_after or 1) * 0.1)

    def sample():
        while time.monotonic() < stop + 5:
            peak.append(rss_kib(pid))
            time.sleep(0.2)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    sampler = threading.Thread(target=sample)
    sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sampler.join()
    return statuses, missing_retry_after, slowest, errors, max(peak)


def slow_clients(port, n, seconds):
    """Opens n trickling sockets; returns (opened, cut_with_408, other_answers)."""
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(n):
        src = f"127.0.0.{2 + i % 4}"
        s = socket.socket()
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n".encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    answers = {}
    end = time.monotonic() + seconds
    last_trickle = 0.0
    while time.monotonic() < end and sel.get_map():
        now = time.monotonic()
        if now - last_trickle >= 1.0:
            last_trickle = now
            for s in list(socks):
                try:
                    s.send(b" ")
                except OSError:
                    pass
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            head = data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
            answers[head] = answers.get(head, 0) + 1
            sel.unregister(s)
            s.close()
    opened = len(socks)
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
    return opened, answers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=30, help="length of the overload phase")
    ap.add_argument("--slow", type=int, default=1000, help="trickling sockets")
    ap.add_argument("--max-concurrent", type=int, default=4)
    ap.add_argument("--queue-capacity", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not os.path.exists(BIN):
        raise SystemExit("build first: cargo build --release --locked")
    work = tempfile.mkdtemp()
    port = free_port()
    body_timeout = 20
    server = subprocess.Popen(
        [BIN, "serve", "--port", str(port), "--threads", str(args.threads), "--docs-dir", os.path.join(ROOT, "docs-corpus"),
         "--index-dir", os.path.join(work, "index"), "--data-dir", os.path.join(work, "data"), "--answer-mode", "generative",
         "--max-concurrent", str(args.max_concurrent), "--queue-capacity", str(args.queue_capacity),
         "--body-read-timeout-secs", str(body_timeout)],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "server.log"), "w"))
    failed = []
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/ready")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None:
                raise SystemExit(open(os.path.join(work, "server.log")).read())
            time.sleep(0.5)
        latencies(port, 3)  # warm
        base = latencies(port, 10)
        rss0 = rss_kib(server.pid)
        saturation = args.max_concurrent + args.queue_capacity
        clients = 10 * saturation
        print(f"baseline: turn latency p50 {statistics.median(base) * 1e3:.0f} ms, p99 {p(base, 0.99) * 1e3:.0f} ms; RSS {rss0 / 1024:.0f} MiB")

        statuses, no_retry, slowest, errors, peak = overload(port, server.pid, clients, args.seconds)
        total = sum(statuses.values())
        print(f"overload: {clients} clients (10x {saturation}) for {args.seconds} s: {total} answers {statuses}, "
              f"429 without Retry-After {no_retry}, slowest {slowest:.1f} s, client errors {len(errors)}; "
              f"peak RSS {peak / 1024:.0f} MiB (+{(peak - rss0) / 1024:.0f} MiB)")
        if set(statuses) - {200, 429}:
            failed.append(f"statuses other than 200 and 429: {statuses}")
        if no_retry:
            failed.append(f"{no_retry} 429s without Retry-After")
        if errors:
            failed.append(f"client errors: {errors[:3]}")

        started = time.monotonic()
        after = latencies(port, 10)
        while statistics.median(after) > 1.5 * statistics.median(base) and time.monotonic() - started < 60:
            after = latencies(port, 10)
        back = time.monotonic() - started
        print(f"after: turn latency p50 {statistics.median(after) * 1e3:.0f} ms (baseline {statistics.median(base) * 1e3:.0f} ms), "
              f"back within {back:.1f} s")
        if statistics.median(after) > 1.5 * statistics.median(base):
            failed.append("latency did not come back within 60 s")

        result = {}
        def trickle():
            result["slow"] = slow_clients(port, args.slow, body_timeout + 15)
        t = threading.Thread(target=trickle)
        t.start()
        time.sleep(3)
        during = latencies(port, 10)
        rss_slow = rss_kib(server.pid)
        t.join()
        opened, answers = result["slow"]
        print(f"slow clients: {opened} trickling sockets; others' turn latency p50 {statistics.median(during) * 1e3:.0f} ms "
              f"(baseline {statistics.median(base) * 1e3:.0f} ms), RSS {rss_slow / 1024:.0f} MiB; the trickled requests got {answers}")
        if statistics.median(during) > 2 * statistics.median(base):
            failed.append("others were slowed by the trickling sockets")
        if answers.get("HTTP/1.1 408 Request Timeout", 0) < opened:
            failed.append(f"not every trickled request was cut with 408: {answers}")
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    for f in failed:
        print("FAILED:", f, file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
