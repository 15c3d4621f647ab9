"""Robustness: malformed and hostile clients, gw providers, storage
faults and secrets.

Malformed requests are written byte by byte on raw sockets, because
http.client refuses to send most of them.  Every wait is bounded.
"""

import json
import os
import re
import resource
import select
import socket
import sqlite3
import struct
import sys
import threading
import time

import pytest

from conftest import (ADMIN_KEY, ANTHROPIC_UPSTREAM_KEY, OPENAI_UPSTREAM_KEY,
                      closed_port, file_mode, poll, query_db, start_gateway)
from fakes import Reply, error_body, http_request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import llmgw  # noqa: E402


CHAT = "/v1/chat/completions"
MULTI_CHAT = "/multi/v1/chat/completions"


@pytest.fixture(scope="module")
def shared_gateways(tmp_path_factory, upstream_server):
    """Like the gateway fixture, but each gateway lives for the module."""
    started = []

    def start(config=None):
        gw = start_gateway(upstream_server, tmp_path_factory.mktemp("gw"),
                           config)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def shared_gw(shared_gateways, upstream_server):
    """One gateway for the tests that need no special state.

    max_body_bytes is 1000, the upstream read timeout 1 s; besides the fake
    openai and anthropic providers there are "deadprov" (nothing listens)
    and "multi" (two real keys, k1 and k2).  gw.key is a valid key.
    """
    gw = shared_gateways(config={
        "limits": {"max_body_bytes": 1000, "upstream_read_timeout_s": 1},
        "providers": {
            "deadprov": {"type": "openai",
                         "base_url": "http://127.0.0.1:%d/v1" % closed_port(),
                         "api_keys": ["sk-dead-0001"]},
            "multi": {"type": "openai",
                      "base_url": upstream_server.url + "/multi/v1",
                      "api_keys": ["k1", "k2"]}}})
    gw.key = gw.create_key("shared")
    return gw


@pytest.fixture
def gw(shared_gw, upstream):
    """The shared gateway, with a freshly reset fake upstream."""
    return shared_gw


def chat_body(model="gpt-4o-mini", stream=False, text="hi"):
    body = {"model": model,
            "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return body


# ---------------------------------------------------------------------------
# raw-socket helpers
# ---------------------------------------------------------------------------

class Raw(object):
    """A raw client connection that reads HTTP/1.1 responses by hand."""

    def __init__(self, port, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port),
                                             timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.sendall(data)

    def response(self):
        """Read one response: (status, headers, body), or None at EOF/reset.

        A read timeout raises socket.timeout: the server neither answered
        nor closed, which the tests treat as a hang.
        """
        try:
            line = self.file.readline(65536)
            if not line:
                return None
            parts = line.decode("latin-1").split(" ", 2)
            status = int(parts[1])
            headers = {}
            while True:
                line = self.file.readline(65536)
                if not line:
                    return None
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                name = name.strip().lower()
                value = value.strip()
                headers[name] = headers[name] + ", " + value \
                    if name in headers else value
            if status in (100, 101):
                return self.response()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                body = []
                while True:
                    size = int(self.file.readline(1024).split(b";")[0], 16)
                    if size == 0:
                        self.file.readline(1024)
                        break
                    body.append(self.file.read(size))
                    self.file.readline(1024)
                body = b"".join(body)
            elif "content-length" in headers:
                body = self.file.read(int(headers["content-length"]))
            else:
                body = self.file.read()
            return status, headers, body
        except (ConnectionResetError, BrokenPipeError):
            return None

    def closed_by_server(self):
        """True when the server closed (EOF or reset) within the timeout."""
        try:
            return self.file.read(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        try:
            self.file.close()
        finally:
            self.sock.close()


def head(method, path, headers, version="HTTP/1.1"):
    """A request head as bytes; headers is a list of (name, value)."""
    lines = ["%s %s %s" % (method, path, version)]
    lines += ["%s: %s" % (name, value) for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def assert_json_error(body, anthropic=False):
    """The body is a gateway error in the OpenAI (or Anthropic) shape."""
    obj = json.loads(body.decode("utf-8"))
    if anthropic:
        assert obj["type"] == "error", obj
        assert set(obj["error"]) >= {"type", "message"}, obj
    else:
        assert set(obj["error"]) >= {"message", "type", "param", "code"}, obj
    return obj


def raw_answer(port, data, timeout=5.0):
    """Send data on a new raw connection; return its one response."""
    raw = Raw(port, timeout)
    try:
        raw.send(data)
        return raw.response()
    finally:
        raw.close()


def exchange_refused_and_closed(port, data, expected_status):
    """Send data, expect one JSON error with expected_status, then a close."""
    raw = Raw(port)
    try:
        raw.send(data)
        answer = raw.response()
        assert answer is not None, "the gateway closed without an answer"
        status, headers, body = answer
        assert status == expected_status, (status, body)
        assert headers.get("content-type", "").startswith(
            "application/json")
        assert_json_error(body)
        assert raw.closed_by_server(), \
            "the connection stayed open after a framing error"
        return answer
    finally:
        raw.close()


def row_for(gw, request_id, timeout=5.0):
    """The usage rows of one request id (waiting, bounded, for one)."""
    return gw.wait_rows(1, "select * from usage where request_id = ?",
                        (request_id,), timeout=timeout)


def health_ok(gw, timeout=5.0):
    status, _, body = gw.request("GET", "/health", timeout=timeout)
    return status == 200 and json.loads(body)["status"] == "ok"


# ---------------------------------------------------------------------------
# 1. input limits and framing
# ---------------------------------------------------------------------------

def test_a_body_over_max_body_bytes_is_refused_with_413_before_it_is_sent(
        gw, upstream):
    key = gw.key
    raw = Raw(gw.port)
    try:
        # only the head: the answer must come without waiting for the body
        raw.send(head("POST", CHAT, [
            ("Host", "gw"), ("Authorization", "Bearer " + key["secret"]),
            ("Content-Type", "application/json"),
            ("Content-Length", str(10 ** 9))]))
        answer = raw.response()
        assert answer is not None
        status, headers, body = answer
        assert status == 413
        assert_json_error(body)
        assert raw.closed_by_server()
    finally:
        raw.close()
    assert upstream.requests == []


def test_an_over_limit_body_on_the_anthropic_route_gets_an_anthropic_413(
        gw, upstream):
    key = gw.key
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 10,
            "messages": [{"role": "user", "content": "x" * 2000}]}
    status, _, content = gw.request("POST", "/v1/messages", body, key=key)
    assert status == 413
    obj = assert_json_error(content, anthropic=True)
    assert obj["error"]["type"] == "request_too_large"
    assert upstream.requests == []


def test_a_body_under_max_body_bytes_is_forwarded(gw, upstream):
    key = gw.key
    body = chat_body(text="y" * 700)
    assert len(json.dumps(body)) < 1000
    status, _, content = gw.request("POST", CHAT, body, key=key)
    assert status == 200, content
    assert upstream.last.json == body


def test_a_request_line_over_8_kib_is_refused_with_414(gw):
    exchange_refused_and_closed(
        gw.port, head("GET", "/v1/models?q=" + "a" * 9000, [("Host", "gw")]),
        414)
    assert health_ok(gw)


def test_more_than_100_headers_are_refused_with_431(gw):
    headers = [("Host", "gw")] + [("X-Filler-%d" % i, "v")
                                  for i in range(110)]
    exchange_refused_and_closed(gw.port, head("GET", "/health", headers),
                                431)


def test_headers_over_32_kib_are_refused_with_431(gw):
    headers = [("Host", "gw")] + [("X-Big-%d" % i, "b" * 7000)
                                  for i in range(6)]
    exchange_refused_and_closed(gw.port, head("GET", "/health", headers),
                                431)


def test_ninety_small_headers_are_still_served(gw):
    headers = [("Host", "gw")] + [("X-Filler-%d" % i, "v")
                                  for i in range(89)]
    status, _, body = raw_answer(gw.port, head("GET", "/health", headers))
    assert status == 200
    assert json.loads(body)["status"] == "ok"


def chunked(data, pieces=3):
    """Encode bytes as a chunked body in a few chunks."""
    size = max(1, len(data) // pieces + 1)
    out = b""
    for start in range(0, len(data), size):
        part = data[start:start + size]
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


def test_a_chunked_body_is_decoded_and_forwarded_whole(gw, upstream):
    key = gw.key
    body = chat_body(text="chunked hello")
    data = json.dumps(body).encode()
    status, _, content = raw_answer(gw.port, head("POST", CHAT, [
        ("Host", "gw"), ("Authorization", "Bearer " + key["secret"]),
        ("Content-Type", "application/json"),
        ("Transfer-Encoding", "chunked")]) + chunked(data))
    assert status == 200, content
    assert json.loads(content)["object"] == "chat.completion"
    assert upstream.last.body == data
    assert upstream.last.json == body


def test_a_chunked_body_over_max_body_bytes_is_refused_with_413(
        gw, upstream):
    key = gw.key
    data = json.dumps(chat_body(text="z" * 3000)).encode()
    exchange_refused_and_closed(gw.port, head("POST", CHAT, [
        ("Host", "gw"), ("Authorization", "Bearer " + key["secret"]),
        ("Content-Type", "application/json"),
        ("Transfer-Encoding", "chunked")]) + chunked(data, pieces=6), 413)
    assert upstream.requests == []


@pytest.mark.parametrize("framing", [
    [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
    [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
    [("Content-Length", "5"), ("Content-Length", "6")],
    [("Content-Length", "5, 6")],
    [("Content-Length", "+5")],
    [("Content-Length", "0x10")],
    [("Content-Length", "5 5")],
    [("Content-Length", "-1")],
    [("Transfer-Encoding", "gzip, chunked")],
], ids=["cl-then-te", "te-then-cl", "two-lengths", "length-list", "plus",
        "hex", "space", "negative", "te-not-chunked"])
def test_ambiguous_body_framing_is_refused_with_400_and_the_connection_closed(
        gw, upstream, framing):
    key = gw.key
    exchange_refused_and_closed(gw.port, head("POST", CHAT, [
        ("Host", "gw"), ("Authorization", "Bearer " + key["secret"]),
        ("Content-Type", "application/json")] + framing), 400)
    assert upstream.requests == []
    assert health_ok(gw)


SMUGGLED = b"GET /smuggled-request HTTP/1.1\r\nHost: gw\r\n\r\n"


@pytest.mark.parametrize("case", [
    "no-key", "unknown-key", "revoked-key", "unknown-route", "admin-no-key",
    "health-with-body", "over-limit"])
def test_a_body_left_unread_by_a_refusal_is_never_parsed_as_a_request(
        gw, upstream, case):
    """The unread body must never be parsed as the next request."""
    headers = [("Host", "gw"), ("Content-Type", "application/json")]
    method, path = "POST", CHAT
    if case == "unknown-key":
        headers.append(("Authorization", "Bearer sk-gw-" + "x" * 40))
    elif case in ("revoked-key", "over-limit"):
        key = gw.key
        if case == "revoked-key":
            key = gw.create_key("desync")
            code, _, err = gw.cli("keys", "revoke", key["id"])
            assert code == 0, err
        headers.append(("Authorization", "Bearer " + key["secret"]))
    elif case == "unknown-route":
        path = "/no-such-route"
    elif case == "admin-no-key":
        path = "/admin/virtual-keys"
    elif case == "health-with-body":
        method, path = "GET", "/health"
    body = SMUGGLED
    if case == "over-limit":
        body = SMUGGLED + b" " * 1000  # over max_body_bytes
    headers.append(("Content-Length", str(len(body))))

    raw = Raw(gw.port, timeout=3.0)
    answers = []
    try:
        if case == "revoked-key":
            # the revocation reaches the server within a second
            poll(lambda: gw.request("GET", "/v1/models", key=key["secret"]),
                 lambda answer: answer[0] == 401, timeout=3, interval=0.1)
        raw.send(head(method, path, headers) + body)
        first = raw.response()
        if first is not None:
            answers.append(first)
            if first[1].get("connection", "").lower() != "close":
                try:
                    raw.send(head("GET", "/health", [("Host", "gw")]))
                except OSError:
                    pass
                # read whatever else comes until close or silence
                while True:
                    try:
                        more = raw.response()
                    except socket.timeout:
                        break
                    if more is None:
                        break
                    answers.append(more)
    finally:
        raw.close()

    for status, _, content in answers:
        assert b"smuggled" not in content, \
            "the body was parsed as a request: %r" % [
                (s, c[:120]) for s, _, c in answers]
        if status >= 400:
            assert_json_error(content)
    if answers and case != "health-with-body":
        assert answers[0][0] >= 400
    # after the refusal: nothing, or exactly the /health answer
    rest = answers[1:]
    assert len(rest) <= 1, [(s, c[:120]) for s, _, c in answers]
    if rest:
        assert rest[0][0] == 200 and json.loads(rest[0][2])["status"] == "ok"
    assert upstream.requests == []


# ---------------------------------------------------------------------------
# 2. slow clients and the connection cap
# ---------------------------------------------------------------------------

SLOW_LIMITS = {"limits": {"header_timeout_s": 1, "idle_timeout_s": 10}}


def test_a_client_trickling_its_headers_is_cut_off_at_the_header_deadline(
        gateway):
    gw = gateway(config=SLOW_LIMITS)
    request = (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"X-Slow: " + b"s" * 30 + b"\r\n\r\n")
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    received = b""
    cut = False
    sent = 0
    deadline = time.monotonic() + 6.0  # the header deadline is 1 s
    try:
        while sent < len(request) and time.monotonic() < deadline:
            try:
                sock.sendall(request[sent:sent + 1])
            except OSError:
                cut = True
                break
            sent += 1
            readable, _, _ = select.select([sock], [], [], 0.3)
            if readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    cut = True
                    break
                if not data:
                    cut = True
                    break
                received += data
        if not cut and received:
            # an answer (a 408) came: the close follows it
            sock.settimeout(3)
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        cut = True
                        break
                    received += data
            except socket.timeout:
                pass
            except OSError:
                cut = True
    finally:
        sock.close()
    assert cut, "the slow client was not cut off (sent %d of %d bytes)" % (
        sent, len(request))
    assert sent < len(request), "the whole slow request got through"
    if received:
        status_line = received.split(b"\r\n", 1)[0]
        assert b" 200 " not in status_line
        assert b" 408 " in status_line, received[:200]
        assert_json_error(received.split(b"\r\n\r\n", 1)[1])


def test_two_hundred_half_open_connections_do_not_block_a_normal_client(
        gateway):
    gw = gateway(config=SLOW_LIMITS)
    slow = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", gw.port),
                                            timeout=5)
            sock.sendall(b"GET /health HTTP/1.1\r\nHo")
            slow.append(sock)
        status, _, body = http_request("127.0.0.1", gw.port, "GET",
                                       "/health", timeout=5)
        assert status == 200
        assert json.loads(body)["status"] == "ok"
        # the half-open ones are cut at their deadline, not held forever
        sock = slow[0]
        sock.settimeout(5)
        try:
            data = sock.recv(65536)
            while data:
                data = sock.recv(65536)
        except ConnectionResetError:
            pass
    finally:
        for sock in slow:
            sock.close()


def test_past_max_connections_a_new_client_gets_503_until_others_close(
        gateway):
    gw = gateway(config={"limits": {"max_connections": 5,
                                    "idle_timeout_s": 30}})
    idle = []
    try:
        for _ in range(5):
            idle.append(socket.create_connection(("127.0.0.1", gw.port),
                                                 timeout=5))
        answer = raw_answer(gw.port, head("GET", "/health", [("Host", "gw")]))
        if answer is not None:
            status, headers, body = answer
            assert status == 503, (status, body)
            assert_json_error(body)
            assert "retry-after" in headers
    finally:
        for sock in idle:
            sock.close()
    # service resumes once the idle clients are gone
    def health_status():
        try:
            return http_request("127.0.0.1", gw.port, "GET", "/health",
                                timeout=2)[0]
        except OSError:
            return None

    assert poll(health_status, lambda status: status == 200, timeout=5,
                interval=0.1) == 200


# ---------------------------------------------------------------------------
# 3. control characters never reach the log raw
# ---------------------------------------------------------------------------

def access_line(gw, request_id):
    match = gw.wait_for_log(r"[^\n]*%s[^\n]*" % request_id)
    assert match, "no log line for %s:\n%s" % (request_id, gw.stderr_text())
    return match.group(0)


def test_control_characters_in_a_model_name_are_escaped_in_the_access_log(
        gw, upstream):
    key = gw.key
    model = "gpt-4o-mini\nFORGED-LINE status=200\x1b[2J\r\x07end"
    status, headers, _ = gw.request("POST", CHAT, chat_body(model=model),
                                    key=key)
    request_id = headers["x-llmgw-request-id"]
    line = access_line(gw, request_id)
    # the whole model name stayed on the request's own line
    assert "FORGED-LINE" in line
    assert "end" in line.split("FORGED-LINE", 1)[1]
    text = gw.stderr_text()
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert not any(l.startswith("FORGED-LINE") for l in text.splitlines())


def test_control_characters_in_a_model_name_are_escaped_in_the_json_log(
        gateway, upstream):
    gw = gateway(args=["--log-format", "json"])
    key = gw.create_key("escapes")
    model = "gpt-4o-mini\n{\"forged\": true}\x1b[31m"
    status, headers, _ = gw.request("POST", CHAT, chat_body(model=model),
                                    key=key)
    request_id = headers["x-llmgw-request-id"]
    line = access_line(gw, request_id)
    assert json.loads(line)["model"] == model
    text = gw.stderr_text()
    assert "\x1b" not in text
    assert not any(l.startswith('{"forged"') for l in text.splitlines())


@pytest.mark.parametrize("target", [
    "/v1/chat\x1b[2Jcompletions", "/v1/%0aFORGED-LINE", "/v1/\x07models"])
def test_a_path_with_control_characters_is_refused_and_logged_escaped(
        gw, upstream, target):
    status, headers, body = raw_answer(gw.port,
                                       head("GET", target, [("Host", "gw")]))
    assert status == 400, body
    assert_json_error(body)
    assert "status=400" in access_line(gw, headers["x-llmgw-request-id"])
    text = gw.stderr_text()
    assert "\x1b" not in text and "\x07" not in text
    assert not any(l.startswith("FORGED-LINE") for l in text.splitlines())
    assert upstream.requests == []


# ---------------------------------------------------------------------------
# 4. upstream faults
# ---------------------------------------------------------------------------

def only_row(gw, request_id):
    rows = row_for(gw, request_id)
    assert len(rows) == 1, rows
    return rows[0]


def assert_error_answer(gw, answer, status, code):
    """A gateway error: its status and JSON code, and one row with both."""
    got, headers, body = answer
    assert got == status
    assert assert_json_error(body)["error"]["code"] == code
    row = only_row(gw, headers["x-llmgw-request-id"])
    assert row["status"] == status and row["error"] == code


def cut_stream_row(gw, events):
    """A stream cut short (200, no [DONE]); return its one usage row."""
    assert events.status == 200
    assert "[DONE]" not in events.data()
    return only_row(gw, events.headers["x-llmgw-request-id"])


def test_an_unreachable_provider_gives_502_and_one_error_row(gw):
    answer = gw.request("POST", "/deadprov/v1/chat/completions", chat_body(),
                        key=gw.key)
    assert_error_answer(gw, answer, 502, "upstream_error")
    assert health_ok(gw)


def test_a_reset_before_the_status_line_gives_502_and_one_error_row(
        gw, upstream):
    upstream.set_default(Reply(reset_before_status=True))
    answer = gw.request("POST", CHAT, chat_body(), key=gw.key)
    assert_error_answer(gw, answer, 502, "upstream_error")
    assert health_ok(gw)


def test_a_reset_mid_stream_cuts_the_client_stream_and_records_one_row(
        gw, upstream):
    upstream.queue(Reply(reset_after=2))
    events = gw.stream(CHAT, chat_body(stream=True), key=gw.key, timeout=10)
    row = cut_stream_row(gw, events)
    assert row["error"] == "upstream_reset"
    assert row["streamed"] == 1
    assert row["input_tokens"] > 0 and row["estimated"] == 1
    assert health_ok(gw)


def test_a_provider_silent_past_the_read_timeout_gives_504_and_one_row(
        gw, upstream):
    upstream.queue(Reply(stall=4))
    answer = gw.request("POST", CHAT, chat_body(), key=gw.key, timeout=10)
    assert_error_answer(gw, answer, 504, "upstream_timeout")
    assert health_ok(gw)


def test_a_stream_going_silent_past_the_read_timeout_is_cut_and_recorded(
        gw, upstream):
    upstream.queue(Reply(pause=(2, 4)))
    events = gw.stream(CHAT, chat_body(stream=True), key=gw.key, timeout=10)
    assert cut_stream_row(gw, events)["error"] == "upstream_timeout"
    assert health_ok(gw)


def test_garbage_instead_of_json_gives_502_and_one_error_row(
        gw, upstream):
    upstream.queue(Reply(garbage=True))
    answer = gw.request("POST", CHAT, chat_body(), key=gw.key)
    assert_error_answer(gw, answer, 502, "upstream_error")
    assert health_ok(gw)


def test_a_truncated_stream_is_relayed_as_is_and_recorded_as_truncated(
        gw, upstream):
    upstream.queue(Reply(truncate=True))
    events = gw.stream(CHAT, chat_body(stream=True), key=gw.key)
    row = cut_stream_row(gw, events)
    assert events.json(), "the events before the cut must reach the client"
    assert row["error"] == "upstream_truncated"
    assert health_ok(gw)


def test_a_provider_429_is_passed_through_with_its_retry_after(
        gw, upstream):
    upstream.queue(Reply.error(429, "slow down please", retry_after=7))
    status, headers, body = gw.request("POST", CHAT, chat_body(),
                                           key=gw.key)
    assert status == 429
    assert headers.get("retry-after") == "7"
    assert json.loads(body) == error_body(CHAT, 429, "slow down please")
    row = only_row(gw, headers["x-llmgw-request-id"])
    assert row["status"] == 429 and row["error"]
    assert health_ok(gw)


def test_a_provider_500_is_passed_through_unchanged(gw, upstream):
    upstream.queue(Reply.error(500, "the fake broke"))
    status, headers, body = gw.request("POST", CHAT, chat_body(),
                                           key=gw.key)
    assert status == 500
    assert json.loads(body) == error_body(CHAT, 500, "the fake broke")
    row = only_row(gw, headers["x-llmgw-request-id"])
    assert row["status"] == 500 and row["error"]
    assert health_ok(gw)


def test_a_provider_redirect_is_not_followed_and_gives_502(gw, upstream):
    location = upstream.url + "/elsewhere/v1/chat/completions"
    upstream.queue(Reply.redirect(location))
    answer = gw.request("POST", CHAT, chat_body(), key=gw.key)
    assert_error_answer(gw, answer, 502, "upstream_error")
    seen = upstream.requests
    assert len(seen) == 1
    assert not any("elsewhere" in rec.path for rec in seen)
    assert health_ok(gw)


def test_an_absurd_content_length_ends_in_an_error_not_a_hang(
        gw, upstream):
    upstream.queue(Reply(content_length=10 ** 9))
    data = json.dumps(chat_body()).encode()
    try:
        answer = raw_answer(gw.port, head("POST", CHAT, [
            ("Host", "gw"), ("Authorization",
                             "Bearer " + gw.key["secret"]),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data)))]) + data, timeout=10)
    except socket.timeout:
        pytest.fail("the gateway neither answered nor closed")
    assert answer is not None or upstream.requests, \
        "the request never reached the provider"
    if answer is not None:
        status, headers, body = answer
        assert status >= 500, (status, body[:200])
        row = only_row(gw, headers["x-llmgw-request-id"])
        assert row["error"]
    assert health_ok(gw)


# ---------------------------------------------------------------------------
# 5. several real keys for one provider
# ---------------------------------------------------------------------------

def test_requests_are_spread_over_the_providers_real_keys(gw, upstream):
    for _ in range(4):
        status, _, _ = gw.request("POST", MULTI_CHAT, chat_body(),
                                     key=gw.key)
        assert status == 200
    used = [rec.headers.get("authorization") for rec in upstream.requests]
    assert len(used) == 4
    assert set(used) == {"Bearer k1", "Bearer k2"}


@pytest.mark.parametrize("fault", [429, 500, 503])
def test_a_retryable_answer_from_one_key_is_retried_with_the_other(
        gw, upstream, fault):
    upstream.queue(Reply.error(fault, "first key failed"))
    status, headers, body = gw.request("POST", MULTI_CHAT, chat_body(),
                                          key=gw.key)
    assert status == 200, body
    seen = upstream.requests
    assert len(seen) == 2
    assert {rec.headers.get("authorization") for rec in seen} == {
        "Bearer k1", "Bearer k2"}
    row = only_row(gw, headers["x-llmgw-request-id"])
    assert row["status"] == 200 and row["error"] is None


def test_a_stalled_provider_is_not_retried_with_another_key(gw, upstream):
    upstream.queue(Reply(stall=4))
    status, headers, body = gw.request("POST", MULTI_CHAT, chat_body(),
                                          key=gw.key, timeout=10)
    assert status == 504
    assert len(upstream.requests) == 1, \
        "a request that may have reached the provider was sent again"
    row = only_row(gw, headers["x-llmgw-request-id"])
    assert row["error"] == "upstream_timeout"


def test_a_reset_mid_stream_is_not_retried_with_another_key(gw, upstream):
    upstream.queue(Reply(reset_after=2))
    events = gw.stream(MULTI_CHAT, chat_body(stream=True), key=gw.key,
                          timeout=10)
    assert events.status == 200
    assert len(upstream.requests) == 1


# ---------------------------------------------------------------------------
# 6. storage faults
# ---------------------------------------------------------------------------

def through_a_storage_fault(gw, key, upstream, begin, end, seconds=3.0):
    """Send billable requests from two clients while a fault lasts.

    begin() starts the fault, end() ends it after `seconds`.  Returns a
    list of (status, request_id, body, committed): committed tells whether
    a 200's usage row was in the database when the answer had arrived.
    """
    results = []
    stop = threading.Event()

    def client():
        for _ in range(15):
            if stop.is_set():
                return
            status, headers, body = gw.request("POST", CHAT, chat_body(),
                                               key=key, timeout=40)
            request_id = headers.get("x-llmgw-request-id")
            committed = None
            if status == 200:
                committed = bool(query_db(
                    gw.db_path, "select id from usage where request_id = ?",
                    (request_id,)))
            results.append((status, request_id, body, committed))

    begin()
    threads = [threading.Thread(target=client, daemon=True)
               for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
            stop.wait(0.3)
        stop.wait(seconds)
    finally:
        end()
        stop.set()
        for thread in threads:
            thread.join(45)
    assert not any(thread.is_alive() for thread in threads), \
        "a client never got an answer"
    return results


def check_storage_fault_outcome(gw, key, upstream, results, sent_before):
    """The contract after a storage fault, checked in order of importance.

    Every billable request got 200 or 503 storage_unavailable; no 503
    reached the provider; the gateway recovers without a restart; no row
    is lost or doubled; the database is intact; and no 200 was sent
    before its usage row was committed.
    """
    statuses = [status for status, _, _, _ in results]
    assert set(statuses) <= {200, 503}, [
        (s, b[:200]) for s, _, b, _ in results]
    for status, _, body, _ in results:
        if status == 503:
            obj = assert_json_error(body)
            assert obj["error"]["code"] == "storage_unavailable"

    # recovery without a restart
    deadline = time.monotonic() + 5
    sent = sent_before + len(results)
    status = body = None
    while time.monotonic() < deadline:
        status, _, body = gw.request("POST", CHAT, chat_body(), key=key)
        sent += 1
        statuses.append(status)
        if status == 200:
            break
        time.sleep(0.3)
    assert status == 200, body

    # fail closed: only the requests answered 200 reached the provider
    answered = sent_before + statuses.count(200)
    assert len(upstream.requests) == answered, \
        "requests refused for storage reached the provider"

    rows = gw.wait_rows(sent)
    assert len(rows) == sent, "%d rows for %d billable requests" % (
        len(rows), sent)
    assert len(set(r["request_id"] for r in rows)) == sent
    check = query_db(gw.db_path, "PRAGMA integrity_check")
    assert list(check[0].values()) == ["ok"]

    uncommitted = [rid for s, rid, _, committed in results
                   if s == 200 and not committed]
    assert not uncommitted, (
        "200 answers were sent before their usage rows were committed "
        "(DESIGN: the row is committed before the last byte): %s"
        % uncommitted)


def test_a_held_database_lock_never_loses_rows_and_the_gateway_recovers(
        gateway, upstream):
    gw = gateway()
    key = gw.create_key("storage")
    assert gw.request("POST", CHAT, chat_body(), key=key)[0] == 200
    assert len(gw.wait_rows(1)) == 1

    # another process's view: a connection of our own holding the lock
    locker = sqlite3.connect(gw.db_path, timeout=5, isolation_level=None,
                             check_same_thread=False)
    try:
        def begin():
            locker.execute("BEGIN IMMEDIATE")
            # authentication needs no write: keys are still recognised
            status, _, _ = gw.request("GET", "/v1/models", key=key)
            assert status == 200
            status, _, body = gw.request("GET", "/v1/models",
                                         key="sk-gw-not-a-key-" + "q" * 30)
            assert status == 401
            assert_json_error(body)

        def end():
            if locker.in_transaction:
                locker.execute("COMMIT")

        results = through_a_storage_fault(gw, key, upstream, begin, end)
    finally:
        locker.close()
    check_storage_fault_outcome(gw, key, upstream, results, 1)


@pytest.mark.skipif(not hasattr(resource, "prlimit"),
                    reason="needs resource.prlimit (Linux) to make the "
                    "gateway's disk look full")
def test_a_full_disk_fails_closed_with_503_and_recovers_by_itself(
        gateway, upstream):
    """RLIMIT_FSIZE 0 on the server makes every file write fail (EFBIG).

    Python ignores SIGXFSZ, so SQLite sees a full disk; pipes (the log)
    are not affected.
    """
    gw = gateway()
    key = gw.create_key("diskfull")
    assert gw.request("POST", CHAT, chat_body(), key=key)[0] == 200
    assert len(gw.wait_rows(1)) == 1
    pid = gw.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)

    def begin():
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))

    def end():
        # while the disk is still "full", what needs no row still works
        assert health_ok(gw)
        assert gw.request("GET", "/v1/models", key=key)[0] == 200
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))

    try:
        results = through_a_storage_fault(gw, key, upstream, begin, end)
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert 503 in [status for status, _, _, _ in results], \
        "billable requests were served while usage could not be recorded"
    check_storage_fault_outcome(gw, key, upstream, results, 1)


# ---------------------------------------------------------------------------
# 7. secrets
# ---------------------------------------------------------------------------

def test_no_secret_ever_reaches_a_log_a_file_or_a_response(
        gateway, upstream, run_cli, tmp_path):
    gw = gateway()
    bodies = []      # every response body and header block that may not
    secrets_ = {"openai real key": OPENAI_UPSTREAM_KEY,
                "anthropic real key": ANTHROPIC_UPSTREAM_KEY,
                "admin key": ADMIN_KEY}

    def keep(status, headers, body):
        bodies.append(json.dumps(headers).encode() + b"\n" + body)
        return status

    # keys from the CLI and from the admin API, each rotated once
    cli_key = gw.create_key("secrets-cli")
    secrets_["cli secret"] = cli_key["secret"]
    status, _, body = gw.admin("POST", "/admin/virtual-keys",
                               {"project": "secrets-api", "name": "api"})
    assert status == 201, body
    api_key = json.loads(body)
    secrets_["api secret"] = api_key["secret"]

    code, out, err = gw.cli("keys", "rotate", cli_key["id"], "--output",
                            "json")
    assert code == 0, err
    cli_new = json.loads(out)["secret"]
    assert cli_new != cli_key["secret"]
    secrets_["cli rotated secret"] = cli_new
    status, _, body = gw.admin(
        "POST", "/admin/virtual-keys/%s/rotate" % api_key["id"])
    assert status == 200, body
    api_new = json.loads(body)["secret"]
    secrets_["api rotated secret"] = api_new

    # requests that work
    for secret in (cli_new, api_new):
        assert keep(*gw.request("POST", CHAT, chat_body(), key=secret)) \
            == 200
        events = gw.stream(CHAT, chat_body(stream=True), key=secret)
        assert events.status == 200
        bodies.append(json.dumps(events.headers).encode() + events.body)
    upstream.queue(Reply.error(429, "provider says slow down"))
    assert keep(*gw.request("POST", CHAT, chat_body(), key=cli_new)) == 429
    assert keep(*gw.request("POST", CHAT, b"{not json", key=cli_new,
                            headers={"Content-Type":
                                     "application/json"})) == 400
    keep(*gw.admin("GET", "/admin/virtual-keys"))
    keep(*gw.admin("GET", "/admin/virtual-keys/%s" % cli_key["id"]))
    keep(*gw.admin("GET", "/admin/usage"))

    # the rotated-away secrets stop working within a second or so
    for old in (cli_key["secret"], api_key["secret"]):
        status = poll(
            lambda: keep(*gw.request("POST", CHAT, chat_body(), key=old)),
            lambda status: status == 401, timeout=3, interval=0.1)
        assert status == 401

    # keys that must all be refused, in every header a client may use
    wrong = ["sk-gw-" + "W" * 43, "' OR 1=1 --", "*", "%",
             OPENAI_UPSTREAM_KEY, ANTHROPIC_UPSTREAM_KEY, ADMIN_KEY]
    # (fewer than the 30 failures a minute after which an address gets 429)
    header_names = ("Authorization", "x-api-key", "api-key",
                    "x-goog-api-key")
    for number, presented in enumerate(wrong):
        header = header_names[number % len(header_names)]
        value = "Bearer " + presented if header == "Authorization" \
            else presented
        status, headers, body = gw.request(
            "POST", CHAT, chat_body(), headers={header: value})
        keep(status, headers, body)
        assert status == 401, (presented, header, status, body)
        assert presented.encode() not in body
    # a virtual key on the admin API
    status, headers, body = gw.request(
        "GET", "/admin/virtual-keys",
        headers={"Authorization": "Bearer " + cli_new})
    keep(status, headers, body)
    assert status == 401

    # the same secret-free session through a config written by the CLI
    cfg = str(tmp_path / "written.json")
    code, out, err = run_cli("--config", cfg, "config", "set-key",
                             "openai", "-", input="sk-typed-real-key-9876\n")
    assert code == 0, err
    assert "sk-typed-real-key-9876" not in out + err
    assert file_mode(cfg) == 0o600
    code, out, err = run_cli("--config", cfg, "config", "list-keys")
    assert code == 0, err
    assert "sk-typed-real-key-9876" not in out + err
    assert "9876" in out  # masked, but recognisable

    gw.stop()
    logs = gw.stderr_text() + gw.stdout_text()
    files = {}
    for folder, _, names in os.walk(gw.workdir):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.abspath(path) == os.path.abspath(gw.config_path):
                continue
            with open(path, "rb") as handle:
                files[path] = handle.read()
    assert any(p.endswith(".db") for p in files), files.keys()
    for label, secret in secrets_.items():
        needle = secret.encode()
        assert secret not in logs, "%s found in the gateway's log" % label
        for path, data in files.items():
            assert needle not in data, "%s found in %s" % (label, path)
        for body in bodies:
            assert needle not in body, \
                "%s found in a response: %r" % (label, body[:300])

    # database files are private
    for suffix in ("", "-wal", "-shm"):
        path = gw.db_path + suffix
        if os.path.exists(path):
            assert file_mode(path) == 0o600, (path, oct(file_mode(path)))


def test_init_writes_a_private_config_and_database(run_cli, tmp_path):
    cfg = str(tmp_path / "fresh.json")
    db = str(tmp_path / "fresh.db")
    code, out, err = run_cli("--config", cfg, "--db", db, "init")
    assert code == 0, err
    assert file_mode(cfg) == 0o600
    assert file_mode(db) == 0o600


def test_many_unknown_keys_from_one_address_get_429_while_a_valid_key_works(
        gateway, upstream):
    gw = gateway()
    key = gw.create_key("spray")
    statuses = []
    last = None
    for i in range(45):
        status, headers, body = gw.request(
            "POST", CHAT, chat_body(), key="sk-gw-guess-%040d" % i)
        statuses.append(status)
        assert_json_error(body)
        if status == 429:
            last = headers
    assert set(statuses) <= {401, 429}
    assert statuses[0] == 401
    assert statuses[-1] == 429, statuses
    assert int(last["retry-after"]) >= 1
    status, _, body = gw.request("POST", CHAT, chat_body(), key=key)
    assert status == 200, body
    assert upstream.requests and upstream.last.headers[
        "authorization"] == "Bearer " + OPENAI_UPSTREAM_KEY


# ---------------------------------------------------------------------------
# what a hostile client could otherwise get past the gateway
# ---------------------------------------------------------------------------

def test_a_percent_encoded_route_is_routed_and_billed_as_the_route_itself(
        gw, upstream):
    # "%65" is "e": a provider serves /v1/m%65ssages as /v1/messages, so the
    # gateway must read its usage as an Anthropic stream's, input included
    key = gw.key
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 16,
            "stream": True, "messages": [{"role": "user", "content": "hi"}]}

    events = gw.stream("/v1/m%65ssages", body,
                       headers={"x-api-key": key["secret"]})

    assert events.status == 200 and events.error is None, events.body
    assert upstream.last.path == "/v1/messages"
    rows = row_for(gw, events.headers["x-llmgw-request-id"])
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (17, 11)
    assert rows[0]["estimated"] == 0 and rows[0]["error"] is None, rows[0]


def test_a_percent_encoded_chat_route_still_asks_for_stream_usage(
        gw, upstream):
    events = gw.stream("/v1/%63hat/c%6Fmpletions", chat_body(stream=True),
                       key=gw.key)

    assert events.status == 200 and events.error is None, events.body
    assert upstream.last.path == "/v1/chat/completions"
    assert upstream.last.json["stream_options"] == {"include_usage": True}
    rows = row_for(gw, events.headers["x-llmgw-request-id"])
    assert (rows[0]["input_tokens"], rows[0]["estimated"]) == (21, 0)


@pytest.mark.parametrize("body", [
    b'{"model":"gpt-4o","model":"gpt-4o-mini","messages":[]}',
    b'{"model":"gpt-4o","mod\\u0065l":"gpt-4o-mini","messages":[]}',
    b'{"model":"gpt-4o-mini","stream":false,"stream":true,"messages":[]}',
], ids=["model-twice", "model-escaped", "stream-twice"])
def test_a_body_naming_model_or_stream_twice_is_refused(gw, upstream, body):
    # a provider that takes the first value would serve a model the key's
    # allow-list never saw
    key = gw.key
    sent = len(upstream.requests)
    status, headers, content = gw.request(
        "POST", CHAT, body, key=key,
        headers={"Content-Type": "application/json"})

    assert status == 400, content
    err = assert_json_error(content)["error"]
    assert err["code"] == "invalid_request"
    assert err["param"] in ("model", "stream")
    assert len(upstream.requests) == sent
    rows = row_for(gw, headers["x-llmgw-request-id"])
    assert rows[0]["status"] == 400


def test_model_named_twice_below_the_top_level_is_forwarded(gw, upstream):
    body = {"model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": '"model" \u00e9'}],
            "tools": [{"type": "function", "function": {
                "name": "pick", "parameters": {"type": "object",
                                               "properties": {"model": {
                                                   "type": "string"}}}}}]}

    status, _, content = gw.request("POST", CHAT, body, key=gw.key)

    assert status == 200, content
    assert upstream.last.json == body


def chat_head(key, length):
    """The head of a chat request with a body of `length` bytes."""
    return head("POST", CHAT, [
        ("Host", "gw"), ("Authorization", "Bearer " + key["secret"]),
        ("Content-Type", "application/json"),
        ("Content-Length", str(length))])


def test_a_client_stalling_mid_body_gets_408_and_a_408_row(
        shared_gateways, upstream):
    gw = shared_gateways(config={"limits": {"idle_timeout_s": 0.5,
                                            "body_timeout_s": 30}})
    key = gw.create_key("stall")
    data = json.dumps(chat_body()).encode()
    raw = Raw(gw.port)
    try:
        raw.send(chat_head(key, len(data)) + data[:10])
        status, _, body = raw.response()
    finally:
        raw.close()

    assert status == 408, body
    assert assert_json_error(body)["error"]["code"] == "request_timeout"
    rows = gw.wait_rows(1)
    assert (rows[0]["status"], rows[0]["error"]) == (408, "request_timeout")
    assert len(upstream.requests) == 0


def test_a_body_trickled_past_the_body_deadline_is_cut_with_a_408_row(
        shared_gateways, upstream):
    gw = shared_gateways(config={"limits": {"idle_timeout_s": 5,
                                            "body_timeout_s": 0.6}})
    key = gw.create_key("trickle")
    data = json.dumps(chat_body()).encode()
    raw = Raw(gw.port)
    try:
        raw.send(chat_head(key, len(data)))
        closed = False
        for byte in data[:-1]:  # a byte every 0.1 s: never idle for long
            try:
                raw.send(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        assert closed or raw.closed_by_server()
    finally:
        raw.close()

    rows = gw.wait_rows(1)
    assert (rows[0]["status"], rows[0]["error"]) == (408, "request_timeout")
    assert len(upstream.requests) == 0


def test_a_client_resetting_mid_body_is_recorded_as_gone(
        shared_gateways, upstream):
    gw = shared_gateways()
    key = gw.create_key("reset")
    data = json.dumps(chat_body()).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    sock.sendall(chat_head(key, len(data)) + data[:10])
    time.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                    struct.pack("ii", 1, 0))
    sock.close()

    rows = gw.wait_rows(1)
    assert rows[0]["error"] == "client_disconnected", rows[0]
    assert len(upstream.requests) == 0
    assert health_ok(gw)


def test_an_http10_chunked_request_is_answered_and_its_connection_closed(
        gw, upstream):
    # RFC 9112, 6.1: such framing is faulty; what follows it on the
    # connection must not be read as another request
    data = json.dumps(chat_body()).encode()
    raw = Raw(gw.port)
    try:
        raw.send(head("POST", CHAT, [
            ("Authorization", "Bearer " + gw.key["secret"]),
            ("Content-Type", "application/json"),
            ("Connection", "keep-alive"),
            ("Transfer-Encoding", "chunked")], version="HTTP/1.0")
            + chunked(data) + head("GET", "/health", [("Host", "gw")]))
        status, _, _ = raw.response()
        assert status == 200
        assert raw.closed_by_server()
    finally:
        raw.close()


def test_spaces_in_a_model_name_cannot_add_fields_to_the_access_log(
        gw, upstream):
    model = "gpt-4o-mini status=200 key_id=key_forged"
    status, headers, _ = gw.request("POST", CHAT, chat_body(model=model),
                                    key=gw.key)
    line = access_line(gw, headers["x-llmgw-request-id"])
    # as a logfmt reader splits it: name=value, or name="quoted value"
    pairs = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line)
    assert [v for k, v in pairs if k == "key_id"] == [gw.key["id"]], line
    assert [v for k, v in pairs if k == "status"] == ["200"], line
    assert [v for k, v in pairs if k == "model"] == ['"%s"' % model], line


def test_client_chosen_model_names_do_not_grow_metrics_without_bound():
    metrics = llmgw.Metrics()
    for i in range(llmgw.Metrics.MAX_MODELS + 500):
        metrics.observe("openai", "nope/%05d" % i, "p", 400, None, None, 1.0)
    text = metrics.render()
    names = set(re.findall(r'model="([^"]*)"', text))
    assert len(names) == llmgw.Metrics.MAX_MODELS + 1
    assert "(other)" in names
    assert 'model="(other)",project="p",status="400"} 500' in text


def test_a_head_finished_as_the_watchdog_fires_is_not_served():
    # the watchdog answers 408 and shuts the connection; a request whose
    # head arrived in that moment must not go on to the provider
    watchdog = llmgw.Watchdog()
    thread = threading.Thread(target=watchdog.run, daemon=True)
    thread.start()
    a, b = socket.socketpair()
    try:
        fired = threading.Event()
        watchdog.arm(a, 0.0, fired.set)
        assert fired.wait(5)
        assert watchdog.disarm(a) is False
        watchdog.arm(b, 60.0)
        assert watchdog.disarm(b) is True
    finally:
        watchdog.stopped.set()
        thread.join(5)
        a.close()
        b.close()


@pytest.mark.parametrize("request_line, status", [
    (b"\r\nGET /health HTTP/1.1", 200),   # an empty line first is allowed
    (b"GET /health HTTP/1.2", 200),       # a later 1.x is read as 1.1
    (b"GET /health HTTP/2.0", 505),
    (b"GET /health HTTP/x", 400),
], ids=["empty-line-first", "http-1.2", "http-2.0", "not-a-version"])
def test_request_lines_are_read_as_rfc_9112_says(gw, request_line, status):
    answer = raw_answer(gw.port, request_line + b"\r\nHost: gw\r\n\r\n")
    assert answer is not None
    assert answer[0] == status, answer
    if status == 200:
        assert json.loads(answer[2])["status"] == "ok"
    else:
        assert_json_error(answer[2])


def test_an_http10_expect_gets_no_interim_answer(gw, upstream):
    # RFC 9110, 10.1.1: a 100 (Continue) is for HTTP/1.1 clients only
    data = json.dumps(chat_body()).encode()
    raw = Raw(gw.port)
    try:
        raw.send(head("POST", CHAT, [
            ("Authorization", "Bearer " + gw.key["secret"]),
            ("Content-Type", "application/json"), ("Expect", "100-continue"),
            ("Content-Length", str(len(data)))], version="HTTP/1.0") + data)
        first = raw.file.readline(1024)
    finally:
        raw.close()
    assert first.startswith(b"HTTP/1.1 200 "), first


def test_a_fragment_in_the_target_is_not_forwarded(gw, upstream):
    status, _, _ = gw.request("POST", CHAT + "#part", chat_body(),
                              key=gw.key)
    assert status == 200
    assert upstream.last.path == CHAT  # the raw target, query and all


@pytest.mark.parametrize("target", ["/v1/messages", "/anthropic/v1/messages"])
def test_errors_before_routing_come_in_anthropic_format_on_its_routes(
        shared_gateways, target):
    # DESIGN: errors on Anthropic routes are in Anthropic's format, also
    # those found before the route is known
    gw = shared_gateways(config={"limits": {"header_timeout_s": 0.5}})
    many = [("Host", "gw")] + [("X-Filler-%d" % i, "v") for i in range(120)]
    status, _, body = raw_answer(gw.port, head("POST", target, many))
    assert status == 431
    assert_json_error(body, anthropic=True)

    status, _, body = raw_answer(gw.port, head(
        "POST", target + "/%2e%2e/x", [("Host", "gw")]))
    assert status == 400
    assert_json_error(body, anthropic=True)

    raw = Raw(gw.port)
    try:
        raw.send(("POST %s HTTP/1.1\r\nHost: gw\r\n" % target).encode())
        status, _, body = raw.response()  # the header deadline passes
    finally:
        raw.close()
    assert status == 408
    assert_json_error(body, anthropic=True)


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND", "get"])
def test_methods_providers_do_not_serve_are_refused_with_405(
        gw, upstream, method):
    # a provider answering TRACE would echo the real key to the client
    sent = len(upstream.requests)
    status, headers, body = raw_answer(gw.port, head(
        method, CHAT, [("Host", "gw"),
                       ("Authorization", "Bearer " + gw.key["secret"])]))
    assert status == 405, body
    assert "POST" in headers["allow"]
    assert_json_error(body)
    assert len(upstream.requests) == sent
