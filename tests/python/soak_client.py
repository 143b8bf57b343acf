"""Concurrent streaming clients against `moonshard serve` for a while (run by tests/lua/soak_spec.lua).

    python3 tests/python/soak_client.py URL PID CASES.json SECONDS CLIENTS OUT.json

CASES.json is a list of requests with the answer each gets served alone: {"body": {...}, "text":
..., "finish": ...}; a case with "disconnect": N is a request whose client closes the connection
after N events (a cancellation mid-stream). Each client sends cases one after the other (a short
pause between them) over raw HTTP/1.1 with asyncio (no third-party package), reads the chunked
server-sent events and checks every stream: status 200, a finish_reason in the last choice chunk,
`data: [DONE]` last, and the text put together equal to the case's. Meanwhile the server's
resident set (VmRSS of /proc/PID/status) is sampled twice a second. Writes one JSON summary.
"""
import asyncio
import json
import random
import sys
import time
from urllib.parse import urlparse

url, pid, cases_path, seconds, clients, out_path = (sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]),
                                                     int(sys.argv[5]), sys.argv[6])
cases = json.load(open(cases_path))
u = urlparse(url)
host, port = u.hostname, u.port
summary = {"requests": 0, "ok": 0, "disconnects": 0, "error_count": 0, "errors": [], "mismatch_count": 0,
           "mismatches": [], "rss_kb": [], "by_case": [0] * len(cases), "finish": {}}


def error(msg):
    summary["error_count"] += 1
    if len(summary["errors"]) < 10:
        summary["errors"].append(msg)


async def read_chunked(reader):
    """Yields the data of each chunk of a chunked body."""
    while True:
        line = await reader.readline()
        if not line:
            raise EOFError("connection closed inside the chunked body")
        size = int(line.strip().split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def one(k, case):
    body = json.dumps(case["body"]).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), len(body)) + body)
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        if status != 200:
            rest = await reader.read()
            return error(f"case {k}: HTTP {status}: {rest[:200]!r}")
        if "transfer-encoding: chunked" not in head.lower():
            return error(f"case {k}: not chunked: {head!r}")
        buf, events, texts, finishes = b"", [], [], []
        cut = case.get("disconnect")
        async for data in read_chunked(reader):
            buf += data
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                ev = ev.decode()
                if not ev.startswith("data: "):
                    return error(f"case {k}: not an SSE data event: {ev[:200]!r}")
                d = ev[6:]
                events.append(d)
                if d != "[DONE]":
                    j = json.loads(d)
                    if "error" in j:
                        return error(f"case {k}: error event: {d[:300]}")
                    for ch in j["choices"]:
                        texts.append(ch.get("text") or "")
                        if ch.get("finish_reason"):
                            finishes.append(ch["finish_reason"])
                if cut and len(events) >= cut:
                    summary["disconnects"] += 1
                    return  # close mid-stream: the server cancels the request
        if buf:
            return error(f"case {k}: {len(buf)} bytes after the last event")
        if not events or events[-1] != "[DONE]":
            return error(f"case {k}: the stream does not end with [DONE] (last: {events[-1:]!r})")
        if events.count("[DONE]") != 1:
            return error(f"case {k}: [DONE] more than once")
        if len(finishes) != 1:
            return error(f"case {k}: finish_reason set {len(finishes)} times")
        summary["finish"][finishes[0]] = summary["finish"].get(finishes[0], 0) + 1
        text = "".join(texts)
        if cut:
            return error(f"case {k}: the stream ended before the client meant to disconnect")
        if text != case["text"] or finishes[0] != case["finish"]:
            summary["mismatch_count"] += 1
            if len(summary["mismatches"]) < 5:
                summary["mismatches"].append({"case": k, "got": text, "finish": finishes[0], "want": case["text"],
                                              "want_finish": case["finish"]})
            return
        summary["ok"] += 1
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def client(c, deadline):
    rnd = random.Random(c)
    i = 0
    while time.monotonic() < deadline:
        k = (c * 7 + i) % len(cases)
        i += 1
        summary["requests"] += 1
        summary["by_case"][k] += 1
        try:
            await asyncio.wait_for(one(k, cases[k]), timeout=60)
        except Exception as e:  # noqa: BLE001 -- every failure is counted and shown
            error(f"case {k}: {type(e).__name__}: {e}")
        await asyncio.sleep(rnd.uniform(0, 0.05))


async def sample_rss(deadline, t0):
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        summary["rss_kb"].append([round(time.monotonic() - t0, 2), int(line.split()[1])])
        except OSError as e:
            error(f"the server's /proc/{pid}/status: {e}")
            return
        await asyncio.sleep(0.5)


async def main():
    t0 = time.monotonic()
    deadline = t0 + seconds
    await asyncio.gather(sample_rss(deadline, t0), *(client(c, deadline) for c in range(clients)))
    summary["seconds"] = time.monotonic() - t0


asyncio.run(main())
json.dump(summary, open(out_path, "w"))
