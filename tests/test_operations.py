"""Operating llmgw: signals, systemd, TLS, the access log and metrics.

Every wait is bounded; signals go only to the gateway processes these tests
started (Gateway.signal / proc.kill).
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import (OPENAI_UPSTREAM_KEY, merge_config, poll, query_db,
                      write_config)
from fakes import DEFAULT_TEXT, Reply


CHAT = "/v1/chat/completions"
PROMPT_MARKER = "prompt-marker-7f3a91"


def chat_body(model="gpt-4o-mini", stream=False):
    body = {"model": model,
            "messages": [{"role": "user", "content": PROMPT_MARKER}]}
    if stream:
        body["stream"] = True
    return body


class Notify(object):
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self):
        # a short path: unix socket paths are limited to about 100 bytes
        self.folder = tempfile.mkdtemp(prefix="llmgw-n")
        self.path = os.path.join(self.folder, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []

    def wait_for(self, text, timeout=5.0):
        """Wait (bounded) for a datagram holding the line `text`."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if text in message.split("\n"):
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                return False
            self.messages.append(data.decode("utf-8", "replace"))

    def close(self):
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def notify():
    box = Notify()
    yield box
    box.close()


def new_connection_served(port):
    """Try a fresh /health; return its status, or None if refused/cut."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=3)
    except OSError:
        return None
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        data = sock.recv(65536)
    except OSError:
        return None
    finally:
        sock.close()
    if not data:
        return None
    return int(data.split(b" ", 2)[1])


# ---------------------------------------------------------------------------
# 1. SIGTERM drains; SIGKILL loses nothing that was received
# ---------------------------------------------------------------------------

def test_sigterm_lets_a_running_stream_finish_refuses_new_clients_and_exits_0(
        gateway, upstream, notify):
    gw = gateway(config={"limits": {"drain_timeout_s": 10}},
                 env={"NOTIFY_SOCKET": notify.path})
    assert notify.wait_for("READY=1")
    key = gw.create_key("drain")
    upstream.queue(Reply(event_delay=0.25))
    result = {}

    def client():
        result["events"] = gw.stream(CHAT, chat_body(stream=True), key=key,
                                     timeout=30)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        assert upstream.wait_for_requests(1, timeout=5), \
            "the stream never reached the provider"
        gw.signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING=1"), notify.messages
        # the signal was handled: no new client is served any more
        assert new_connection_served(gw.port) is None
    finally:
        thread.join(30)
    events = result["events"]
    assert events.status == 200
    assert events.error is None, events.error
    assert events.data()[-1] == "[DONE]"
    text = "".join(chunk["choices"][0]["delta"].get("content") or ""
                   for chunk in events.json() if chunk["choices"])
    assert text == DEFAULT_TEXT

    try:
        code = gw.proc.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("the gateway did not exit after draining")
    assert code == 0, gw.stderr_text()
    rows = query_db(gw.db_path, "select * from usage")
    assert len(rows) == 1
    assert rows[0]["request_id"] == events.headers["x-llmgw-request-id"]
    assert rows[0]["error"] is None
    assert rows[0]["streamed"] == 1
    assert rows[0]["output_tokens"] == 9


def test_sigkill_keeps_the_row_of_every_response_the_client_received(
        gateway, upstream):
    gw = gateway()
    key = gw.create_key("kill")
    received = []
    for number in range(8):
        if number % 2:
            events = gw.stream(CHAT, chat_body(stream=True), key=key)
            assert events.status == 200 and events.error is None
            assert events.data()[-1] == "[DONE]"
            received.append(events.headers["x-llmgw-request-id"])
        else:
            status, headers, body = gw.request("POST", CHAT, chat_body(),
                                               key=key)
            assert status == 200
            json.loads(body)
            received.append(headers["x-llmgw-request-id"])
    # load still running at the moment of the kill
    upstream.queue(Reply(event_delay=0.5))
    def doomed_stream():
        try:
            gw.stream(CHAT, chat_body(stream=True), key=key, timeout=10)
        except (OSError, http.client.HTTPException):
            pass  # the server was killed under it

    thread = threading.Thread(target=doomed_stream, daemon=True)
    thread.start()
    upstream.wait_for_requests(9, timeout=5)
    gw.proc.kill()
    gw.proc.wait(10)
    thread.join(15)

    rows = query_db(gw.db_path, "select request_id from usage")
    ids = [row["request_id"] for row in rows]
    for request_id in received:
        assert ids.count(request_id) == 1, (request_id, ids)
    assert len(rows) >= len(received)


# ---------------------------------------------------------------------------
# 2. systemd notification
# ---------------------------------------------------------------------------

def test_notify_socket_gets_ready_after_start_and_stopping_after_sigterm(
        gateway, notify):
    gw = gateway(env={"NOTIFY_SOCKET": notify.path})
    assert notify.wait_for("READY=1"), notify.messages
    assert not notify.wait_for("STOPPING=1", timeout=0.2)
    gw.signal(signal.SIGTERM)
    assert notify.wait_for("STOPPING=1"), notify.messages
    assert gw.proc.wait(10) == 0


# ---------------------------------------------------------------------------
# 3. SIGHUP reloads the configuration
# ---------------------------------------------------------------------------

def test_sighup_reloads_the_config_without_dropping_a_keep_alive_connection(
        gateway, upstream):
    gw = gateway()
    key = gw.create_key("hup")
    headers = {"Authorization": "Bearer " + key["secret"],
               "Content-Type": "application/json"}
    status, _, _ = gw.request("POST", "/newprov/v1/chat/completions",
                              chat_body(), key=key)
    assert status == 404
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("POST", CHAT, json.dumps(chat_body()), headers)
        resp = conn.getresponse()
        first = resp.getheader("x-llmgw-request-id")
        resp.read()
        assert resp.status == 200
        sock = conn.sock
        assert sock is not None, "the gateway closed a keep-alive connection"

        # a new provider and a price override, then SIGHUP
        config = merge_config(gw.config, {
            "providers": {"newprov": {
                "type": "openai", "base_url": upstream.url + "/newprov/v1",
                "api_keys": ["sk-newprov-0001"]}},
            "prices": {"gpt-4o-mini": {"input": 1000.0, "output": 2000.0}}})
        write_config(gw.config_path, config)
        gw.signal(signal.SIGHUP)
        # wait (bounded) until the new route answers on other connections
        status = poll(
            lambda: gw.request("GET", "/newprov/v1/models", key=key)[0],
            lambda status: status == 200, timeout=5)
        assert status == 200, gw.stderr_text()

        conn.request("POST", "/newprov/v1/chat/completions",
                     json.dumps(chat_body()), headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        assert upstream.last.path == "/newprov/v1/chat/completions"
        assert upstream.last.headers["authorization"] == \
            "Bearer sk-newprov-0001"

        conn.request("POST", CHAT, json.dumps(chat_body()), headers)
        resp = conn.getresponse()
        second = resp.getheader("x-llmgw-request-id")
        resp.read()
        assert resp.status == 200
        assert conn.sock is sock, "the keep-alive connection was replaced"
    finally:
        conn.close()

    rows = gw.wait_rows(1, "select * from usage where request_id = ?",
                       (second,))
    # 21 input tokens at $1000/M and 9 output tokens at $2000/M
    assert rows[0]["cost_usd"] == pytest.approx(0.039)
    old = gw.rows("select * from usage where request_id = ?", (first,))
    assert old[0]["cost_usd"] != pytest.approx(0.039)
    assert gw.proc.poll() is None


def test_a_broken_config_on_sighup_keeps_the_old_one_running(
        gateway, upstream):
    gw = gateway()
    key = gw.create_key("hup")
    with open(gw.config_path, "w") as handle:
        handle.write("{ this is not json")
    gw.signal(signal.SIGHUP)
    assert gw.wait_for_log(r"(?i)reload"), gw.stderr_text()
    assert gw.proc.poll() is None
    status, _, _ = gw.request("POST", CHAT, chat_body(), key=key)
    assert status == 200
    assert upstream.last.headers["authorization"] == \
        "Bearer " + OPENAI_UPSTREAM_KEY


# ---------------------------------------------------------------------------
# 4. systemd unit
# ---------------------------------------------------------------------------

def test_systemd_unit_prints_a_hardened_notify_service_running_serve(
        run_cli, tmp_path):
    cfg = str(tmp_path / "unit.json")
    code, out, err = run_cli("--config", cfg, "systemd-unit")
    assert code == 0, err
    sections = {}
    current = None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif current is not None and "=" in line and \
                not line.startswith(("#", ";")):
            name, _, value = line.partition("=")
            current.setdefault(name, []).append(value)
    service = sections["Service"]
    assert service["Type"] == ["notify"]
    assert service["StateDirectory"] and service["StateDirectory"][0]
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["PrivateTmp"] == ["yes"]
    exec_start = service["ExecStart"][0].split()
    assert "serve" in exec_start
    assert any(part.endswith("llmgw.py") for part in exec_start)
    assert cfg in exec_start  # the install's own config
    assert "Install" in sections and "Unit" in sections


# ---------------------------------------------------------------------------
# 5. TLS
# ---------------------------------------------------------------------------

def test_serve_with_tls_cert_and_key_speaks_https(gateway, upstream,
                                                  certificate):
    cert, keyfile = certificate
    gw = gateway(args=["--tls-cert", cert, "--tls-key", keyfile])
    assert gw.scheme == "https"
    assert re.search(r"listening on https://127\.0\.0\.1:%d" % gw.port,
                     gw.stderr_text())
    key = gw.create_key("tls")
    context = ssl.create_default_context(cafile=cert)

    def call(method, path, body=None, headers=None):
        conn = http.client.HTTPSConnection("127.0.0.1", gw.port,
                                           timeout=10, context=context)
        try:
            conn.request(method, path, body, headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    status, body = call("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"

    # a plain-HTTP client on the TLS port gets no answer, and harms nothing
    assert new_connection_served(gw.port) is None

    status, body = call("POST", CHAT, json.dumps(chat_body()),
                        {"Authorization": "Bearer " + key["secret"],
                         "Content-Type": "application/json"})
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == \
        DEFAULT_TEXT
    assert len(gw.wait_rows(1)) == 1


# ---------------------------------------------------------------------------
# 6. the access log
# ---------------------------------------------------------------------------

def some_requests(gw, upstream, key):
    """A few requests of different kinds; return {request_id: status}."""
    seen = {}
    status, headers, _ = gw.request("POST", CHAT, chat_body(), key=key)
    assert status == 200
    seen[headers["x-llmgw-request-id"]] = status
    events = gw.stream(CHAT, chat_body(stream=True), key=key)
    assert events.status == 200
    seen[events.headers["x-llmgw-request-id"]] = 200
    upstream.queue(Reply.error(500, "provider broke"))
    status, headers, _ = gw.request("POST", CHAT, chat_body(), key=key)
    assert status == 500
    seen[headers["x-llmgw-request-id"]] = status
    status, headers, _ = gw.request("POST", CHAT, chat_body(),
                                    key="sk-gw-unknown-" + "u" * 30)
    assert status == 401
    seen[headers["x-llmgw-request-id"]] = status
    status, headers, _ = gw.request("GET", "/health")
    assert status == 200
    seen[headers["x-llmgw-request-id"]] = status
    return seen


def assert_no_secret_or_body(text, key):
    assert key["secret"] not in text
    assert OPENAI_UPSTREAM_KEY not in text
    assert PROMPT_MARKER not in text, "a request body reached the log"
    assert DEFAULT_TEXT not in text, "a response body reached the log"
    assert "Hello" not in text


def test_the_text_access_log_has_one_line_per_request_with_its_fields(
        gateway, upstream):
    gw = gateway()
    key = gw.create_key("logproj")
    seen = some_requests(gw, upstream, key)
    for request_id in seen:
        assert gw.wait_for_log(re.escape(request_id))
    text = gw.stderr_text()
    for request_id, status in seen.items():
        lines = [l for l in text.splitlines() if request_id in l]
        assert len(lines) == 1, lines
        assert re.search(r"\bstatus=%d\b" % status, lines[0]), lines[0]
        assert re.search(r"\blatency_ms=[0-9.]+", lines[0]), lines[0]
    chat_id = next(iter(seen))
    line = [l for l in text.splitlines() if chat_id in l][0]
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    assert fields["key_id"] == key["id"]
    assert fields["project"] == "logproj"
    assert fields["model"] == "gpt-4o-mini"
    assert fields["input_tokens"] == "21"
    assert fields["output_tokens"] == "9"
    assert float(fields["cost_usd"]) > 0
    row = gw.rows("select * from usage where request_id = ?", (chat_id,))[0]
    assert float(fields["cost_usd"]) == pytest.approx(row["cost_usd"],
                                                      abs=1e-6)
    assert_no_secret_or_body(text, key)


@pytest.mark.parametrize("how", ["flag", "config"])
def test_the_json_access_log_has_one_parsable_object_per_request(
        gateway, upstream, how):
    if how == "flag":
        gw = gateway(args=["--log-format", "json"])
    else:
        gw = gateway(config={"log_format": "json"})
    key = gw.create_key("jsonproj")
    seen = some_requests(gw, upstream, key)
    for request_id in seen:
        assert gw.wait_for_log(re.escape(request_id))
    records = []
    for line in gw.stderr_text().splitlines():
        if line.strip():
            records.append(json.loads(line))  # every line is JSON
    by_id = {}
    for record in records:
        if record.get("request_id"):
            by_id.setdefault(record["request_id"], []).append(record)
    for request_id, status in seen.items():
        assert len(by_id.get(request_id, [])) == 1, by_id.get(request_id)
        record = by_id[request_id][0]
        assert record["status"] == status
        assert isinstance(record["latency_ms"], (int, float))
    chat = by_id[next(iter(seen))][0]
    assert chat["key_id"] == key["id"]
    assert chat["project"] == "jsonproj"
    assert chat["model"] == "gpt-4o-mini"
    assert chat["input_tokens"] == 21
    assert chat["output_tokens"] == 9
    assert isinstance(chat["cost_usd"], float) and chat["cost_usd"] > 0
    assert_no_secret_or_body(gw.stderr_text(), key)


# ---------------------------------------------------------------------------
# 7. metrics
# ---------------------------------------------------------------------------

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """Prometheus text -> (types {name: type}, samples [(name, labels, v)])."""
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            match = _SAMPLE.match(line)
            assert match, "not Prometheus text: %r" % line
            labels = dict(_LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return types, samples


def get_metrics(gw):
    status, headers, body = gw.admin("GET", "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    return parse_metrics(body.decode("utf-8"))


def test_metrics_need_the_admin_key(gateway):
    gw = gateway()
    status, _, body = gw.request("GET", "/metrics")
    assert status == 401
    assert json.loads(body)["error"]["code"]
    key = gw.create_key("m")
    status, _, _ = gw.request("GET", "/metrics", key=key)
    assert status == 401


def test_metrics_count_requests_tokens_cost_latency_and_in_flight(
        gateway, upstream):
    gw = gateway()
    key = gw.create_key("metricsproj")
    for _ in range(2):
        assert gw.request("POST", CHAT, chat_body(), key=key)[0] == 200
    assert gw.stream(CHAT, chat_body(stream=True), key=key).status == 200
    upstream.queue(Reply.error(429, "slow down", retry_after=3))
    assert gw.request("POST", CHAT, chat_body(), key=key)[0] == 429
    rows = gw.wait_rows(4)
    assert len(rows) == 4

    # metrics are counted as each request ends: wait (bounded) for all four
    def all_four_counted(metrics):
        types, samples = metrics
        return sum(v for n, l, v in samples
                   if n.endswith("requests_total") or
                   (types.get(n) == "counter" and "request" in n and
                    "status" in l)) >= 4

    types, samples = poll(lambda: get_metrics(gw), all_four_counted,
                          timeout=5)
    mine = {"provider": "openai", "model": "gpt-4o-mini",
            "project": "metricsproj"}

    def matching(word, **extra):
        want = dict(mine, **extra)
        return [(n, l, v) for n, l, v in samples if word in n and
                all(l.get(k) == str(x) for k, x in want.items())]

    # requests by provider, model, project and status
    ok = [s for s in matching("request", status=200)
          if types.get(s[0]) == "counter" or s[0].endswith("_total")]
    assert [v for _, _, v in ok] == [3], ok
    limited = [s for s in matching("request", status=429)
               if types.get(s[0]) == "counter" or s[0].endswith("_total")]
    assert [v for _, _, v in limited] == [1], limited

    # tokens: 3 answered requests of 21 input and 9 output tokens
    tokens = matching("token")
    assert sum(v for _, _, v in tokens) == 3 * (21 + 9), tokens

    # cost: what the usage rows say
    cost = matching("cost")
    assert cost, samples
    assert sum(v for _, _, v in cost) == pytest.approx(
        sum(r["cost_usd"] or 0 for r in rows), abs=2e-6)

    # a latency histogram whose count is every proxied request
    histograms = [n for n, t in types.items() if t == "histogram"]
    assert histograms, types
    name = histograms[0]
    buckets = [(l, v) for n, l, v in samples if n == name + "_bucket"]
    assert any(l.get("le") == "+Inf" for l, _ in buckets)
    infinite = sum(v for l, v in buckets if l.get("le") == "+Inf")
    assert infinite == 4
    counts = [v for n, _, v in samples if n == name + "_count"]
    assert sum(counts) == 4
    bounded = sorted(((float(l["le"]), v) for l, v in buckets
                      if l.get("le") not in (None, "+Inf")))
    assert [v for _, v in bounded] == sorted(v for _, v in bounded), \
        "histogram buckets must be cumulative"

    # the in-flight gauge: 0 now, 1 while a slow stream runs
    gauges = [n for n, t in types.items() if t == "gauge" and
              ("flight" in n or "active" in n)]
    assert gauges, types

    def inflight():
        _, now = get_metrics(gw)
        return sum(v for n, _, v in now if n == gauges[0])

    assert inflight() == 0
    upstream.queue(Reply(event_delay=0.2))
    thread = threading.Thread(
        target=lambda: gw.stream(CHAT, chat_body(stream=True), key=key,
                                 timeout=20), daemon=True)
    thread.start()
    try:
        assert upstream.wait_for_requests(5, timeout=5)
        assert inflight() == 1
    finally:
        thread.join(20)
    assert inflight() == 0
