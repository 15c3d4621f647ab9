#!/usr/bin/env python3
"""Benchmark llmgw against a fast fake OpenAI upstream.

Run it from the project root:

    python3 tests/bench.py             # full run, a couple of minutes
    python3 tests/bench.py --quick     # smoke run, about 20 seconds
    python3 tests/bench.py --duration 5 --json /tmp/bench.json

It starts a fake OpenAI upstream (an asyncio server in its own process) and
the gateway (`llmgw.py serve`, with a throwaway config, database and virtual
key), then drives the upstream directly and through the gateway with the
same load, interleaved (direct, gateway, direct, gateway ...), and reports:

- non-streaming POST /v1/chat/completions at concurrency 1, 16 and 64:
  requests per second, p50/p90/p99 latency, latency added by the gateway,
  gateway CPU time per request, errors;
- streaming (SSE) at concurrency 1 and 32: time to first event, added time to
  first event, inter-event gaps and events that arrived coalesced;
- gateway memory: idle RSS, RSS and peak (VmHWM) after load, RSS while 500
  slow streams are open at once;
- time from launching `serve` to the first successful GET /health;
- whether every request sent to the gateway has a row in the `usage` table.

On Linux with two or more CPUs the gateway is pinned to the first CPU and
the load generator and fake upstream to the others, so they do not compete.
`wrk` is used for non-streaming throughput at concurrency 16 and 64 when it
is installed (`--no-wrk` forces the built-in load generator); latency at
concurrency 1 and all streaming figures come from the built-in client,
which times every request and every read precisely.

The script uses the standard library only. It is not a pytest test module.
Everything it starts is stopped by PID at the end, also on Ctrl-C.
Exit status: 0 after a complete run (1 with --strict when a target fails),
2 when the benchmark could not run.
"""

import argparse
import asyncio
import errno
import json
import os
import re
import selectors
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GATEWAY = os.path.join(os.path.dirname(HERE), "llmgw.py")

MODEL = "gpt-4o-mini"
UPSTREAM_KEY = "sk-bench-upstream-dummy"
STREAM_CHUNKS = 10          # content events per benchmark stream
STREAM_GAP_MS = 20          # gap between two events of a benchmark stream
OPEN_STREAMS = 500          # streams held open at once for the RSS figure
OPEN_STREAM_GAP_MS = 1000   # slow streams: one event a second
OPEN_STREAM_CHUNKS = 120    # ... for up to two minutes (closed long before)

TARGETS = {
    "c1_p50_added_ms": 0.4,
    "c1_p99_added_ms": 1.5,
    "min_rps": 2500,
    "stream_ttfb_added_ms": 1.0,
    "idle_rss_mb": 30,
    "open_streams_rss_mb": 150,
    "startup_s": 0.3,
}

USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')
LISTEN_RE = re.compile(r"listening on https?://[^\s:/]+:(\d+)")


def log(msg):
    """Print a progress line to stderr."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def percentile(sorted_vals, p):
    """Return the p-th percentile (0-100) of an already sorted list."""
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


# ---------------------------------------------------------------------------
# Fake OpenAI upstream (runs in its own process: bench.py --_fake-upstream)
# ---------------------------------------------------------------------------

def _compact(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def _chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


class FakeUpstream(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive server speaking just enough OpenAI."""

    stats = {"requests": 0, "chat": 0, "streams": 0,
             "streams_with_usage": 0, "bad_requests": 0}
    _plain_cache = {}

    def connection_made(self, transport):
        self.transport = transport
        self.buf = bytearray()
        self.busy = False       # a stream is being written on this connection
        self.closed = False
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc):
        self.closed = True

    def data_received(self, data):
        self.buf += data
        while not self.busy and not self.closed:
            request = self._take_request()
            if request is None:
                return
            self._handle(*request)

    def _take_request(self):
        """Cut one complete request off the buffer, or return None."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 1 << 16:
                self.transport.close()
                self.closed = True
            return None
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            self.transport.close()
            self.closed = True
            return None
        method, target, version = parts
        length, chunked = 0, False
        close = version == "HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                close = value.strip().lower() == "close"
        start = end + 4
        if chunked:
            body, consumed = _dechunk_complete(buf, start)
            if body is None:
                return None
        else:
            if len(buf) < start + length:
                return None
            body, consumed = bytes(buf[start:start + length]), start + length
        del buf[:consumed]
        return method, target.split("?", 1)[0], body, close

    def _reply(self, status, body, close, ctype=b"application/json"):
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                b"x-request-id: req_bench_upstream\r\n%s\r\n") % (
            status, b"OK" if status == 200 else b"Error", ctype, len(body),
            b"Connection: close\r\n" if close else b"")
        self.transport.write(head + body)
        if close:
            self.transport.close()
            self.closed = True

    def _handle(self, method, path, body, close):
        stats = self.stats
        stats["requests"] += 1
        if method == "GET" and path.endswith("/_bench/stats"):
            return self._reply(200, _compact(stats), close)
        if method == "GET" and path.endswith("/models"):
            return self._reply(200, _compact(
                {"object": "list", "data": [{"id": MODEL, "object": "model"}]}),
                close)
        if method != "POST" or not path.endswith("/chat/completions"):
            return self._reply(404, _compact({"error": {
                "message": "no such route on the bench upstream",
                "type": "invalid_request_error", "param": None,
                "code": "not_found"}}), close)
        try:
            req = json.loads(body)
            model = str(req.get("model", MODEL))
        except (ValueError, AttributeError):
            stats["bad_requests"] += 1
            return self._reply(400, _compact({"error": {
                "message": "body is not JSON", "type": "invalid_request_error",
                "param": None, "code": None}}), close)
        stats["chat"] += 1
        if req.get("stream"):
            stats["streams"] += 1
            opts = req.get("stream_options") or {}
            usage = bool(opts.get("include_usage"))
            stats["streams_with_usage"] += usage
            meta = req.get("metadata") or {}
            chunks = int(meta.get("bench_chunks", STREAM_CHUNKS))
            gap = float(meta.get("bench_gap_ms", STREAM_GAP_MS)) / 1000.0
            self.busy = True
            asyncio.ensure_future(self._stream(model, chunks, gap, usage, close))
            return None
        cached = self._plain_cache.get(model)
        if cached is None:
            cached = _compact({
                "id": "chatcmpl-bench", "object": "chat.completion",
                "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {
                    "role": "assistant", "content": "Hello from the bench upstream."},
                    "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 7,
                          "total_tokens": 19},
                "system_fingerprint": None})
            if len(self._plain_cache) < 64:
                self._plain_cache[model] = cached
        return self._reply(200, cached, close)

    async def _stream(self, model, chunks, gap, usage, close):
        """Write one SSE event per HTTP chunk, `gap` seconds apart."""
        created = int(time.time())
        tr = self.transport
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                "created": created, "model": model, "system_fingerprint": None}
        try:
            for i in range(chunks):
                if i:
                    await asyncio.sleep(gap)
                if self.closed:
                    return
                last = i == chunks - 1
                event = dict(base, choices=[{
                    "index": 0,
                    "delta": ({"role": "assistant", "content": "w%d " % i}
                              if i == 0 else {"content": "w%d " % i}),
                    "logprobs": None,
                    "finish_reason": "stop" if last else None}])
                if usage:
                    event["usage"] = None
                data = _chunk(b"data: " + _compact(event) + b"\n\n")
                if i == 0:
                    data = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
                            b"x-request-id: req_bench_upstream\r\n\r\n") + data
                tr.write(data)
            await asyncio.sleep(gap)
            if self.closed:
                return
            tail = b""
            if usage:
                tail += _chunk(b"data: " + _compact(dict(base, choices=[], usage={
                    "prompt_tokens": 12, "completion_tokens": chunks,
                    "total_tokens": 12 + chunks})) + b"\n\n")
            tail += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
            tr.write(tail)
            if close:
                tr.close()
                self.closed = True
        finally:
            self.busy = False
            if not self.closed and self.buf:
                self.data_received(b"")


def _dechunk_complete(buf, pos):
    """Decode a complete chunked body starting at buf[pos]; (None, 0) if short."""
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            while True:     # trailers, up to the empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None, 0
                if eol == pos:
                    return bytes(out), eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None, 0
        out += buf[pos:pos + size]
        pos += size + 2


def fake_upstream_main(parent_pid):
    """Serve the fake upstream on an ephemeral port until the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops us
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(
        FakeUpstream, "127.0.0.1", 0, backlog=4096, reuse_address=True))
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write("PORT %d\n" % port)
    sys.stdout.flush()

    def watchdog():
        if os.getppid() != parent_pid:
            loop.stop()
        else:
            loop.call_later(0.5, watchdog)
    loop.call_later(0.5, watchdog)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()


# ---------------------------------------------------------------------------
# Built-in load generator: non-blocking raw sockets, one selector per process
# ---------------------------------------------------------------------------

class ChunkedDecoder:
    """Incremental decoder of a chunked HTTP body."""

    def __init__(self):
        self.buf = bytearray()
        self.remaining = -1     # -1: want a size line, -2: want trailers
        self.need_crlf = False
        self.done = False

    def feed(self, data):
        buf = self.buf
        buf += data
        out = bytearray()
        while not self.done:
            if self.need_crlf:
                if len(buf) < 2:
                    break
                del buf[:2]
                self.need_crlf = False
            if self.remaining == -1:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                size = int(bytes(buf[:eol]).split(b";")[0], 16)
                del buf[:eol + 2]
                self.remaining = size if size else -2
            elif self.remaining == -2:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                empty = eol == 0
                del buf[:eol + 2]
                if empty:
                    self.done = True
            else:
                take = min(self.remaining, len(buf))
                if not take:
                    break
                out += buf[:take]
                del buf[:take]
                self.remaining -= take
                if not self.remaining:
                    self.remaining = -1
                    self.need_crlf = True
        return out


class _Conn:
    """One client connection of the load generator and its current request."""

    def __init__(self, index):
        self.index = index
        self.sock = None
        self.connected = False
        self.mask = 0
        self.active = False
        self.retry_at = 0.0
        self.reset(0.0)

    def reset(self, now):
        self.t0 = now
        self.pending = b""
        self.buf = bytearray()
        self.status = None
        self.mode = None
        self.length = 0
        self.got = 0
        self.keepalive = True
        self.decoder = None
        self.sse = bytearray()
        self.events = 0
        self.first_event = None
        self.last_event = None
        self.done_seen = False


def run_load(spec):
    """Drive one target for spec["duration"] seconds; return raw results.

    spec: host, port, request (latin-1 str), concurrency, duration, stream,
    expect_events (streams), timeout, start_at (time.time() to start at).
    Requests still in flight at the deadline are finished (drained), so every
    request sent is either completed or counted as an error.
    """
    host, port = spec["host"], spec["port"]
    request = spec["request"].encode("latin-1")
    stream = spec.get("stream", False)
    expect_events = spec.get("expect_events")
    timeout = spec.get("timeout", 10.0)
    res = {"sent": 0, "completed": 0, "ok": 0, "ok_in_window": 0, "errors": {}, "lat": [],
           "ttfb": [], "gaps": [], "events": 0, "coalesced": 0,
           "leaked_usage": 0, "reads_with_events": 0}
    sel = selectors.DefaultSelector()
    conns = [_Conn(i) for i in range(spec["concurrency"])]

    def error(kind):
        res["errors"][kind] = res["errors"].get(kind, 0) + 1

    def drop(c):
        if c.sock is not None:
            try:
                sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()
        c.sock, c.connected, c.mask = None, False, 0

    def set_mask(c, mask):
        if mask != c.mask:
            sel.modify(c.sock, mask, c)
            c.mask = mask

    def flush(c):
        try:
            n = c.sock.send(c.pending)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            fail(c, "write")
            return
        c.pending = c.pending[n:]
        set_mask(c, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.pending else 0))

    def begin(c, now):
        c.reset(now)
        c.pending = request
        c.active = True
        res["sent"] += 1
        if c.sock is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            rc = s.connect_ex((host, port))
            c.sock = s
            if rc not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                fail(c, "connect")
                return
            sel.register(s, selectors.EVENT_WRITE, c)
            c.mask = selectors.EVENT_WRITE
        else:
            flush(c)

    def fail(c, kind):
        error(kind)
        drop(c)
        c.active = False
        c.retry_at = time.perf_counter() + 0.01

    def finish(c, now):
        c.active = False
        res["completed"] += 1
        ok = c.status == 200
        if ok and stream:
            if c.events != expect_events or not c.done_seen:
                ok = False
                error("bad_stream")
        elif not ok:
            error("status_%s" % c.status)
        if ok:
            res["ok"] += 1
            res["lat"].append(now - c.t0)
            if now <= deadline:
                res["ok_in_window"] += 1
            if stream:
                res["ttfb"].append(c.first_event - c.t0)
        if not c.keepalive:
            drop(c)
        if now < deadline:
            begin(c, now)
        else:
            drop(c)

    def on_body(c, data, now):
        if c.mode == "length":
            c.got += len(data)
            if c.got >= c.length:
                finish(c, now)
            return
        if c.mode == "eof":
            return
        data = c.decoder.feed(data)
        if stream and c.status == 200 and data:
            c.sse += data
            n = c.sse.count(b"\n\n")
            if n:
                cut = c.sse.rfind(b"\n\n") + 2
                complete = bytes(c.sse[:cut])
                del c.sse[:cut]
                c.events += n
                res["events"] += n
                res["reads_with_events"] += 1
                if n > 1:
                    res["coalesced"] += n - 1
                if c.first_event is None:
                    c.first_event = now
                else:
                    res["gaps"].append(now - c.last_event)
                c.last_event = now
                if b"data: [DONE]" in complete:
                    c.done_seen = True
                if USAGE_RE.search(complete):
                    res["leaked_usage"] += 1
        if c.decoder.done:
            finish(c, now)

    def on_head(c, now):
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(c.buf[:end]).decode("latin-1").split("\r\n")
        rest = bytes(c.buf[end + 4:])
        parts = lines[0].split(" ", 2)
        try:
            c.status = int(parts[1])
        except (IndexError, ValueError):
            fail(c, "bad_response")
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        conn_hdr = headers.get("connection", "")
        c.keepalive = (conn_hdr != "close" if parts[0] == "HTTP/1.1"
                       else conn_hdr == "keep-alive")
        if "chunked" in headers.get("transfer-encoding", ""):
            c.mode, c.decoder = "chunked", ChunkedDecoder()
        elif "content-length" in headers:
            c.mode, c.length = "length", int(headers["content-length"])
        elif c.status in (204, 304):
            c.mode, c.length = "length", 0
        else:
            c.mode, c.keepalive = "eof", False
        if c.mode == "length" and c.length == 0:
            finish(c, now)
        elif rest:
            on_body(c, rest, now)

    def on_event(c, mask, now):
        if not c.connected:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                fail(c, "connect")
                return
            c.connected = True
            flush(c)
            return
        if mask & selectors.EVENT_WRITE and c.pending:
            flush(c)
            if c.sock is None:
                return
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = c.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            fail(c, "read")
            return
        if not data:
            if c.mode == "eof" and c.status is not None:
                drop(c)
                finish(c, now)
            else:
                fail(c, "closed")
            return
        if c.status is None:
            c.buf += data
            on_head(c, now)
        else:
            on_body(c, data, now)

    start_at = spec.get("start_at")
    if start_at:
        delay = start_at - time.time()
        if delay > 0:
            time.sleep(delay)
    start = time.perf_counter()
    deadline = start + spec["duration"]
    hard_stop = deadline + max(timeout, 1.0)
    for c in conns:
        begin(c, start)
    next_check = start + 0.05
    while True:
        now = time.perf_counter()
        if now >= hard_stop:
            break
        busy = False
        for c in conns:
            if c.active:
                busy = True
            elif c.sock is None and now < deadline and now >= c.retry_at:
                begin(c, now)
                busy = True
            elif now < deadline:
                busy = True
        if not busy:
            break
        for key, mask in sel.select(0.05):
            if key.fileobj is key.data.sock:    # not a socket dropped meanwhile
                on_event(key.data, mask, time.perf_counter())
        now = time.perf_counter()
        if now >= next_check:
            next_check = now + 0.05
            for c in conns:
                if c.active and now - c.t0 > timeout:
                    fail(c, "timeout")
    for c in conns:
        if c.active:
            error("timeout")
        drop(c)
    sel.close()
    res["duration"] = spec["duration"]
    return res


def merge_results(parts):
    """Merge raw results of several load generator runs or processes."""
    out = {"sent": 0, "completed": 0, "ok": 0, "ok_in_window": 0, "errors": {}, "lat": [],
           "ttfb": [], "gaps": [], "events": 0, "coalesced": 0,
           "leaked_usage": 0, "reads_with_events": 0, "duration": 0.0}
    for p in parts:
        for k in ("sent", "completed", "ok", "ok_in_window", "events", "coalesced",
                  "leaked_usage", "reads_with_events"):
            out[k] += p[k]
        for k in ("lat", "ttfb", "gaps"):
            out[k].extend(p[k])
        for k, v in p["errors"].items():
            out["errors"][k] = out["errors"].get(k, 0) + v
    return out


def worker_main():
    """Load generator worker process: spec as JSON on stdin, results on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = json.loads(sys.stdin.read())
    json.dump(run_load(spec), sys.stdout)


# ---------------------------------------------------------------------------
# Process control and /proc readings
# ---------------------------------------------------------------------------

class Procs:
    """Every child process started, so that all can be stopped by PID."""

    def __init__(self):
        self.items = []

    def start(self, cmd, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)   # Ctrl-C reaches only us
        p = subprocess.Popen(cmd, **kw)
        self.items.append(p)
        return p

    def stop(self, p, grace=8.0):
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        if p in self.items:
            self.items.remove(p)

    def stop_all(self):
        for p in list(reversed(self.items)):
            try:
                self.stop(p, grace=3.0)
            except Exception as exc:    # keep stopping the others
                log("could not stop pid %d: %s" % (p.pid, exc))


def cpu_ticks(pid):
    """utime+stime of a process in seconds, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_status(pid):
    """VmRSS, VmHWM (MB) and thread count of a process, each or None."""
    out = {"rss_mb": None, "hwm_mb": None, "threads": None}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_mb"] = int(line.split()[1]) / 1024.0
                elif line.startswith("VmHWM:"):
                    out["hwm_mb"] = int(line.split()[1]) / 1024.0
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return out


def cpu_times():
    """{cpu index: (busy, total, user+nice+system)} jiffies from /proc/stat."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *vals = line.split()
                    vals = [int(v) for v in vals[:8]]
                    total = sum(vals)
                    out[int(name[3:])] = (total - vals[3] - vals[4], total,
                                          vals[0] + vals[1] + vals[2])
    except (OSError, ValueError, IndexError):
        pass
    return out


def own_cpu(pids):
    """CPU seconds of this process, its waited-for children and `pids`."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for pid in pids:
        total += cpu_ticks(pid) or 0.0
    return total


def foreign_cpu_pct(stat0, stat1, own0, own1, wall):
    """CPU used by processes not started by the benchmark, in % of one CPU.

    Other work on the machine (a test suite, a build) disturbs the figures;
    this makes it visible. Interrupt time is left out on both sides.
    """
    if not stat0 or not stat1 or wall <= 0:
        return None
    used = sum(stat1[c][2] - stat0[c][2] for c in stat1 if c in stat0)
    used /= os.sysconf("SC_CLK_TCK")
    return max(0.0, 100.0 * (used - (own1 - own0)) / wall)


def busy_percent(before, after, cpus):
    busy = sum(after[c][0] - before[c][0] for c in cpus if c in before and c in after)
    total = sum(after[c][1] - before[c][1] for c in cpus if c in before and c in after)
    return 100.0 * busy / total if total else None


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_get(port, path, timeout=2.0):
    """GET over a fresh connection; (status, body) or (None, None)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close"
                       "\r\n\r\n" % (path, port)).encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None, None
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        return None, None


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.procs = Procs()
        self.tmp = tempfile.mkdtemp(prefix="llmgw-bench-")
        self.quick = args.quick
        self.duration = args.duration or (1.0 if args.quick else 3.0)
        self.rounds = 1 if args.quick else 2
        self.notes = []
        self.gw = None              # Popen of the gateway under test
        self.gw_started = False
        self.gw_port = None
        self.secret = None
        self.gw_sent = 0            # requests sent to the gateway
        self.gw_must_record = 0     # ... of which a usage row must exist
        self.results = {"meta": {}, "nonstream": [], "stream": [], "memory": {},
                        "startup": {}, "usage_check": {}, "targets": []}
        self.wrk = None if args.no_wrk else shutil.which("wrk")
        self.env = {k: v for k, v in os.environ.items()
                    if not k.endswith("_API_KEY") and not k.startswith("LLMGW_")}
        self.config = os.path.join(self.tmp, "bench-config.json")
        self.db = os.path.join(self.tmp, "bench.db")
        self.gw_log = os.path.join(self.tmp, "gateway-stderr.log")

    # -- setup -------------------------------------------------------------

    def pin_cpus(self):
        """Gateway on the first allowed CPU, everything else on the rest."""
        self.gw_cpus, self.load_cpus = None, None
        if not hasattr(os, "sched_getaffinity"):
            self.notes.append("no CPU pinning on this platform")
            return
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            self.notes.append("only one CPU: gateway, upstream and load share it")
            return
        self.gw_cpus, self.load_cpus = [cpus[0]], cpus[1:]
        os.sched_setaffinity(0, self.load_cpus)   # inherited by our children

    def raise_fd_limit(self):
        try:
            import resource
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
            if soft < want:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ImportError, ValueError, OSError):
            pass

    def gw_cmd(self, *argv):
        cmd = [sys.executable, self.args.gateway, "--config", self.config,
               "--db", self.db] + list(argv)
        if self.gw_cpus and shutil.which("taskset"):
            cmd = ["taskset", "-c", ",".join(map(str, self.gw_cpus))] + cmd
        return cmd

    def gw_preexec(self):
        if self.gw_cpus and not shutil.which("taskset"):
            cpus = self.gw_cpus
            return lambda: os.sched_setaffinity(0, cpus)
        return None

    def start_upstream(self):
        p = self.procs.start(
            [sys.executable, os.path.abspath(__file__), "--_fake-upstream",
             str(os.getpid())], stdout=subprocess.PIPE)
        line = p.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError("the fake upstream did not start")
        self.up = p
        self.up_port = int(line.split()[1])
        log("fake upstream: pid %d, http://127.0.0.1:%d" % (p.pid, self.up_port))

    def write_config(self):
        cfg = {
            "database": self.db,
            "default_provider": "openai",
            "log_format": "text",
            "providers": {"openai": {
                "type": "openai",
                "base_url": "http://127.0.0.1:%d/v1" % self.up_port,
                "api_keys": [UPSTREAM_KEY]}},
            "limits": {"drain_timeout_s": 5},
        }
        with open(self.config, "w") as f:
            json.dump(cfg, f, indent=2)
        os.chmod(self.config, 0o600)

    def create_key(self):
        out = subprocess.run(
            self.gw_cmd("keys", "create", "bench", "--output", "json"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=self.env, cwd=self.tmp, timeout=60)
        if out.returncode != 0:
            raise RuntimeError("keys create failed (exit %d): %s" % (
                out.returncode, out.stderr.decode(errors="replace").strip()))
        text = out.stdout.decode()
        try:
            key = json.loads(text)
        except ValueError:
            key = json.loads(text[text.index("{"):text.rindex("}") + 1])
        self.secret = key["secret"]

    def launch_gateway(self, port=0):
        logf = open(self.gw_log, "ab")
        offset = logf.tell()
        try:
            p = self.procs.start(
                self.gw_cmd("serve", "--host", "127.0.0.1", "--port", str(port)),
                stdout=logf, stderr=logf, env=self.env, cwd=self.tmp,
                preexec_fn=self.gw_preexec())
        finally:
            logf.close()
        return p, offset

    def wait_listening(self, p, offset, timeout=30.0):
        end = time.time() + timeout
        while time.time() < end:
            with open(self.gw_log, "rb") as f:
                f.seek(offset)
                m = LISTEN_RE.search(f.read().decode(errors="replace"))
            if m:
                return int(m.group(1))
            if p.poll() is not None:
                raise RuntimeError("the gateway exited with status %s" % p.returncode)
            time.sleep(0.01)
        raise RuntimeError("no 'listening on' line from the gateway in %ds" % timeout)

    def log_tail(self, n=15):
        try:
            with open(self.gw_log, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""

    def start_gateway(self):
        if not os.path.exists(self.args.gateway):
            raise RuntimeError("%s does not exist" % self.args.gateway)
        self.write_config()
        self.create_key()
        p, offset = self.launch_gateway()
        self.gw = p
        self.gw_port = self.wait_listening(p, offset)
        for _ in range(300):
            status, _ = http_get(self.gw_port, "/health")
            if status == 200:
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("GET /health never answered 200")
        self.gw_started = True
        log("gateway: pid %d, http://127.0.0.1:%d" % (p.pid, self.gw_port))

    # -- requests ----------------------------------------------------------

    def request_bytes(self, target, stream, chunks=STREAM_CHUNKS, gap_ms=STREAM_GAP_MS):
        body = {"model": MODEL,
                "messages": [{"role": "user", "content": "Say hello."}]}
        if stream:
            body["stream"] = True
            # metadata is a standard OpenAI field, passed through untouched;
            # the fake upstream reads its stream shape from it
            body["metadata"] = {"bench_chunks": str(chunks), "bench_gap_ms": str(gap_ms)}
        body = json.dumps(body).encode()
        port = self.up_port if target == "direct" else self.gw_port
        token = UPSTREAM_KEY if target == "direct" else self.secret
        head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                "Content-Type: application/json\r\nAccept: %s\r\n"
                "Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (
                    port, "text/event-stream" if stream else "application/json",
                    token, len(body)))
        return port, (head.encode() + body).decode("latin-1"), body.decode(), token

    def stdlib_load(self, target, conc, duration, stream):
        port, req, _, _ = self.request_bytes(target, stream)
        spec = {"host": "127.0.0.1", "port": port, "request": req,
                "concurrency": conc, "duration": duration, "stream": stream,
                "expect_events": STREAM_CHUNKS + 1, "timeout": 10.0}
        workers = 1
        if self.load_cpus and len(self.load_cpus) > 2:
            # keep one load CPU for the fake upstream
            workers = max(1, min(conc, len(self.load_cpus) - 1))
        if workers == 1:
            return run_load(spec)
        spec["start_at"] = time.time() + 0.3
        procs = []
        for i in range(workers):
            s = dict(spec, concurrency=conc // workers + (i < conc % workers))
            p = self.procs.start([sys.executable, os.path.abspath(__file__), "--_worker"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            p.stdin.write(json.dumps(s).encode())
            p.stdin.close()
            procs.append(p)
        parts = []
        for p in procs:
            parts.append(json.loads(p.stdout.read()))
            p.wait()
            self.procs.items.remove(p)
        out = merge_results(parts)
        out["duration"] = duration
        return out

    def wrk_load(self, target, conc, duration):
        port, _, body, token = self.request_bytes(target, False)
        script = os.path.join(self.tmp, "post.lua")
        with open(script, "w") as f:
            f.write(WRK_LUA % {"body": body, "token": token})
        secs = max(1, int(round(duration)))
        threads = max(1, min(conc, len(self.load_cpus or [0])))
        p = self.procs.start(
            [self.wrk, "-t%d" % threads, "-c%d" % conc, "-d%ds" % secs,
             "--timeout", "10s", "-s", script,
             "http://127.0.0.1:%d/v1/chat/completions" % port],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = p.communicate(timeout=secs + 30)
        finally:
            self.procs.stop(p)
        text = out.decode(errors="replace")
        m = re.search(r"^WRKJSON (\{.*\})$", text, re.M)
        if not m:
            raise RuntimeError("wrk printed no result:\n" + text)
        w = json.loads(m.group(1))
        errors = {k: int(w[k]) for k in ("connect", "read", "write", "timeout")
                  if w[k]}
        if w["status"]:
            errors["status_non2xx"] = int(w["status"])
        ok = int(w["requests"]) - int(w["status"])
        return {"sent": int(w["sent"]), "ok": ok, "ok_in_window": ok,
                "completed": int(w["requests"]), "errors": errors,
                "duration": w["duration_us"] / 1e6,
                "wrk_ms": {k: w[k] / 1000.0 for k in ("p50", "p90", "p99", "max", "mean")},
                "lat": [], "ttfb": [], "gaps": [], "events": 0, "coalesced": 0,
                "leaked_usage": 0, "reads_with_events": 0}

    # -- one measurement ---------------------------------------------------

    def measure(self, target, conc, stream, tool):
        gw_pid = self.gw.pid if self.gw else None
        cpu0 = cpu_ticks(gw_pid) if gw_pid else None
        watched = [self.up.pid] + ([gw_pid] if gw_pid else [])
        own0 = own_cpu(watched)
        stat0 = cpu_times()
        t0 = time.perf_counter()
        if tool == "wrk":
            raw = self.wrk_load(target, conc, self.duration)
        else:
            raw = self.stdlib_load(target, conc, self.duration, stream)
        wall = time.perf_counter() - t0
        stat1 = cpu_times()
        own1 = own_cpu(watched)
        raw["other_cpu_pct"] = foreign_cpu_pct(stat0, stat1, own0, own1, wall)
        cpu1 = cpu_ticks(gw_pid) if gw_pid else None
        raw["wall"] = wall
        raw["load_cpu_pct"] = (busy_percent(stat0, stat1, self.load_cpus)
                               if self.load_cpus else None)
        if gw_pid and cpu0 is not None and cpu1 is not None:
            raw["gw_cpu_s"] = cpu1 - cpu0
            raw["gw_cpu_pct"] = 100.0 * (cpu1 - cpu0) / wall
        if target == "gateway":
            self.gw_sent += raw["sent"]
            # requests that got a response must have a row; wrk abandons
            # those in flight at its deadline, which may or may not have
            # reached the gateway (they count only as sent)
            self.gw_must_record += raw["completed"]
            raw["gw_mem"] = proc_status(gw_pid)
        return raw

    def scenario(self, conc, stream):
        if stream or conc == 1 or not self.wrk:
            tool = "stdlib"
        else:
            tool = "wrk"
        targets = ["direct"] + (["gateway"] if self.gw else [])
        runs = {t: [] for t in targets}
        label = "%s c=%d" % ("stream" if stream else "plain", conc)
        for r in range(self.rounds):
            for t in targets:
                log("  %-12s %-7s round %d/%d (%s)" % (label, t, r + 1, self.rounds, tool))
                try:
                    runs[t].append(self.measure(t, conc, stream, tool))
                except RuntimeError as exc:
                    if tool != "wrk":
                        raise
                    self.notes.append("wrk failed, fell back to the stdlib client: %s"
                                      % str(exc).splitlines()[0])
                    self.wrk, tool = None, "stdlib"
                    runs[t].append(self.measure(t, conc, stream, tool))
        entry = {"concurrency": conc, "tool": tool}
        for t in targets:
            entry[t] = summarize(runs[t], stream)
        if self.gw:
            keys = ("ttfb_p50", "ttfb_p90", "ttfb_p99") if stream else ("p50", "p90", "p99")
            entry["added_ms"] = {k: _sub(entry["gateway"][k], entry["direct"][k])
                                 for k in keys}
        (self.results["stream"] if stream else self.results["nonstream"]).append(entry)
        return entry

    # -- memory, startup, usage -------------------------------------------

    def hold_open_streams(self, n):
        """Open n slow streams through the gateway, measure RSS, close them."""
        port, req, _, _ = self.request_bytes(
            "gateway", True, chunks=OPEN_STREAM_CHUNKS, gap_ms=OPEN_STREAM_GAP_MS)
        req = req.encode("latin-1")
        sel = selectors.DefaultSelector()
        state = {}          # sock -> [buffer, opened]
        pending = list(range(n))
        opened = errors = sent = 0
        connecting = 0
        t0 = time.perf_counter()
        deadline = t0 + (10.0 if self.quick else 20.0)
        while opened + errors < n and time.perf_counter() < deadline:
            while pending and connecting < 64:
                pending.pop()
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                sel.register(s, selectors.EVENT_WRITE)
                state[s] = [bytearray(), False]
                connecting += 1
            for key, mask in sel.select(0.05):
                s = key.fileobj
                st = state[s]
                if mask & selectors.EVENT_WRITE:
                    connecting -= 1
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        errors += 1
                        sel.unregister(s)
                        s.close()
                        del state[s]
                        continue
                    s.setblocking(True)
                    try:
                        s.sendall(req)
                    except OSError:
                        errors += 1
                        sel.unregister(s)
                        s.close()
                        del state[s]
                        continue
                    sent += 1
                    s.setblocking(False)
                    sel.modify(s, selectors.EVENT_READ)
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    errors += 1
                    sel.unregister(s)
                    s.close()
                    del state[s]
                    continue
                if not st[1]:
                    st[0] += data
                    end = st[0].find(b"\r\n\r\n")
                    if end >= 0:
                        if not st[0].startswith(b"HTTP/1.1 200") and \
                                not st[0].startswith(b"HTTP/1.0 200"):
                            errors += 1
                            sel.unregister(s)
                            s.close()
                            del state[s]
                            continue
                        if st[0].find(b"\n\n", end + 4) >= 0:
                            st[1] = True
                            opened += 1
        open_time = time.perf_counter() - t0
        samples = []
        for _ in range(5):
            samples.append(proc_status(self.gw.pid))
            time.sleep(0.1)
        # the streams are cut by the client: each must still get a usage row
        self.gw_sent += sent
        self.gw_must_record += opened
        for s in list(state):
            sel.unregister(s)
            s.close()
        sel.close()
        rss = [x["rss_mb"] for x in samples if x["rss_mb"] is not None]
        return {"requested": n, "sent": sent, "opened": opened, "errors": errors,
                "open_time_s": open_time,
                "rss_mb": max(rss) if rss else None,
                "hwm_mb": samples[-1]["hwm_mb"], "threads": max(
                    (x["threads"] or 0) for x in samples) or None}

    def memory_open_streams(self):
        mem = self.results["memory"]
        log("  holding %d streams open through the gateway" % OPEN_STREAMS)
        mem["open_streams"] = self.hold_open_streams(OPEN_STREAMS)
        # the gateway notices closed clients at its next write (1 s gap)
        time.sleep(OPEN_STREAM_GAP_MS / 1000.0 + 1.5)
        mem["after_streams_closed"] = proc_status(self.gw.pid)

    def usage_rows(self):
        try:
            con = sqlite3.connect("file:%s?mode=ro" % self.db, uri=True, timeout=5)
            try:
                total = con.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
                by_status = dict(con.execute(
                    "SELECT status, COUNT(*) FROM usage GROUP BY status").fetchall())
                streamed = con.execute(
                    "SELECT COUNT(*) FROM usage WHERE streamed = 1").fetchone()[0]
                with_error = con.execute(
                    "SELECT error, COUNT(*) FROM usage WHERE error IS NOT NULL "
                    "GROUP BY error").fetchall()
            finally:
                con.close()
        except sqlite3.Error as exc:
            return {"error": str(exc)}
        return {"rows": total, "by_status": {str(k): v for k, v in by_status.items()},
                "streamed": streamed, "errors": dict(with_error)}

    def usage_check(self, final=False):
        """Compare usage rows with the requests sent to the gateway."""
        end = time.time() + (0 if final else 8.0)
        last, stable_since = None, time.time()
        while True:
            rows = self.usage_rows()
            n = rows.get("rows", -1)
            if n != last:
                last, stable_since = n, time.time()
            if n >= self.gw_sent or time.time() >= end or (
                    n >= self.gw_must_record and time.time() - stable_since >= 1.0):
                break
            time.sleep(0.25)
        rows.update({"sent": self.gw_sent, "must_record": self.gw_must_record})
        if "rows" in rows:
            rows["missing"] = max(0, self.gw_must_record - rows["rows"])
            rows["extra"] = max(0, rows["rows"] - self.gw_sent)
            rows["ok"] = not rows["missing"] and not rows["extra"]
        else:
            rows["ok"] = False
        return rows

    def startup_times(self):
        """Seconds from launching `serve` to the first 200 from GET /health."""
        runs = []
        for _ in range(3 if self.quick else 5):
            port = free_port()
            t0 = time.perf_counter()
            p, _ = self.launch_gateway(port)
            elapsed = None
            while time.perf_counter() - t0 < 15.0 and p.poll() is None:
                status, _ = http_get(port, "/health", timeout=1.0)
                if status == 200:
                    elapsed = time.perf_counter() - t0
                    break
                time.sleep(0.002)
            self.procs.stop(p)
            runs.append(elapsed)
        good = [r for r in runs if r is not None]
        return {"runs_s": runs, "median_s": statistics.median(good) if good else None,
                "failed": len(runs) - len(good)}

    # -- the whole run -----------------------------------------------------

    def run(self):
        self.pin_cpus()
        self.raise_fd_limit()
        meta = self.results["meta"]
        meta.update({
            "python": sys.version.split()[0], "platform": sys.platform,
            "cpus": os.cpu_count(), "gateway_cpus": self.gw_cpus,
            "load_cpus": self.load_cpus, "quick": self.quick,
            "duration_s": self.duration, "rounds": self.rounds,
            "wrk": self.wrk, "gateway_path": self.args.gateway,
            "stream_shape": {"chunks": STREAM_CHUNKS, "gap_ms": STREAM_GAP_MS},
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.start_upstream()
        if not self.args.direct_only:
            try:
                self.start_gateway()
            except (RuntimeError, OSError, ValueError, KeyError,
                    subprocess.TimeoutExpired) as exc:
                self.notes.append("gateway did not start: %s" % exc)
                log("gateway did not start: %s\n%s" % (exc, self.log_tail()))
                if self.gw:
                    self.procs.stop(self.gw)
                self.gw = None
        mem = self.results["memory"]
        if self.gw:
            time.sleep(0.5)
            mem["idle"] = proc_status(self.gw.pid)
        # warm up both paths (connection pools, caches); counted as sent
        log("warming up")
        for t in ["direct"] + (["gateway"] if self.gw else []):
            for stream in (False, True):
                raw = self.stdlib_load(t, 8, 0.3 if self.quick else 0.6, stream)
                if t == "gateway":
                    self.gw_sent += raw["sent"]
                    self.gw_must_record += raw["completed"]
        log("non-streaming")
        for conc in (1, 16, 64):
            self.scenario(conc, False)
        log("streaming")
        for conc in (1, 32):
            self.scenario(conc, True)
        if self.gw:
            mem["after_load"] = proc_status(self.gw.pid)
            self.memory_open_streams()
            log("checking usage rows")
            self.results["usage_check"] = self.usage_check()
            log("stopping the gateway")
            self.procs.stop(self.gw, grace=15.0)
            self.results["usage_check"]["after_stop"] = self.usage_check(final=True)
            self.results["usage_check"]["gateway_exit_status"] = self.gw.returncode
            log("measuring serve-to-health")
            self.results["startup"] = self.startup_times()
        status, body = http_get(self.up_port, "/_bench/stats")
        if status == 200:
            self.results["upstream_stats"] = json.loads(body)
        self.results["notes"] = self.notes
        self.results["targets"] = evaluate_targets(self.results, bool(self.gw))
        return self.results

    def cleanup(self):
        self.procs.stop_all()
        if self.args.keep_temp:
            log("temporary files kept in %s" % self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


WRK_LUA = r"""
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  sent = 0
  prepared = wrk.format()
end
function request()
  sent = sent + 1
  return prepared
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + (t:get("sent") or 0) end
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"sent":%%d,' ..
    '"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d,' ..
    '"p50":%%.1f,"p90":%%.1f,"p99":%%.1f,"max":%%.1f,"mean":%%.1f}\n',
    summary.requests, summary.duration, total, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def _sub(a, b):
    return None if a is None or b is None else a - b


def _ms(v):
    return None if v is None else v * 1000.0


def summarize(runs, stream):
    """Aggregate the rounds of one target in one scenario (times in ms)."""
    raw = merge_results(runs)
    duration = sum(r["duration"] for r in runs)
    out = {"rounds": len(runs), "sent": raw["sent"], "completed": raw["completed"],
           "ok": raw["ok"],
           "errors": raw["errors"], "error_count": sum(raw["errors"].values()),
           "rps": raw["ok_in_window"] / duration if duration else None}
    if runs and "wrk_ms" in runs[0]:
        # wrk gives percentiles per run: average them over the rounds
        for k in ("p50", "p90", "p99", "max"):
            out[k] = statistics.mean(r["wrk_ms"][k] for r in runs)
    else:
        lat = sorted(raw["lat"])
        for k, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)):
            out[k] = _ms(percentile(lat, p))
    if stream:
        ttfb, gaps = sorted(raw["ttfb"]), sorted(raw["gaps"])
        for k, p in (("p50", 50), ("p90", 90), ("p99", 99)):
            out["ttfb_" + k] = _ms(percentile(ttfb, p))
        for k, p in (("min", 0), ("p50", 50), ("p99", 99), ("max", 100)):
            out["gap_" + k] = _ms(percentile(gaps, p))
        out.update({"events": raw["events"], "coalesced": raw["coalesced"],
                    "leaked_usage_events": raw["leaked_usage"]})
    cpu = [r["gw_cpu_s"] for r in runs if "gw_cpu_s" in r]
    if cpu and "gw_mem" in runs[0]:
        served = sum(r["completed"] for r in runs)
        out["gw_cpu_ms_per_req"] = 1000.0 * sum(cpu) / served if served else None
        out["gw_cpu_pct"] = statistics.mean(r["gw_cpu_pct"] for r in runs)
        out["gw_rss_mb"] = runs[-1]["gw_mem"]["rss_mb"]
        out["gw_hwm_mb"] = runs[-1]["gw_mem"]["hwm_mb"]
    for k in ("load_cpu_pct", "other_cpu_pct"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.mean(vals) if vals else None
    return out


def evaluate_targets(res, have_gateway):
    """The targets, each with what was measured and PASS/FAIL."""
    out = []

    def add(name, measured, passed, shown):
        # pass is None when there was no gateway to measure (--direct-only)
        out.append({"target": name, "measured": measured, "shown": shown,
                    "pass": bool(passed) if have_gateway else None})

    def fmt(v, unit, digits=2):
        return "n/a" if v is None else ("%.*f %s" % (digits, v, unit)).strip()

    ns = {e["concurrency"]: e for e in res["nonstream"]}
    st = {e["concurrency"]: e for e in res["stream"]}
    usage = res.get("usage_check", {})
    add_c1 = ns.get(1, {}).get("added_ms", {})
    v = add_c1.get("p50")
    add("added latency c=1 p50 <= %.1f ms" % TARGETS["c1_p50_added_ms"], v,
        v is not None and v <= TARGETS["c1_p50_added_ms"], fmt(v, "ms", 3))
    v = add_c1.get("p99")
    add("added latency c=1 p99 <= %.1f ms" % TARGETS["c1_p99_added_ms"], v,
        v is not None and v <= TARGETS["c1_p99_added_ms"], fmt(v, "ms", 3))
    for c in (16, 64):
        g = ns.get(c, {}).get("gateway", {})
        rps, errs = g.get("rps"), g.get("error_count")
        add("c=%d: >= %d req/s, zero errors" % (c, TARGETS["min_rps"]), rps,
            rps is not None and rps >= TARGETS["min_rps"] and errs == 0,
            "%s, %s errors" % (fmt(rps, "req/s", 0), "n/a" if errs is None else errs))
    add("every gateway request recorded in usage", usage.get("after_stop", usage).get("rows"),
        usage.get("ok") and usage.get("after_stop", {}).get("ok", True),
        "%s rows / %s sent (%s must)" % (usage.get("after_stop", usage).get("rows"),
                                         usage.get("sent"), usage.get("must_record")))
    e32 = st.get(32, {})
    v = e32.get("added_ms", {}).get("ttfb_p50")
    add("stream c=32 added TTFB p50 <= %.1f ms" % TARGETS["stream_ttfb_added_ms"], v,
        v is not None and v <= TARGETS["stream_ttfb_added_ms"], fmt(v, "ms", 3))
    coalesced = [(st[c].get("gateway", {}).get("coalesced"),
                  st[c].get("direct", {}).get("coalesced")) for c in st]
    gw_co = sum(g or 0 for g, _ in coalesced)
    dir_co = sum(d or 0 for _, d in coalesced)
    bad = sum(st[c].get("gateway", {}).get("errors", {}).get("bad_stream", 0) for c in st)
    add("streams: no coalesced events", gw_co,
        all(g is not None for g, _ in coalesced) and coalesced and gw_co <= dir_co
        and not bad,
        "%d coalesced (direct %d)%s" % (gw_co, dir_co,
                                         ", %d bad streams" % bad if bad else ""))
    mem = res.get("memory", {})
    v = mem.get("idle", {}).get("rss_mb")
    add("idle RSS <= %d MB" % TARGETS["idle_rss_mb"], v,
        v is not None and v <= TARGETS["idle_rss_mb"], fmt(v, "MB", 1))
    os_ = mem.get("open_streams", {})
    v = os_.get("rss_mb")
    add("RSS with %d open streams < %d MB" % (OPEN_STREAMS, TARGETS["open_streams_rss_mb"]),
        v, v is not None and v < TARGETS["open_streams_rss_mb"]
        and os_.get("opened") == OPEN_STREAMS,
        "%s (%s/%d open)" % (fmt(v, "MB", 1), os_.get("opened"), OPEN_STREAMS))
    v = res.get("startup", {}).get("median_s")
    add("serve to first /health <= %.1f s" % TARGETS["startup_s"], v,
        v is not None and v <= TARGETS["startup_s"], fmt(v, "s", 3))
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def _f(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "%.*f" % (digits, v)
    return str(v)


def table(headers, rows):
    """Render rows as an aligned text table (numbers right-aligned)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def report(res):
    out = []
    m = res["meta"]
    pin = ("gateway on CPU %s, upstream+load on CPU %s" % (
        ",".join(map(str, m["gateway_cpus"])), ",".join(map(str, m["load_cpus"])))
        if m.get("gateway_cpus") else "no CPU pinning")
    out.append("llmgw benchmark: Python %s, %s CPUs, %s; %s s per run x %d round(s); "
               "load: %s" % (m["python"], m["cpus"], pin, _f(m["duration_s"], 1),
                             m["rounds"], "wrk (c>=16) + stdlib" if m["wrk"] else "stdlib"))
    out.append("")
    out.append("Non-streaming POST /v1/chat/completions (latency in ms; + = gateway minus direct)")
    rows = []
    for e in res["nonstream"]:
        for t in ("direct", "gateway"):
            if t not in e:
                continue
            s, add = e[t], e.get("added_ms", {}) if t == "gateway" else {}
            rows.append(["c=%d" % e["concurrency"] if t == "direct" else "",
                         t, _f(s["rps"], 0), _f(s["p50"], 3), _f(s["p90"], 3),
                         _f(s["p99"], 3), _f(add.get("p50"), 3), _f(add.get("p90"), 3),
                         _f(add.get("p99"), 3), _f(s.get("gw_cpu_ms_per_req"), 3),
                         _f(s.get("gw_cpu_pct"), 0), _f(s.get("load_cpu_pct"), 0),
                         _f(s.get("other_cpu_pct"), 0), str(s["error_count"]), e["tool"]])
    out.append(table(["run", "target", "req/s", "p50", "p90", "p99", "+p50", "+p90",
                      "+p99", "gw cpu ms/req", "gw cpu%", "load cpu%", "other cpu%",
                      "errors", "client"], rows))
    out.append("")
    out.append("Streaming, %d events %d ms apart (TTFB = time to first event, ms)" % (
        m["stream_shape"]["chunks"], m["stream_shape"]["gap_ms"]))
    rows = []
    for e in res["stream"]:
        for t in ("direct", "gateway"):
            if t not in e:
                continue
            s, add = e[t], e.get("added_ms", {}) if t == "gateway" else {}
            rows.append(["c=%d" % e["concurrency"] if t == "direct" else "", t,
                         _f(s["rps"], 1), _f(s["ttfb_p50"], 3), _f(s["ttfb_p99"], 3),
                         _f(add.get("ttfb_p50"), 3), _f(add.get("ttfb_p99"), 3),
                         _f(s["gap_min"], 1), _f(s["gap_p50"], 1), _f(s["gap_p99"], 1),
                         _f(s["gap_max"], 1), str(s["events"]), str(s["coalesced"]),
                         _f(s.get("gw_cpu_ms_per_req"), 3), _f(s.get("other_cpu_pct"), 0),
                         str(s["error_count"])])
    out.append(table(["run", "target", "streams/s", "ttfb p50", "ttfb p99", "+ttfb p50",
                      "+ttfb p99", "gap min", "gap p50", "gap p99", "gap max", "events",
                      "coalesced", "gw cpu ms/stream", "other cpu%", "errors"], rows))
    out.append("(gw cpu%: gateway process, in % of one CPU; load cpu%: busy share of "
               "the load CPUs; other cpu%: CPU used by processes the benchmark did not "
               "start)")
    disturbed = sorted(set(
        "%s c=%d" % ("stream" if "ttfb_p50" in e[t] else "plain", e["concurrency"])
        for e in res["nonstream"] + res["stream"] for t in ("direct", "gateway")
        if t in e and (e[t].get("other_cpu_pct") or 0) > 25))
    if disturbed:
        out.append("WARNING: other processes used over 25%% of a CPU during %s; "
                   "those figures are disturbed, rerun on a quiet machine"
                   % ", ".join(disturbed))
    errs = {}
    for e in res["nonstream"] + res["stream"]:
        for t in ("direct", "gateway"):
            if t in e and e[t]["errors"]:
                errs["%s c=%d %s" % ("stream" if "ttfb_p50" in e[t] else "plain",
                                     e["concurrency"], t)] = e[t]["errors"]
    if errs:
        out.append("")
        out.append("Errors by kind: " + "; ".join("%s: %s" % (k, v) for k, v in errs.items()))
    leaked = sum(e[t].get("leaked_usage_events", 0) for e in res["stream"]
                 for t in ("gateway",) if t in e)
    if leaked:
        out.append("Usage-only chunks the client did not ask for reached it: %d" % leaked)

    # bottleneck check: the direct path must be much faster than the gateway
    ratios = []
    for e in res["nonstream"]:
        if e["concurrency"] > 1 and "gateway" in e and e["gateway"]["rps"]:
            ratios.append((e["concurrency"], e["direct"]["rps"] / e["gateway"]["rps"]))
    if ratios:
        out.append("")
        out.append("Direct / gateway throughput: " + ", ".join(
            "c=%d %.1fx" % r for r in ratios) + (
            "  (load generator and fake upstream are not the bottleneck)"
            if all(r >= 2 for _, r in ratios) else
            "  (WARNING: under 2x, the load generator or fake upstream may limit the figures)"))

    mem = res.get("memory", {})
    if mem:
        out.append("")
        out.append("Gateway memory (MB)")
        rows = []
        for label, key in (("idle, after start", "idle"),
                           ("after the load runs", "after_load"),
                           ("with %d open streams" % OPEN_STREAMS, "open_streams"),
                           ("after those streams closed", "after_streams_closed")):
            s = mem.get(key)
            if s:
                rows.append([label, "", _f(s.get("rss_mb"), 1), _f(s.get("hwm_mb"), 1),
                             _f(s.get("threads"))])
        out.append(table(["state", "", "VmRSS", "VmHWM", "threads"], rows))
        os_ = mem.get("open_streams")
        if os_:
            out.append("%d/%d streams open at once (%d errors), opened in %.2f s" % (
                os_["opened"], os_["requested"], os_["errors"], os_["open_time_s"]))
    st = res.get("startup")
    if st:
        out.append("")
        out.append("serve -> first 200 from GET /health: median %s s (runs: %s)" % (
            _f(st.get("median_s"), 3), ", ".join(_f(x, 3) for x in st["runs_s"])))
    u = res.get("usage_check")
    if u:
        out.append("")
        fin = u.get("after_stop", {})
        out.append("Usage rows: %s while running, %s after the gateway stopped (exit %s); "
                   "requests sent to the gateway %d, of which %d must have a row" % (
                       u.get("rows", u.get("error")), fin.get("rows", fin.get("error")),
                       u.get("gateway_exit_status"), u["sent"], u["must_record"]))
        if fin.get("missing") or fin.get("extra"):
            out.append("MISMATCH: %d missing, %d more rows than requests sent" % (
                fin.get("missing", 0), fin.get("extra", 0)))
        elif fin.get("rows") is not None and fin["rows"] < u["sent"]:
            out.append("(%d requests the client abandoned without a response have no row)"
                       % (u["sent"] - fin["rows"]))
        if fin.get("by_status"):
            out.append("rows by status: %s; streamed: %s; error kinds: %s" % (
                fin["by_status"], fin.get("streamed"), fin.get("errors") or "none"))
    up = res.get("upstream_stats")
    if up:
        out.append("Fake upstream saw %d chat requests, %d streams (%d with include_usage)" % (
            up["chat"], up["streams"], up["streams_with_usage"]))
    for n in res.get("notes", []):
        out.append("note: " + n)
    out.append("")
    out.append("Targets")
    out.append(table(["target", "measured", "result"],
                     [[t["target"], t["shown"], {True: "PASS", False: "FAIL",
                                                 None: "n/a"}[t["pass"]]]
                      for t in res["targets"]]))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Benchmark llmgw against a fast fake OpenAI upstream.")
    ap.add_argument("--quick", action="store_true",
                    help="short runs for a smoke test (about 20 s in all)")
    ap.add_argument("--duration", type=float, metavar="S",
                    help="seconds per measurement (default 3, or 1 with --quick)")
    ap.add_argument("--json", default="bench-results.json", metavar="PATH",
                    help="where to write the JSON results (default: %(default)s)")
    ap.add_argument("--gateway", default=DEFAULT_GATEWAY, metavar="PATH",
                    help="llmgw.py to benchmark (default: %(default)s)")
    ap.add_argument("--direct-only", action="store_true",
                    help="measure only the fake upstream (checks the harness)")
    ap.add_argument("--no-wrk", action="store_true",
                    help="use the built-in load generator even if wrk is installed")
    ap.add_argument("--keep-temp", action="store_true",
                    help="keep the temporary config, database and gateway log")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a target is not met")
    args = ap.parse_args(argv)
    args.gateway = os.path.abspath(args.gateway)

    def on_term(signum, frame):
        log("terminated; stopping everything")
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    try:
        res = bench.run()
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    except (RuntimeError, OSError) as exc:
        log("benchmark failed: %s" % exc)
        tail = bench.log_tail()
        if tail:
            log("last lines of the gateway log:\n" + tail)
        return 2
    finally:
        bench.cleanup()
    print(report(res))
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    print("\nJSON results written to %s" % args.json)
    if not args.direct_only and not bench.gw_started:
        return 2
    if args.strict and not all(t["pass"] for t in res["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_fake-upstream":
        fake_upstream_main(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        worker_main()
    else:
        sys.exit(main())
