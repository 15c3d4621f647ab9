"""The provider side on the wire: what llmgw's own HTTP/1.1 client sends,
and what it makes of the bytes real providers and middleboxes answer with.

The fake provider here is a raw socket (RawProvider), not an http.server:
it reads one request head and body at a time, records them, and writes
scripted bytes back, piece by piece, so that interim answers, chunk
boundaries, odd status lines, folded headers and early closes reach the
gateway exactly as written.  It counts the TCP connections it accepts and
notices when the gateway closes one, so connection reuse can be checked.

One gateway serves the whole module (its upstream read timeout is short,
so a client that hangs fails fast); each test makes its own virtual key
and tells its usage rows apart by key id.
"""

import json
import re
import socket
import struct
import threading
import time

import pytest

from conftest import OPENAI_UPSTREAM_KEY, key_rows, module_gateway, new_key


CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
MODEL = "gpt-4o-mini"
PROMPT = [{"role": "user", "content": "Say hello."}]
READ_TIMEOUT_S = 4
WAIT_S = 5.0  # bound of every wait on the raw provider


# ---------------------------------------------------------------------------
# the raw-socket provider
# ---------------------------------------------------------------------------

class Script(object):
    """One scripted answer: pieces written one by one, `gap` seconds apart.

    close: the provider closes the connection after the last piece;
    otherwise it waits on the same connection for the next request.
    reset: it closes with a TCP reset instead.  early: it answers as soon
    as it has the head, reads none of the body, and closes.
    """

    def __init__(self, pieces, close=False, gap=0.03, reset=False,
                 early=False):
        self.pieces = [pieces] if isinstance(pieces, bytes) else list(pieces)
        self.close = close or reset or early
        self.reset = reset
        self.early = early
        self.gap = gap


class RawRequest(object):
    """What the provider read: the connection number, head and body."""

    def __init__(self, conn, head, body):
        self.conn = conn
        self.head = head
        self.body = body
        lines = head.decode("latin-1").split("\r\n")
        self.request_line = lines[0]
        self.fields = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.fields.append((name.lower(), value.strip()))

    def values(self, name):
        """Every value of one header field (name in lower case)."""
        return [value for field, value in self.fields if field == name]

    @property
    def json(self):
        return json.loads(self.body.decode("utf-8"))


UNSCRIPTED = Script(
    b"HTTP/1.1 500 Internal Server Error\r\n"
    b"Content-Type: application/json\r\nContent-Length: 55\r\n"
    b"Connection: close\r\n\r\n"
    b'{"error":{"message":"no scripted answer","type":"x"}} \n', close=True)


class RawProvider(object):
    """A listening socket on 127.0.0.1 that answers with scripted bytes."""

    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.cond = threading.Condition()
        self.scripts = []
        self.requests = []
        self.accepted = 0        # connections accepted so far (numbered 1..)
        self.peer_closed = set()  # connections the gateway closed
        self.socks = set()
        self.threads = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept_loop,
                                       name="raw-provider", daemon=True)
        self.thread.start()

    @property
    def base_url(self):
        return "http://127.0.0.1:%d/v1" % self.port

    # --- scripting and results -------------------------------------------

    def reset(self):
        with self.cond:
            self.scripts = []
            self.requests = []

    def queue(self, *scripts):
        with self.cond:
            self.scripts.extend(scripts)

    def pending(self):
        with self.cond:
            return len(self.scripts)

    def received(self):
        with self.cond:
            return list(self.requests)

    def wait_peer_closed(self, conn, timeout=WAIT_S):
        """True once the gateway closed connection number conn."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while conn not in self.peer_closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(remaining)
            return True

    # --- serving ---------------------------------------------------------

    def _accept_loop(self):
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.cond:
                self.accepted += 1
                number = self.accepted
                self.socks.add(sock)
            thread = threading.Thread(target=self._serve,
                                      args=(sock, number), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _recv(self, sock):
        """Some bytes, or b"" when the peer closed; None when stopping."""
        while not self.stopping:
            try:
                return sock.recv(65536)
            except socket.timeout:
                continue
        return None

    def _serve(self, sock, number):
        sock.settimeout(0.25)  # only so that stop() is noticed
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = self._recv(sock)
                    if not data:
                        if data == b"":
                            self._closed_by_peer(number)
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                rec = RawRequest(number, head, b"")
                lengths = rec.values("content-length")
                length = int(lengths[0]) if lengths else 0
                with self.cond:
                    script = self.scripts.pop(0) if self.scripts else \
                        UNSCRIPTED
                while len(buf) < length and not script.early:
                    data = self._recv(sock)
                    if not data:
                        return
                    buf += data
                rec.body, buf = buf[:length], buf[length:]
                with self.cond:
                    self.requests.append(rec)
                    self.cond.notify_all()
                for i, piece in enumerate(script.pieces):
                    if i:
                        time.sleep(script.gap)
                    sock.sendall(piece)
                if script.reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                if script.close:
                    return
        except OSError:
            self._closed_by_peer(number)
        finally:
            with self.cond:
                self.socks.discard(sock)
            sock.close()

    def _closed_by_peer(self, number):
        with self.cond:
            self.peer_closed.add(number)
            self.cond.notify_all()

    def stop(self):
        self.stopping = True
        self.listener.close()
        with self.cond:
            socks = list(self.socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(WAIT_S)
        for thread in self.threads:
            thread.join(WAIT_S)


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_provider():
    server = RawProvider()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gw(raw_provider, tmp_path_factory):
    with module_gateway(raw_provider, tmp_path_factory, "wire-gw", {
            "limits": {"upstream_read_timeout_s": READ_TIMEOUT_S}}) as gateway:
        yield gateway


@pytest.fixture
def provider(raw_provider, gw):
    """The raw provider with no scripts and no recorded requests."""
    raw_provider.reset()
    yield raw_provider
    raw_provider.reset()


@pytest.fixture
def key(gw, provider):
    return new_key(gw, "wire-tests")


# ---------------------------------------------------------------------------
# answers as bytes
# ---------------------------------------------------------------------------

def chat_body(**extra):
    body = {"model": MODEL, "messages": PROMPT}
    body.update(extra)
    return body


def completion(rid, prompt_tokens, completion_tokens, text="Hello!"):
    """A chat.completion answer, as compact JSON bytes."""
    return json.dumps({
        "id": rid, "object": "chat.completion", "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt_tokens,
                  "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }, separators=(",", ":")).encode("utf-8")


def head(status="200 OK", fields=(("Content-Type", "application/json"),),
         version="HTTP/1.1"):
    lines = ["%s %s" % (version, status)]
    lines += ["%s: %s" % field for field in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def json_answer(body, fields=(), version="HTTP/1.1", status="200 OK"):
    """A whole answer framed by Content-Length."""
    return head(status, (("Content-Type", "application/json"),)
                + tuple(fields) + (("Content-Length", str(len(body))),),
                version)


def chunk(data, extension=""):
    return b"%x%s\r\n%s\r\n" % (len(data), extension.encode(), data)


def split_at(data, *positions):
    """data cut at the given offsets: the pieces a provider writes."""
    bounds = [0] + list(positions) + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def assert_ok_row(gw, key, prompt_tokens, completion_tokens, streamed=0,
                  request_id=None):
    """The key has exactly one row: a 200 with these tokens."""
    rows = key_rows(gw, key)
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["status"] == 200, row
    assert row["error"] is None, row
    assert row["provider"] == "openai" and row["model"] == MODEL, row
    assert row["input_tokens"] == prompt_tokens, row
    assert row["output_tokens"] == completion_tokens, row
    assert row["streamed"] == streamed and row["estimated"] == 0, row
    if request_id is not None:
        assert row["upstream_request_id"] == request_id, row
    return row


def assert_upstream_error_row(gw, key):
    rows = key_rows(gw, key)
    assert len(rows) == 1, rows
    assert rows[0]["status"] == 502, rows[0]
    assert rows[0]["error"] == "upstream_error", rows[0]
    return rows[0]


def openai_upstream_error(content):
    """A gateway-made 502 body in the OpenAI shape; return its error."""
    obj = json.loads(content.decode("utf-8"))
    assert set(obj) == {"error"}, obj
    err = obj["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["code"] == "upstream_error", err
    assert isinstance(err["message"], str) and err["message"], err
    return err


# ---------------------------------------------------------------------------
# 1. interim answers
# ---------------------------------------------------------------------------

def test_interim_1xx_answers_before_the_final_answer_are_skipped(
        gw, provider, key):
    body = completion("chatcmpl-interim", 13, 5)
    provider.queue(Script([
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n",
        json_answer(body, [("x-request-id", "req-interim")]) + body]))

    status, headers, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 200, content
    assert content == body
    assert headers["content-type"] == "application/json"
    assert "link" not in headers  # that came with the interim answer only
    assert len(provider.received()) == 1
    assert_ok_row(gw, key, 13, 5, request_id="req-interim")


# ---------------------------------------------------------------------------
# 2. the request as the provider receives it
# ---------------------------------------------------------------------------

def test_the_provider_receives_one_clean_request_with_the_real_key(
        gw, provider, key):
    answer = completion("chatcmpl-head", 3, 2)
    provider.queue(Script(json_answer(answer) + answer))
    sent = json.dumps(chat_body(max_tokens=16)).encode("utf-8")

    status, _, content = gw.request(
        "POST", CHAT, sent, key=key, headers={
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate, br",
            "User-Agent": "OpenAI/Python 1.55.0",
            "X-Stainless-Lang": "python",
            "Host": "gateway.example:8000"})

    assert status == 200, content
    received = provider.received()
    assert len(received) == 1
    rec = received[0]
    assert rec.request_line == "POST /v1/chat/completions HTTP/1.1"
    assert rec.values("host") == ["127.0.0.1:%d" % provider.port]
    assert rec.values("authorization") == ["Bearer " + OPENAI_UPSTREAM_KEY]
    assert key["secret"].encode() not in rec.head
    assert key["secret"].encode() not in rec.body
    assert rec.values("content-length") == [str(len(sent))]
    assert rec.values("transfer-encoding") == []
    assert rec.values("accept-encoding") == ["identity"]
    assert rec.values("content-type") == ["application/json"]
    assert rec.values("user-agent") == ["OpenAI/Python 1.55.0"]
    assert rec.values("x-stainless-lang") == ["python"]
    # every header line is a well-formed "name: value" field
    assert all(name and name == name.strip() for name, _ in rec.fields)
    assert rec.body == sent


# ---------------------------------------------------------------------------
# 3. chunked answers
# ---------------------------------------------------------------------------

def test_a_chunked_json_answer_with_extensions_and_trailers_is_relayed_whole(
        gw, provider, key):
    body = completion("chatcmpl-chunked", 21, 8,
                      text="A longer answer, to be sent in several chunks.")
    first, second, third = body[:0x1a], body[0x1a:60], body[60:]
    wire = (head(fields=(("Content-Type", "application/json"),
                         ("Transfer-Encoding", "chunked"),
                         ("Trailer", "x-checksum"),
                         ("x-request-id", "req-chunked")))
            + b"1a;foo=bar\r\n" + first + b"\r\n"
            + b"%X ; name=\"quoted value\"\r\n" % len(second) + second
            + b"\r\n" + chunk(third)
            + b"0\r\nx-checksum: 1234\r\nx-other: 5\r\n\r\n")
    at = wire.index(b"1a;foo")
    # writes that cut through a chunk-size line, a chunk and the trailer
    pieces = split_at(wire, at + 2, at + 20, wire.index(second) + 3,
                      len(wire) - 10)
    follow = completion("chatcmpl-after", 1, 1)
    provider.queue(Script(pieces), Script(json_answer(follow) + follow))

    status, headers, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 200, content
    assert content == body
    assert headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in headers
    assert "x-checksum" not in headers  # a trailer is not a header
    assert_ok_row(gw, key, 21, 8, request_id="req-chunked")

    # the trailer was read to its end: the connection carries the next one
    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)
    assert status == 200, content
    assert content == follow
    first_rec, second_rec = provider.received()
    assert second_rec.conn == first_rec.conn


# ---------------------------------------------------------------------------
# 4. answers that end when the provider closes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
def test_an_answer_without_length_ends_at_the_close_and_is_relayed_whole(
        gw, provider, key, version):
    body = completion("chatcmpl-close", 17, 4, text="x" * 3000)
    wire = head(version=version) + body
    provider.queue(Script(split_at(wire, 40, 1000, 2000), close=True))
    follow = completion("chatcmpl-next", 2, 3)
    provider.queue(Script(json_answer(follow) + follow))

    status, headers, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 200, content
    assert content == body
    assert headers["content-length"] == str(len(body))
    assert_ok_row(gw, key, 17, 4)

    # the next request works, on a new connection
    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)
    assert status == 200, content
    assert content == follow
    first, second = provider.received()
    assert second.conn != first.conn


# ---------------------------------------------------------------------------
# 5. keep-alive
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("version, fields", [
    ("HTTP/1.1", ()),
    ("HTTP/1.1", (("Connection", "keep-alive"),)),
    ("HTTP/1.0", (("Connection", "keep-alive"),)),
], ids=["http11", "http11-keep-alive", "http10-keep-alive"])
def test_sequential_requests_share_one_provider_connection(
        gw, provider, key, version, fields):
    first = completion("chatcmpl-ka1", 5, 1)
    second = completion("chatcmpl-ka2", 6, 2)
    provider.queue(Script(json_answer(first, fields, version) + first),
                   Script(json_answer(second, fields, version) + second))
    accepted_before = provider.accepted

    answers = [gw.request("POST", CHAT, chat_body(), key=key)
               for _ in range(2)]

    assert [a[0] for a in answers] == [200, 200], answers
    assert [a[2] for a in answers] == [first, second]
    one, two = provider.received()
    assert one.conn == two.conn
    assert provider.accepted - accepted_before <= 1
    rows = key_rows(gw, key, count=2)
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == \
        [(5, 1), (6, 2)]


@pytest.mark.parametrize("version, fields", [
    ("HTTP/1.1", (("Connection", "close"),)),
    ("HTTP/1.1", (("Connection", "Close"),)),
    ("HTTP/1.1", (("Connection", "keep-alive, close"),)),
    ("HTTP/1.1", (("Connection", "keep-alive"), ("Connection", "close"))),
    ("HTTP/1.0", ()),
], ids=["connection-close", "connection-Close", "close-in-a-list",
        "close-in-a-second-field", "http10"])
def test_an_answer_that_forbids_reuse_makes_the_next_request_connect_anew(
        gw, provider, key, version, fields):
    # the provider keeps the socket open all the same: only the answer's
    # own words can tell the gateway not to send on it again
    first = completion("chatcmpl-cl1", 5, 1)
    second = completion("chatcmpl-cl2", 6, 2)
    provider.queue(Script(json_answer(first, fields, version) + first),
                   Script(json_answer(second) + second))

    answers = [gw.request("POST", CHAT, chat_body(), key=key)
               for _ in range(2)]

    assert [a[0] for a in answers] == [200, 200], answers
    assert [a[2] for a in answers] == [first, second]
    one, two = provider.received()
    assert two.conn != one.conn
    assert two.conn > one.conn  # a connection accepted after the first
    assert provider.wait_peer_closed(one.conn), \
        "the gateway kept a connection its provider said it would close"


# ---------------------------------------------------------------------------
# 6. bad status lines
# ---------------------------------------------------------------------------

BAD_STATUS_LINES = [
    b"HTTP/2 200\r\n\r\n",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 \xb200 OK\r\n\r\n",   # a superscript two is not a digit
    b"HTTP/1.1 000 OK\r\n\r\n",      # status codes run from 100 to 599
    b"HTTP/1.1 099 Odd\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b" HTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
]
BAD_STATUS_IDS = ["http2", "garbage", "two-digits", "four-digits",
                  "not-a-number", "superscript-digit", "zero", "below-100",
                  "not-http", "leading-space", "unasked-upgrade"]


def prime_connection(gw, provider, key):
    """One good exchange, so the next request goes on a pooled
    connection; return the provider's record of it."""
    good = completion("chatcmpl-prime", 1, 1)
    provider.queue(Script(json_answer(good) + good))
    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)
    assert (status, content) == (200, good)
    return provider.received()[-1]


@pytest.mark.parametrize("then_close", [False, True],
                         ids=["then-silent", "then-close"])
@pytest.mark.parametrize("status_line", BAD_STATUS_LINES, ids=BAD_STATUS_IDS)
def test_a_bad_status_line_gives_502_upstream_error_and_one_row(
        gw, provider, key, status_line, then_close):
    # then-silent: the provider says nothing more and keeps the connection
    # open, so the gateway must decide from the line alone, not wait for a
    # timeout.  then-close: the request had reached the provider, which
    # answered something: it must not be sent again on a new connection,
    # although the connection it went on was a pooled one.
    primed = prime_connection(gw, provider, key)
    provider.queue(Script(status_line, close=then_close))
    started = time.monotonic()

    status, headers, content = gw.request("POST", CHAT, chat_body(), key=key)

    received = provider.received()
    assert len(received) == 2, "sent again: %r" % [r.conn for r in received]
    assert received[1].conn == primed.conn
    assert status == 502, (status, content, time.monotonic() - started)
    openai_upstream_error(content)
    assert headers["content-type"].startswith("application/json")
    rows = key_rows(gw, key, count=2)
    assert len(rows) == 2, rows
    assert rows[1]["status"] == 502, rows[1]
    assert rows[1]["error"] == "upstream_error", rows[1]
    if not then_close:
        assert provider.wait_peer_closed(received[1].conn)


def assert_a_502_not_sent_again(gw, provider, key, primed, status, content):
    """The request after prime_connection reached the provider once, on
    the primed connection, and the client got a 502 with its own row."""
    received = provider.received()
    assert len(received) == 2, "sent again: %r" % [r.conn for r in received]
    assert received[1].conn == primed.conn
    assert status == 502, (status, content)
    openai_upstream_error(content)
    rows = key_rows(gw, key, count=2)
    assert len(rows) == 2 and rows[1]["status"] == 502, rows


def test_an_interim_answer_then_a_close_is_not_sent_again(gw, provider, key):
    # "100 Continue" says the provider has the request: when it then drops
    # the connection, sending the request again could bill it twice
    primed = prime_connection(gw, provider, key)
    provider.queue(Script(b"HTTP/1.1 100 Continue\r\n\r\n", close=True))

    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert_a_502_not_sent_again(gw, provider, key, primed, status, content)


def test_a_bad_status_line_on_the_anthropic_route_gives_an_anthropic_502(
        gw, provider, key):
    provider.queue(Script(b"HTTP/2 200\r\n\r\n"))
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 16,
            "messages": PROMPT}

    status, _, content = gw.request("POST", MESSAGES, body,
                                    headers={"x-api-key": key["secret"]})

    assert status == 502, content
    obj = json.loads(content.decode("utf-8"))
    assert obj["type"] == "error", obj
    assert obj["error"]["type"] == "api_error", obj
    assert obj["error"]["code"] == "upstream_error", obj
    assert obj["error"]["message"], obj
    rows = key_rows(gw, key)
    assert len(rows) == 1
    assert rows[0]["status"] == 502 and rows[0]["error"] == "upstream_error"
    assert rows[0]["provider"] == "anthropic"
    assert len(provider.received()) == 1


# ---------------------------------------------------------------------------
# 7. bodies cut short
# ---------------------------------------------------------------------------

def test_a_body_short_of_its_content_length_gives_502_and_one_row(
        gw, provider, key):
    provider.queue(Script([
        head(fields=(("Content-Type", "application/json"),
                     ("Content-Length", "500"))),
        b'{"id":"chatcmpl-short","choices":[' + b" " * 66],
        close=True))

    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 502, content
    err = openai_upstream_error(content)
    assert "short of its Content-Length" in err["message"], err
    assert "400 bytes" in err["message"], err  # 500 promised, 100 sent
    assert_upstream_error_row(gw, key)
    assert len(provider.received()) == 1


def test_a_chunked_body_cut_before_its_last_chunk_gives_502_and_one_row(
        gw, provider, key):
    body = completion("chatcmpl-cut", 9, 9)
    provider.queue(Script([
        head(fields=(("Content-Type", "application/json"),
                     ("Transfer-Encoding", "chunked"))),
        chunk(body[:40]), b"%x\r\n" % (len(body) - 40) + body[40:50]],
        close=True))

    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 502, content
    openai_upstream_error(content)
    assert_upstream_error_row(gw, key)


# ---------------------------------------------------------------------------
# 8. server-sent events
# ---------------------------------------------------------------------------

def stream_chunks(rid="chatcmpl-sse"):
    """OpenAI chunks of a stream asked with include_usage, then the usage."""
    def chunk_obj(delta, finish):
        return {"id": rid, "object": "chat.completion.chunk",
                "created": 1700000000, "model": MODEL,
                "choices": [{"index": 0, "delta": delta,
                             "finish_reason": finish}],
                "usage": None}
    chunks = [chunk_obj({"role": "assistant", "content": ""}, None),
              chunk_obj({"content": "Hel"}, None),
              chunk_obj({"content": "lo, "}, None),
              chunk_obj({"content": "wire!"}, None),
              chunk_obj({}, "stop")]
    usage = {"id": rid, "object": "chat.completion.chunk",
             "created": 1700000000, "model": MODEL, "choices": [],
             "usage": {"prompt_tokens": 27, "completion_tokens": 6,
                       "total_tokens": 33}}
    payloads = [json.dumps(c, separators=(",", ":")) for c in chunks]
    return payloads, json.dumps(usage, separators=(",", ":"))


def sse_wire(payloads, usage):
    """The stream as the provider writes it, and its decoded body.

    Several events share the first chunk; one event and the usage event
    are each split across two chunks; one write holds two chunks.
    """
    events = [("data: %s\n\n" % p).encode() for p in payloads]
    usage_event = ("data: %s\n\n" % usage).encode()
    done = b"data: [DONE]\n\n"
    body_chunks = [
        events[0] + events[1] + events[2],
        events[3][:25],
        events[3][25:] + events[4],
        usage_event[:40],
        usage_event[40:] + done,
    ]
    answer_head = head(fields=(("Content-Type", "text/event-stream"),
                               ("Transfer-Encoding", "chunked"),
                               ("x-request-id", "req-sse")))
    framed = [chunk(c) for c in body_chunks]
    pieces = [answer_head + framed[0], framed[1], framed[2] + framed[3],
              framed[4], b"0\r\n\r\n"]
    return pieces, b"".join(body_chunks)


def test_an_sse_stream_in_odd_chunks_reaches_the_client_event_for_event(
        gw, provider, key):
    payloads, usage = stream_chunks()
    pieces, _ = sse_wire(payloads, usage)
    provider.queue(Script(pieces))
    body = chat_body(stream=True)

    events = gw.stream(CHAT, body, key=key, timeout=15)

    assert events.status == 200, events.body
    assert events.error is None, events.error
    assert events.headers["content-type"] == "text/event-stream"
    # the usage-only chunk the gateway asked for is not passed on
    assert events.data() == payloads + ["[DONE]"]
    rec, = provider.received()
    assert rec.json == dict(body, stream_options={"include_usage": True})
    assert_ok_row(gw, key, 27, 6, streamed=1, request_id="req-sse")


def test_an_sse_stream_asked_with_usage_is_relayed_byte_for_byte(
        gw, provider, key):
    payloads, usage = stream_chunks()
    pieces, decoded = sse_wire(payloads, usage)
    provider.queue(Script(pieces))
    body = chat_body(stream=True, stream_options={"include_usage": True})

    events = gw.stream(CHAT, body, key=key, timeout=15)

    assert events.status == 200, events.body
    assert events.error is None, events.error
    assert events.data() == payloads + [usage, "[DONE]"]
    assert events.body == decoded
    rec, = provider.received()
    assert rec.json == body
    assert_ok_row(gw, key, 27, 6, streamed=1, request_id="req-sse")


# ---------------------------------------------------------------------------
# 9. header syntax real servers get wrong or old
# ---------------------------------------------------------------------------

def test_folded_headers_and_headers_without_a_space_are_understood(
        gw, provider, key):
    body = completion("chatcmpl-fold", 11, 3)
    wire = (b"HTTP/1.1 200 OK\r\n"
            b"Content-Type:application/json\r\n"
            b"x-request-id:abc\r\n"
            b"X-Folded: first\r\n"
            b"   second\r\n"
            b"\tthird\r\n"
            b"x-padded:   spaced out   \r\n"
            b"Content-Length:%d\r\n"
            b"\r\n" % len(body)) + body
    provider.queue(Script(wire))

    status, headers, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 200, content
    assert content == body
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"] == "abc"
    assert headers["x-folded"] == "first second third"
    assert headers["x-padded"] == "spaced out"
    assert_ok_row(gw, key, 11, 3, request_id="abc")


def test_bare_lf_line_endings_are_understood(gw, provider, key):
    body = completion("chatcmpl-lf", 8, 2)
    wire = (b"HTTP/1.1 200 OK\n"
            b"Content-Type: application/json\n"
            b"Transfer-Encoding: chunked\n"
            b"x-request-id: req-lf\n"
            b"\n"
            + b"%x\n" % 30 + body[:30] + b"\n"
            + b"%x\n" % (len(body) - 30) + body[30:] + b"\n"
            + b"0\n\n")
    follow = completion("chatcmpl-lf2", 1, 1)
    provider.queue(Script(wire), Script(json_answer(follow) + follow))

    status, headers, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 200, content
    assert content == body
    assert_ok_row(gw, key, 8, 2, request_id="req-lf")
    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)
    assert (status, content) == (200, follow)
    one, two = provider.received()
    assert two.conn == one.conn


def test_a_bare_cr_in_a_provider_header_never_reaches_the_client(
        gw, provider, key):
    # RFC 9112, 2.2: a bare CR must be refused or replaced with a space
    # before a message is forwarded; passed on, a client that ends lines
    # at CR would see a Set-Cookie the gateway otherwise never relays
    body = completion("chatcmpl-cr", 4, 4)
    provider.queue(Script(json_answer(
        body, [("x-note", "a\rSet-Cookie: session=forged")]) + body))

    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        data = json.dumps(chat_body()).encode()
        sock.sendall(("POST %s HTTP/1.1\r\nHost: gw\r\n"
                      "Authorization: Bearer %s\r\n"
                      "Content-Type: application/json\r\n"
                      "Content-Length: %d\r\nConnection: close\r\n\r\n"
                      % (CHAT, key["secret"], len(data))).encode() + data)
        received = b""
        while b"\r\n\r\n" not in received:
            more = sock.recv(65536)
            if not more:
                break
            received += more
    finally:
        sock.close()

    answer_head = received.partition(b"\r\n\r\n")[0]
    assert answer_head.startswith(b"HTTP/1.1 "), received
    assert b"\r" not in answer_head.replace(b"\r\n", b""), answer_head
    # however a client splits the lines, no Set-Cookie field appears
    lines = re.split(rb"\r\n|\r|\n", answer_head)
    assert not any(line.lower().startswith(b"set-cookie")
                   for line in lines), answer_head
    assert b"x-note: a" in answer_head.lower()  # the field itself is kept


# ---------------------------------------------------------------------------
# 10. framing a second answer could hide in
# ---------------------------------------------------------------------------

STRAY = completion("chatcmpl-STRAY", 999, 999)


@pytest.mark.parametrize("extra", [
    b"\r\n",
    json_answer(STRAY) + STRAY,
], ids=["stray-crlf", "stray-answer"])
def test_bytes_past_the_end_of_an_answer_are_never_taken_for_the_next(
        gw, provider, key, extra):
    # RFC 9112, 6.3: such bytes are not a response; an answer of one key
    # must never be handed to the next request, of another key
    other = new_key(gw, "wire-tests-other")
    first = completion("chatcmpl-first", 10, 1)
    second = completion("chatcmpl-second", 20, 2)
    provider.queue(Script(json_answer(first) + first + extra),
                   Script(json_answer(second) + second))

    answers = [gw.request("POST", CHAT, chat_body(), key=k)
               for k in (key, other)]

    assert answers[0][:1] + answers[0][2:] == (200, first), answers[0]
    assert answers[1][:1] + answers[1][2:] == (200, second), answers[1]
    one, two = provider.received()
    assert two.conn != one.conn
    assert provider.wait_peer_closed(one.conn)
    assert_ok_row(gw, key, 10, 1)
    assert_ok_row(gw, other, 20, 2)


@pytest.mark.parametrize("fields", [
    (("Content-Length", "abc"),),
    (("Content-Length", "-1"),),
    (("Content-Length", "+60"),),
    (("Content-Length", "60, 61"),),
    (("Content-Length", "60"), ("Content-Length", "61")),
    (("Content-Length", "1" * 40),),
], ids=["letters", "negative", "plus-sign", "list-disagrees",
        "fields-disagree", "40-digits"])
def test_a_content_length_that_is_not_one_length_gives_502_at_once(
        gw, provider, key, fields):
    # RFC 9112, 6.3: the framing is unknowable, so the answer cannot be
    # relayed; the provider keeps the connection open, so a gateway that
    # guessed would wait for its read timeout and answer 504
    body = completion("chatcmpl-cl", 3, 3)
    provider.queue(Script(head(fields=(("Content-Type", "application/json"),)
                               + fields) + body))

    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 502, (status, content)
    assert "Content-Length" in openai_upstream_error(content)["message"]
    assert_upstream_error_row(gw, key)
    assert len(provider.received()) == 1


def test_a_content_length_list_of_one_value_is_that_length(
        gw, provider, key):
    body = completion("chatcmpl-cl-list", 3, 4)
    n = str(len(body))
    provider.queue(Script(head(fields=(
        ("Content-Type", "application/json"),
        ("Content-Length", "%s, %s" % (n, n)),
        ("Content-Length", n))) + body))

    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert (status, content) == (200, body)
    assert_ok_row(gw, key, 3, 4)


@pytest.mark.parametrize("version, fields, reused", [
    ("HTTP/1.1", (("Transfer-Encoding", "identity, chunked"),), True),
    ("HTTP/1.1", (("Transfer-Encoding", "identity"),
                  ("Transfer-Encoding", "chunked")), True),
    # both framings, or chunked in HTTP/1.0, may hide a second answer
    # (RFC 9112, 6.1 and 6.3): the connection is not used again
    ("HTTP/1.1", (("Transfer-Encoding", "chunked"),
                  ("Content-Length", "7")), False),
    ("HTTP/1.0", (("Transfer-Encoding", "chunked"),
                  ("Connection", "keep-alive")), False),
], ids=["list", "two-fields", "with-content-length", "http10"])
def test_chunked_as_the_last_coding_frames_the_body(
        gw, provider, key, version, fields, reused):
    body = completion("chatcmpl-te", 6, 5)
    follow = completion("chatcmpl-next", 1, 1)
    provider.queue(
        Script([head(fields=(("Content-Type", "application/json"),)
                     + fields, version=version),
                chunk(body[:50]) + chunk(body[50:]) + b"0\r\n\r\n"]),
        Script(json_answer(follow) + follow))

    status, headers, content = gw.request("POST", CHAT, chat_body(), key=key)
    second = gw.request("POST", CHAT, chat_body(), key=key)

    assert (status, content) == (200, body)
    assert headers["content-length"] == str(len(body))
    assert (second[0], second[2]) == (200, follow)
    one, two = provider.received()
    assert (two.conn == one.conn) is reused
    if not reused:
        assert provider.wait_peer_closed(one.conn)
    rows = key_rows(gw, key, count=2)
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == \
        [(6, 5), (1, 1)]


@pytest.mark.parametrize("coding", ["gzip, chunked", "gzip"])
def test_a_transfer_coding_the_gateway_never_asked_for_gives_502(
        gw, provider, key, coding):
    # Transfer-Encoding is hop-by-hop: passed on without its label, the
    # client would get compressed bytes it cannot tell apart
    provider.queue(Script(head(fields=(("Content-Type", "application/json"),
                                       ("Transfer-Encoding", coding)))
                          + b"\x1f\x8b\x08\x00", close=True))

    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 502, (status, content)
    assert "transfer coding" in openai_upstream_error(content)["message"]
    assert_upstream_error_row(gw, key)


def test_a_stream_in_a_coding_list_reaches_the_client_without_chunk_sizes(
        gw, provider, key):
    payloads, usage = stream_chunks()
    pieces, _ = sse_wire(payloads, usage)
    pieces[0] = pieces[0].replace(b"Transfer-Encoding: chunked",
                                  b"Transfer-Encoding: identity\r\n"
                                  b"Transfer-Encoding: chunked")
    provider.queue(Script(pieces))

    events = gw.stream(CHAT, chat_body(stream=True), key=key, timeout=15)

    assert events.status == 200 and events.error is None, events.body
    assert events.data() == payloads + ["[DONE]"]
    assert_ok_row(gw, key, 27, 6, streamed=1, request_id="req-sse")


def test_a_large_answer_with_both_framings_reaches_the_client_whole(
        gw, provider, key):
    # over the size the gateway buffers, the answer is relayed as it is
    # read; the client must get the framing that was read, not the
    # provider's Content-Length of 100
    filler = "x" * (9 * 1024 * 1024)
    body = json.dumps({"id": "chatcmpl-big", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {
                           "role": "assistant", "content": filler}}],
                       "usage": {"prompt_tokens": 7, "completion_tokens": 8,
                                 "total_tokens": 15}}).encode()
    pieces = [head(fields=(("Content-Type", "application/json"),
                           ("Transfer-Encoding", "chunked"),
                           ("Content-Length", "100")))]
    pieces += [chunk(body[i:i + 1048576])
               for i in range(0, len(body), 1048576)]
    pieces.append(b"0\r\n\r\n")
    provider.queue(Script(pieces, gap=0))

    status, headers, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 200
    assert headers.get("content-length") != "100", headers
    assert content == body
    assert_ok_row(gw, key, 7, 8)


def test_a_head_cut_by_the_close_gives_502_not_an_empty_answer(
        gw, provider, key):
    # on a route whose answer is not JSON, nothing else would notice
    provider.queue(Script(b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\n"
                          b"Content-Len", close=True))

    status, _, content = gw.request(
        "POST", "/v1/audio/speech",
        {"model": "tts-1", "input": "hi", "voice": "alloy"}, key=key)

    assert status == 502, (status, content)
    openai_upstream_error(content)
    assert_upstream_error_row(gw, key)


def test_a_head_over_256_kib_gives_502(gw, provider, key):
    # every line and the number of fields are within their own limits
    fields = tuple(("x-pad-%d" % i, "p" * 3000) for i in range(90))
    body = completion("chatcmpl-pad", 1, 1)
    provider.queue(Script(json_answer(body, fields) + body))

    status, headers, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 502, (status, len(content))
    assert not any(name.startswith("x-pad") for name in headers)
    assert_upstream_error_row(gw, key)


def test_a_minor_version_above_1_1_is_read_as_1_1(gw, provider, key):
    # RFC 9110, 2.5: a recipient treats HTTP/1.x as the highest 1.x it knows
    body = completion("chatcmpl-12", 2, 3)
    provider.queue(Script(json_answer(body, version="HTTP/1.2") + body))

    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert (status, content) == (200, body)
    assert_ok_row(gw, key, 2, 3)


# ---------------------------------------------------------------------------
# 11. when a request is sent again
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sent", [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
    b"HTTP/1.1 2",
], ids=["interim", "status-line", "half-the-fields", "half-a-status-line"])
def test_a_reset_after_part_of_an_answer_is_not_sent_again(
        gw, provider, key, sent):
    primed = prime_connection(gw, provider, key)
    provider.queue(Script([sent, b""], gap=0.2, reset=True))

    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert_a_502_not_sent_again(gw, provider, key, primed, status, content)


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_post_read_and_dropped_without_an_answer_is_not_sent_again(
        gw, provider, key, reset):
    # from the gateway's side this looks like a pooled connection the
    # provider closed while idle, but the provider may have started the
    # work: the client gets a 502 and decides itself
    primed = prime_connection(gw, provider, key)
    provider.queue(Script(b"", close=True, reset=reset))

    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert_a_502_not_sent_again(gw, provider, key, primed, status, content)


def test_a_get_read_and_dropped_without_an_answer_is_sent_again(
        gw, provider, key):
    # repeating a GET is harmless (RFC 9110, 9.2.2)
    primed = prime_connection(gw, provider, key)
    listing = b'{"object":"file","id":"f-1"}'
    provider.queue(Script(b"", close=True),
                   Script(json_answer(listing) + listing))

    status, _, content = gw.request("GET", "/openai/v1/files/f-1", key=key)

    assert (status, content) == (200, listing)
    received = provider.received()
    assert len(received) == 3
    assert received[1].conn == primed.conn != received[2].conn
    assert received[2].request_line == "GET /v1/files/f-1 HTTP/1.1"


def test_a_post_that_could_not_be_sent_whole_is_sent_again(
        gw, provider, key):
    # the provider dropped the pooled connection after the head, reading
    # none of the body and answering nothing: it cannot have started
    primed = prime_connection(gw, provider, key)
    good = completion("chatcmpl-whole", 5, 5)
    provider.queue(Script(b"", early=True, reset=True),
                   Script(json_answer(good) + good))
    body = chat_body(messages=[{"role": "user", "content": "y" * (16 << 20)}])

    status, _, content = gw.request("POST", CHAT, body, key=key)

    assert (status, content) == (200, good)
    received = provider.received()
    assert len(received) == 3
    assert received[1].conn == primed.conn != received[2].conn
    assert len(received[2].body) == len(json.dumps(body))
    rows = key_rows(gw, key, count=2)
    assert [r["status"] for r in rows] == [200, 200], rows


def test_a_post_with_an_idempotency_key_is_sent_again_on_a_new_connection(
        gw, provider, key):
    # the provider dedupes on the key, so repeating it is safe
    primed = prime_connection(gw, provider, key)
    good = completion("chatcmpl-again", 4, 2)
    provider.queue(Script(b"", close=True), Script(json_answer(good) + good))

    status, _, content = gw.request("POST", CHAT, chat_body(), key=key,
                                    headers={"Idempotency-Key": "op-1"})

    assert (status, content) == (200, good)
    received = provider.received()
    assert len(received) == 3
    assert received[1].conn == primed.conn != received[2].conn
    assert received[2].values("idempotency-key") == ["op-1"]
    rows = key_rows(gw, key, count=2)
    assert [r["status"] for r in rows] == [200, 200], rows
    assert rows[1]["output_tokens"] == 2


def test_an_idle_connection_closed_by_the_provider_is_not_used(
        gw, provider, key):
    primed = prime_connection(gw, provider, key)
    good = completion("chatcmpl-after", 3, 3)
    provider.queue(Script(json_answer(good) + good))
    # the provider drops the pooled connection while it is idle
    with provider.cond:
        socks = list(provider.socks)
    for sock in socks:
        sock.shutdown(socket.SHUT_RDWR)
    time.sleep(0.1)

    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert (status, content) == (200, good)
    received = provider.received()
    assert len(received) == 2 and received[1].conn != primed.conn


def test_an_answer_before_a_large_body_was_read_is_relayed(
        gw, provider, key):
    # a provider (or its front proxy) refuses a body it will not read and
    # closes; the client gets that answer, not a connection error
    refusal = (b'{"error":{"message":"request too large","type":'
               b'"invalid_request_error","param":null,"code":null}}')
    provider.queue(Script(json_answer(refusal, status="413 Payload Too Large",
                                      fields=(("Connection", "close"),))
                          + refusal, early=True))
    body = chat_body(messages=[{"role": "user", "content": "x" * (8 << 20)}])

    status, _, content = gw.request("POST", CHAT, body, key=key)

    assert (status, content) == (413, refusal)
    rows = key_rows(gw, key)
    assert len(rows) == 1 and rows[0]["status"] == 413, rows
    assert rows[0]["error"] == "provider_error", rows
    assert len(provider.received()) == 1


# ---------------------------------------------------------------------------
# 12. answers without a body
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("status_text", ["204 No Content",
                                         "304 Not Modified"])
def test_an_answer_without_a_body_is_relayed_without_a_length(
        gw, provider, key, status_text):
    # RFC 9110, 8.6 and 15.4.5: neither carries a body; a 304 is not a
    # redirect to refuse
    provider.queue(Script(head(status_text, fields=(
        ("x-request-id", "req-nobody"), ("Content-Length", "10")))))

    status, headers, content = gw.request("GET", "/openai/v1/files/f-1",
                                          key=key)

    assert status == int(status_text[:3]), (status, content)
    assert content == b""
    assert "content-length" not in headers, headers
    rows = key_rows(gw, key)
    assert len(rows) == 1 and rows[0]["status"] == status, rows
    assert rows[0]["upstream_request_id"] == "req-nobody"
