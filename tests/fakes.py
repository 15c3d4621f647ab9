"""A fake LLM provider for the llmgw tests, plus small HTTP/SSE client helpers.

FakeUpstream is a ThreadingHTTPServer on 127.0.0.1:0 (HTTP/1.1, keep-alive)
that answers like OpenAI and Anthropic do:

    POST /v1/chat/completions   JSON, or SSE when "stream": true
    POST /v1/completions        JSON, or SSE when "stream": true
    POST /v1/responses          JSON, or SSE (response.created ... completed)
    POST /v1/embeddings         JSON
    GET  /v1/models             JSON list
    POST /v1/messages           Anthropic JSON, or SSE when "stream": true
    POST /v1/messages/count_tokens

Routing looks only at the part of the path from "/v1/" on, so a provider
configured with base_url http://127.0.0.1:PORT/groq/v1 reaches the same
handlers while the recorded path ("/groq/v1/chat/completions") tells the
test which provider the gateway chose.

Every request is recorded (FakeUpstream.requests).  A test scripts the next
answers with FakeUpstream.queue(Reply(...), ...); when the queue is empty a
realistic default answer is generated from the request.  Nothing here imports
llmgw, and only the standard library is used.
"""

import http.client
import json
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


# ---------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------

# The text every default answer carries; streamed word by word.
DEFAULT_TEXT = "Hello from the fake upstream."

# Fixed timestamp so answers are byte-for-byte deterministic.
CREATED = 1700000000

# Default usage numbers, in each provider's own convention:
# OpenAI's prompt_tokens INCLUDES cached_tokens and completion_tokens
# INCLUDES reasoning_tokens; Anthropic's input_tokens EXCLUDES both cache
# counts.  Distinct numbers make assertions unambiguous.
DEFAULT_USAGE = {
    # OpenAI-type routes (chat, completions, responses, embeddings)
    "prompt_tokens": 21,
    "cached_tokens": 0,
    "completion_tokens": 9,
    "reasoning_tokens": 0,
    # Anthropic routes (messages, count_tokens)
    "input_tokens": 17,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
    "output_tokens": 11,
}

# The literal SSE terminator of OpenAI chat/completions streams.
DONE = "data: [DONE]\n\n"

MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]

# Garbage that a JSON parser must refuse.
GARBAGE = b'{"id": "chatcmpl-broken", "choices": [\x00\xff<html>oops'


# ---------------------------------------------------------------------------
# scripted replies
# ---------------------------------------------------------------------------

class Reply(object):
    """One scripted answer for the next request the fake receives.

    With no content arguments the answer is the route's realistic default
    (the request's own "model", "stream" and "stream_options" are honoured),
    so a fault flag alone, e.g. Reply(reset_after=2), cuts a normal stream.

    Content (at most one):
      body=bytes|str|dict|list  fixed body; dict/list is JSON-encoded
      events=[...]              SSE stream of these events; an item is a dict
                                (written as "data: <json>", preceded by
                                "event: <type>" when it has a "type" key), a
                                str or bytes written verbatim (e.g. DONE), or
                                a tuple (item, delay_s)
      provider_error=True       provider-style error body for the route
                                (what Reply.error builds)
    Shaping the default answer:
      text=str                  answer text (default DEFAULT_TEXT)
      usage={...}               overrides some DEFAULT_USAGE numbers
      status=int, headers={}    status and extra/overriding headers; a header
                                value of None removes a default header
    Faults and timing:
      stall=S                   silence for S seconds before the status line
      reset_before_status=True  read the request, then TCP RST, no answer
      close_before_status=True  read the request, then close (FIN), no answer
      reset_after=N             send N events, then TCP RST
      end_after=N               send N events, then end the chunked body
                                cleanly (no terminator event)
      truncate=True             drop the stream's last event ([DONE],
                                message_stop or response.completed)
      pause=(N, S)              after N events, silence for S seconds
      event_delay=S             sleep S seconds before every event
      split_events=True         write each event as two chunks
      garbage=True              200 with a body that is not JSON
      content_length=N          send this Content-Length with the (shorter)
                                body, then close the connection
      close=True                answer with "Connection: close" and close
    All sleeps end early when the fake is reset or stopped.
    """

    def __init__(self, status=200, headers=None, body=None, events=None,
                 provider_error=False, text=None, usage=None, stall=0.0,
                 reset_before_status=False, close_before_status=False,
                 reset_after=None, end_after=None, truncate=False,
                 pause=None, event_delay=0.0, split_events=False,
                 garbage=False, content_length=None, close=False,
                 message=None):
        self.status = status
        self.headers = dict(headers or {})
        self.body = body
        self.events = events
        self.provider_error = provider_error
        self.message = message
        self.text = text
        self.usage = dict(usage or {})
        unknown = set(self.usage) - set(DEFAULT_USAGE)
        if unknown:
            raise ValueError("unknown usage keys %s; known: %s"
                             % (sorted(unknown), sorted(DEFAULT_USAGE)))
        self.stall = stall
        self.reset_before_status = reset_before_status
        self.close_before_status = close_before_status
        self.reset_after = reset_after
        self.end_after = end_after
        self.truncate = truncate
        self.pause = pause
        self.event_delay = event_delay
        self.split_events = split_events
        self.garbage = garbage
        self.content_length = content_length
        self.close = close

    @classmethod
    def error(cls, status, message=None, retry_after=None,
                    headers=None):
        """Build a provider error (429, 500, 529 ...) in the route's format.

        retry_after adds a "retry-after" header (seconds, as given).
        """
        headers = dict(headers or {})
        if retry_after is not None:
            headers["retry-after"] = str(retry_after)
        return cls(status=status, headers=headers, provider_error=True,
                   message=message)

    @classmethod
    def redirect(cls, location, status=307):
        """Build a redirect the gateway must pass on, never follow."""
        return cls(status=status, headers={"location": location},
                   body={"redirect": location})

    def __repr__(self):
        return "Reply(status=%r)" % (self.status,)


# ---------------------------------------------------------------------------
# recorded requests
# ---------------------------------------------------------------------------

class RecordedRequest(object):
    """What the fake received on one request, and how the answer ended.

    method, path (raw, with query), headers (dict, lower-case names,
    repeated headers joined with ", "), header_list (raw (name, value)
    pairs), body (bytes), peer_port (the client's source port: equal ports
    mean a reused connection), upstream_request_id (the request id header
    the fake sent back), outcome ("pending", "ok", "reset", "closed",
    "client_gone", "aborted").
    """

    def __init__(self, method, path, header_list, body, peer, request_id):
        self.method = method
        self.path = path
        self.header_list = header_list
        headers = {}
        for name, value in header_list:
            name = name.lower()
            if name in headers:
                headers[name] = headers[name] + ", " + value
            else:
                headers[name] = value
        self.headers = headers
        self.body = body
        self.peer_host = peer[0]
        self.peer_port = peer[1]
        self.upstream_request_id = request_id
        self.outcome = "pending"
        self.received_at = time.time()
        self._done = threading.Event()

    @property
    def json(self):
        """The body parsed as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None

    @property
    def route(self):
        """The path from "/v1/" on, without the query string."""
        return route_of(self.path)

    def wait_done(self, timeout=5.0):
        """Wait (bounded) until the fake finished answering; return bool."""
        return self._done.wait(timeout)

    def __repr__(self):
        return "<RecordedRequest %s %s port=%s outcome=%s>" % (
            self.method, self.path, self.peer_port, self.outcome)


def route_of(path):
    """Return the part of path from "/v1/" on, without any query."""
    path = path.split("?", 1)[0]
    index = path.find("/v1/")
    if index < 0:
        return path
    return path[index:]


# ---------------------------------------------------------------------------
# default answers, one builder per route
# ---------------------------------------------------------------------------

def split_text(text):
    """Split text into streaming pieces: "a b c" -> ["a", " b", " c"]."""
    pieces = re.findall(r"\s*\S+", text)
    return pieces or [text]


def openai_usage(u):
    """The usage object of chat and legacy completions."""
    return {
        "prompt_tokens": u["prompt_tokens"],
        "completion_tokens": u["completion_tokens"],
        "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": u["cached_tokens"],
                                  "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": u["reasoning_tokens"], "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0},
    }


def responses_usage(u):
    """The usage object of the Responses API."""
    return {
        "input_tokens": u["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": u["cached_tokens"]},
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": u["reasoning_tokens"]},
        "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
    }


def anthropic_usage(u, output_tokens=None):
    """The usage object of Anthropic messages."""
    return {
        "input_tokens": u["input_tokens"],
        "cache_creation_input_tokens": u["cache_creation_input_tokens"],
        "cache_read_input_tokens": u["cache_read_input_tokens"],
        "output_tokens": (u["output_tokens"] if output_tokens is None
                          else output_tokens),
    }


def openai_chat_json(model, text, usage, rid="chatcmpl-fake"):
    """A non-streaming chat.completion object."""
    return {
        "id": rid, "object": "chat.completion", "created": CREATED,
        "model": model, "system_fingerprint": "fp_fake",
        "choices": [{"index": 0,
                     "message": {"role": "assistant", "content": text,
                                 "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": openai_usage(usage),
    }


def openai_chat_events(model, text, usage, include_usage,
                       rid="chatcmpl-fake"):
    """The SSE events of a streamed chat completion, ending with DONE.

    With include_usage every chunk carries "usage": null and a last chunk
    with "choices": [] carries the usage, as OpenAI does when the client
    sets stream_options.include_usage; without it no usage appears at all.
    """
    def chunk(delta, finish):
        event = {"id": rid, "object": "chat.completion.chunk",
                 "created": CREATED, "model": model,
                 "system_fingerprint": "fp_fake",
                 "choices": [{"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish}]}
        if include_usage:
            event["usage"] = None
        return event

    events = [chunk({"role": "assistant", "content": "", "refusal": None},
                    None)]
    for piece in split_text(text):
        events.append(chunk({"content": piece}, None))
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append({"id": rid, "object": "chat.completion.chunk",
                       "created": CREATED, "model": model,
                       "system_fingerprint": "fp_fake", "choices": [],
                       "usage": openai_usage(usage)})
    events.append(DONE)
    return events


def openai_completion_json(model, text, usage, rid="cmpl-fake"):
    """A non-streaming legacy text_completion object."""
    return {
        "id": rid, "object": "text_completion", "created": CREATED,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": openai_usage(usage),
    }


def openai_completion_events(model, text, usage, include_usage,
                             rid="cmpl-fake"):
    """The SSE events of a streamed legacy completion, ending with DONE."""
    def chunk(piece, finish):
        event = {"id": rid, "object": "text_completion", "created": CREATED,
                 "model": model,
                 "choices": [{"text": piece, "index": 0, "logprobs": None,
                              "finish_reason": finish}]}
        if include_usage:
            event["usage"] = None
        return event

    events = [chunk(piece, None) for piece in split_text(text)]
    events.append(chunk("", "stop"))
    if include_usage:
        events.append({"id": rid, "object": "text_completion",
                       "created": CREATED, "model": model, "choices": [],
                       "usage": openai_usage(usage)})
    events.append(DONE)
    return events


def responses_json(model, text, usage, rid="resp_fake", status="completed"):
    """A Responses API response object (usage None while in progress)."""
    done = status == "completed"
    return {
        "id": rid, "object": "response", "created_at": CREATED,
        "status": status, "model": model, "error": None,
        "output": [] if not done else [{
            "type": "message", "id": "msg_" + rid, "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text,
                         "annotations": []}]}],
        "usage": responses_usage(usage) if done else None,
    }


def responses_events(model, text, usage, rid="resp_fake"):
    """The SSE events of a streamed Responses API call.

    Every event has an "event:" line and a "type"; the usage arrives only
    in response.completed.  Like the real API there is no [DONE].
    """
    item_id = "msg_" + rid
    events = [
        {"type": "response.created",
         "response": responses_json(model, text, usage, rid, "in_progress")},
        {"type": "response.in_progress",
         "response": responses_json(model, text, usage, rid, "in_progress")},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"type": "message", "id": item_id, "status": "in_progress",
                  "role": "assistant", "content": []}},
        {"type": "response.content_part.added", "item_id": item_id,
         "output_index": 0, "content_index": 0,
         "part": {"type": "output_text", "text": "", "annotations": []}},
    ]
    for piece in split_text(text):
        events.append({"type": "response.output_text.delta",
                       "item_id": item_id, "output_index": 0,
                       "content_index": 0, "delta": piece})
    events += [
        {"type": "response.output_text.done", "item_id": item_id,
         "output_index": 0, "content_index": 0, "text": text},
        {"type": "response.content_part.done", "item_id": item_id,
         "output_index": 0, "content_index": 0,
         "part": {"type": "output_text", "text": text, "annotations": []}},
        {"type": "response.output_item.done", "output_index": 0,
         "item": {"type": "message", "id": item_id, "status": "completed",
                  "role": "assistant",
                  "content": [{"type": "output_text", "text": text,
                               "annotations": []}]}},
        {"type": "response.completed",
         "response": responses_json(model, text, usage, rid, "completed")},
    ]
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return events


def embeddings_json(model, inputs, usage):
    """An embeddings list with one tiny fixed vector per input."""
    if not isinstance(inputs, list):
        inputs = [inputs]
    return {
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": i,
                  "embedding": [0.125, -0.25, 0.5]}
                 for i in range(len(inputs))],
        "usage": {"prompt_tokens": usage["prompt_tokens"],
                  "total_tokens": usage["prompt_tokens"]},
    }


def models_json():
    """The GET /v1/models list."""
    return {"object": "list",
            "data": [{"id": m, "object": "model", "created": CREATED,
                      "owned_by": "openai"} for m in MODELS]}


def anthropic_json(model, text, usage, rid="msg_fake"):
    """A non-streaming Anthropic message."""
    return {
        "id": rid, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": anthropic_usage(usage),
    }


def anthropic_events(model, text, usage, rid="msg_fake"):
    """The SSE events of a streamed Anthropic message.

    message_start carries the input and cache counts with output_tokens 1;
    message_delta carries the cumulative final output_tokens (last value
    wins); a ping follows content_block_start, as the real API sends.
    """
    start = {"id": rid, "type": "message", "role": "assistant",
             "model": model, "content": [], "stop_reason": None,
             "stop_sequence": None,
             "usage": anthropic_usage(usage, output_tokens=1)}
    events = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    for piece in split_text(text):
        events.append({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "text_delta", "text": piece}})
    events += [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta",
         "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": usage["output_tokens"]}},
        {"type": "message_stop"},
    ]
    return events


def is_anthropic_route(route):
    """True for the routes that answer in Anthropic's format."""
    return route.startswith("/v1/messages")


def error_body(route, status, message=None):
    """A provider error body in the format of the route."""
    if is_anthropic_route(route):
        kinds = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "not_found_error",
                 413: "request_too_large", 429: "rate_limit_error",
                 529: "overloaded_error"}
        kind = kinds.get(status, "api_error")
        return {"type": "error",
                "error": {"type": kind,
                          "message": message or "fake upstream %d" % status}}
    kinds = {400: ("invalid_request_error", "invalid_request"),
             401: ("invalid_request_error", "invalid_api_key"),
             404: ("invalid_request_error", "unknown_url"),
             429: ("requests", "rate_limit_exceeded")}
    kind, code = kinds.get(status, ("server_error", "server_error"))
    return {"error": {"message": message or "fake upstream %d" % status,
                      "type": kind, "param": None, "code": code}}


# ---------------------------------------------------------------------------
# SSE encoding
# ---------------------------------------------------------------------------

def encode_event(item):
    """Encode one SSE event item (dict, str or bytes) to bytes."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    data = json.dumps(item, separators=(",", ":"))
    if isinstance(item, dict) and isinstance(item.get("type"), str):
        return ("event: %s\ndata: %s\n\n" % (item["type"], data)).encode()
    return ("data: %s\n\n" % data).encode("utf-8")


# ---------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------

class _Aborted(Exception):
    """A sleep was cut short by reset() or stop(): drop the connection."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, records it, and plays the scripted reply."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeUpstream/1.0"
    sys_version = ""
    # idle keep-alive connections are closed after this many seconds
    timeout = 30

    def log_message(self, format, *args):
        pass

    def setup(self):
        BaseHTTPRequestHandler.setup(self)
        # like real providers, send each event at once (no Nagle delay)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._track(self.connection, True)

    def finish(self):
        try:
            BaseHTTPRequestHandler.finish(self)
        except OSError:
            pass
        self.server.fake._track(self.connection, False)

    def do_GET(self):
        self._serve()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # --- request side ----------------------------------------------------

    def _read_body(self):
        """Read a Content-Length or chunked body; None on bad framing."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    return None
                if size == 0:
                    # trailers end with an empty line
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n",
                                                            b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            return self.rfile.read(int(length))
        except ValueError:
            return None

    def _serve(self):
        fake = self.server.fake
        generation = fake._generation
        try:
            body = self._read_body()
        except (OSError, socket.timeout):
            self.close_connection = True
            return
        if body is None:
            self.close_connection = True
            return
        rec = fake._record(self, body)
        reply = fake._next_reply(rec)
        try:
            rec.outcome = _Responder(self, fake, rec, reply,
                                     generation).run()
        except _Aborted:
            rec.outcome = "aborted"
            self.close_connection = True
        except (OSError, socket.timeout):
            # BrokenPipe / ConnectionReset: the gateway went away
            rec.outcome = "client_gone"
            self.close_connection = True
        finally:
            rec._done.set()


class _Responder(object):
    """Plays one Reply on one handler; returns the outcome string."""

    def __init__(self, handler, fake, rec, reply, generation):
        self.h = handler
        self.fake = fake
        self.rec = rec
        self.reply = reply
        self.generation = generation

    def sleep(self, seconds):
        """Sleep, but raise _Aborted as soon as the fake is reset/stopped."""
        if seconds and self.generation.wait(seconds):
            raise _Aborted()

    def reset_connection(self):
        """Close the socket with a TCP RST (SO_LINGER 0)."""
        sock = self.h.connection
        self.h.close_connection = True
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            struct.pack("ii", 1, 0))
        except OSError:
            pass
        # the rfile keeps a reference; the fd closes once both are closed
        try:
            self.h.rfile.close()
        except OSError:
            pass
        sock.close()

    def run(self):
        reply = self.reply
        self.sleep(reply.stall)
        if reply.reset_before_status:
            self.reset_connection()
            return "reset"
        if reply.close_before_status:
            self.h.close_connection = True
            self.h.connection.shutdown(socket.SHUT_RDWR)
            return "closed"

        kind, payload = self.content()
        if kind == "sse":
            return self.send_stream(payload)
        return self.send_body(payload)

    # --- what to send ----------------------------------------------------

    def content(self):
        """Return ("sse", events) or ("body", bytes) for this reply."""
        reply, rec = self.reply, self.rec
        route = rec.route
        if reply.events is not None:
            return "sse", list(reply.events)
        if reply.body is not None:
            body = reply.body
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode("utf-8")
            elif isinstance(body, str):
                body = body.encode("utf-8")
            return "body", body
        if reply.provider_error:
            body = error_body(route, reply.status, reply.message)
            return "body", json.dumps(body).encode("utf-8")
        if reply.garbage:
            return "body", GARBAGE
        return self.default_content(route)

    def default_content(self, route):
        """Build the realistic answer of the route from the request."""
        req = self.rec.json
        if not isinstance(req, dict):
            req = {}
        usage = dict(self.fake.usage)
        usage.update(self.reply.usage)
        text = self.reply.text if self.reply.text is not None \
            else DEFAULT_TEXT
        stream = req.get("stream") is True
        options = req.get("stream_options") or {}
        include_usage = isinstance(options, dict) and \
            options.get("include_usage") is True
        method = self.rec.method
        # ids follow the request id: req_fake000003 -> chatcmpl-fake000003
        rid_suffix = self.rec.upstream_request_id[len("req_"):]

        def js(obj):
            return "body", json.dumps(obj).encode("utf-8")

        if method == "GET" and route == "/v1/models":
            return js(models_json())
        if method == "GET" and route.startswith("/v1/models/"):
            model = route[len("/v1/models/"):]
            return js({"id": model, "object": "model", "created": CREATED,
                       "owned_by": "openai"})
        if method != "POST":
            return self.not_found(route)
        if self.rec.json is None and route in (
                "/v1/chat/completions", "/v1/completions", "/v1/responses",
                "/v1/embeddings", "/v1/messages",
                "/v1/messages/count_tokens"):
            self.reply.status = 400
            return js(error_body(route, 400, "body is not JSON"))

        if route == "/v1/chat/completions":
            model = req.get("model", "gpt-4o-mini")
            rid = "chatcmpl-" + rid_suffix
            if stream:
                return "sse", openai_chat_events(model, text, usage,
                                                 include_usage, rid)
            return js(openai_chat_json(model, text, usage, rid))
        if route == "/v1/completions":
            model = req.get("model", "gpt-3.5-turbo-instruct")
            rid = "cmpl-" + rid_suffix
            if stream:
                return "sse", openai_completion_events(
                    model, text, usage, include_usage, rid)
            return js(openai_completion_json(model, text, usage, rid))
        if route == "/v1/responses":
            model = req.get("model", "gpt-4o-mini")
            rid = "resp_" + rid_suffix
            if stream:
                return "sse", responses_events(model, text, usage, rid)
            return js(responses_json(model, text, usage, rid))
        if route == "/v1/embeddings":
            return js(embeddings_json(req.get("model", "text-embedding-3-"
                                              "small"),
                                      req.get("input", ""), usage))
        if route == "/v1/messages":
            model = req.get("model", "claude-3-5-haiku-latest")
            rid = "msg_" + rid_suffix
            if stream:
                return "sse", anthropic_events(model, text, usage, rid)
            return js(anthropic_json(model, text, usage, rid))
        if route == "/v1/messages/count_tokens":
            return js({"input_tokens": usage["input_tokens"]})
        return self.not_found(route)

    def not_found(self, route):
        self.reply.status = 404
        body = error_body(route, 404, "fake upstream has no route %s %s"
                          % (self.rec.method, route))
        return "body", json.dumps(body).encode("utf-8")

    # --- how to send it --------------------------------------------------

    def send_headers(self, defaults):
        """Send status line and headers: defaults overridden by the reply.

        Header names in the reply are matched case-insensitively; a value
        of None removes the header.
        """
        headers = [(name, value) for name, value in defaults]
        overrides = dict((k.lower(), (k, v))
                         for k, v in self.reply.headers.items())
        merged = []
        for name, value in headers:
            if name.lower() in overrides:
                continue
            merged.append((name, value))
        for name, value in overrides.values():
            if value is not None:
                merged.append((name, str(value)))
        if self.reply.close:
            merged.append(("Connection", "close"))
        self.h.send_response(self.reply.status)
        for name, value in merged:
            self.h.send_header(name, value)
        self.h.end_headers()

    def id_header(self):
        """The provider's request-id header for this route."""
        name = "request-id" if is_anthropic_route(self.rec.route) \
            else "x-request-id"
        return (name, self.rec.upstream_request_id)

    def send_body(self, body):
        reply = self.reply
        length = reply.content_length
        defaults = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body) if length is None else length)),
            self.id_header(),
        ]
        self.send_headers(defaults)
        self.h.wfile.write(body)
        if length is not None:
            # the client waits for bytes that never come: close
            self.h.close_connection = True
        return "ok"

    def send_stream(self, events):
        """Send events as a chunked SSE body, one write per event."""
        reply = self.reply
        if reply.truncate and events:
            events = events[:-1]
        defaults = [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
            ("Transfer-Encoding", "chunked"),
            self.id_header(),
        ]
        self.send_headers(defaults)
        write = self.h.wfile.write
        for index, item in enumerate(events):
            if reply.pause is not None and index == reply.pause[0]:
                self.sleep(reply.pause[1])
            delay = reply.event_delay
            if isinstance(item, tuple):
                item, delay = item
            self.sleep(delay)
            if reply.reset_after is not None and index >= reply.reset_after:
                self.reset_connection()
                return "reset"
            if reply.end_after is not None and index >= reply.end_after:
                break
            data = encode_event(item)
            if reply.split_events and len(data) > 1:
                half = len(data) // 2
                write(b"%x\r\n%s\r\n" % (half, data[:half]))
                write(b"%x\r\n%s\r\n" % (len(data) - half, data[half:]))
            else:
                write(b"%x\r\n%s\r\n" % (len(data), data))
        if reply.reset_after is not None and reply.reset_after >= \
                len(events) and (reply.end_after is None):
            # every event went out, but the body never ends properly
            self.reset_connection()
            return "reset"
        write(b"0\r\n\r\n")
        return "ok"


class FakeUpstream(object):
    """The fake provider; see the module docstring.

    Attributes: host, port, url ("http://127.0.0.1:PORT"), base_url
    (url + "/v1"), usage (dict, see DEFAULT_USAGE; change it per test).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._queue = []
        self._default = None
        self._requests = []
        self._connections = set()
        self._counter = 0
        self._generation = threading.Event()
        self.usage = dict(DEFAULT_USAGE)
        self._server = None
        self._thread = None

    # --- lifecycle -------------------------------------------------------

    def start(self):
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self.host, self.port = self._server.server_address[:2]
        self.url = "http://%s:%d" % (self.host, self.port)
        self.base_url = self.url + "/v1"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name="fake-upstream", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving, wake sleeping handlers, close every connection."""
        if self._server is None:
            return
        self._generation.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)
        self._server = None

    def reset(self):
        """Forget queued replies, recorded requests and usage changes.

        Handlers still sleeping (stall, pause, delays) from the previous
        test wake up and drop their connections.
        """
        with self._lock:
            old = self._generation
            self._generation = threading.Event()
            self._queue = []
            self._default = None
            self._requests = []
            self._counter = 0
            self.usage = dict(DEFAULT_USAGE)
        old.set()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- scripting -------------------------------------------------------

    def queue(self, *replies):
        """Queue replies (Reply, or a callable rec -> Reply), in order.

        Each request takes the next one; an empty queue means the default
        reply (set_default) or the route's realistic default answer.
        """
        with self._lock:
            self._queue.extend(replies)

    def set_default(self, reply):
        """Use reply (or None for the built-in answers) when none is queued."""
        with self._lock:
            self._default = reply

    def pending(self):
        """How many queued replies have not been used yet."""
        with self._lock:
            return len(self._queue)

    # --- recorded requests -----------------------------------------------

    @property
    def requests(self):
        """A copy of the recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def last(self):
        """The most recent recorded request (AssertionError if none)."""
        with self._lock:
            assert self._requests, "the fake upstream received no request"
            return self._requests[-1]

    def wait_for_requests(self, count, timeout=5.0):
        """Wait (bounded) until count requests arrived; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.requests
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            time.sleep(0.01)

    # --- used by the handler ---------------------------------------------

    def _track(self, sock, add):
        with self._lock:
            if add:
                self._connections.add(sock)
            else:
                self._connections.discard(sock)

    def _record(self, handler, body):
        with self._lock:
            self._counter += 1
            request_id = "req_fake%06d" % self._counter
            rec = RecordedRequest(handler.command, handler.path,
                                  list(handler.headers.items()), body,
                                  handler.client_address, request_id)
            self._requests.append(rec)
        return rec

    def _next_reply(self, rec):
        with self._lock:
            if self._queue:
                reply = self._queue.pop(0)
            else:
                reply = self._default
        if reply is not None and not isinstance(reply, Reply):
            reply = reply(rec)
        if reply is None:
            return Reply()
        # copy, so a default reply can be played on many requests
        clone = Reply()
        clone.__dict__.update(reply.__dict__)
        clone.headers = dict(reply.headers)
        return clone


# ---------------------------------------------------------------------------
# client helpers (http.client only), shared by the fixtures and tests
# ---------------------------------------------------------------------------

def encode_body(body, headers):
    """Turn body into bytes; dict/list become JSON with a content type."""
    if body is None:
        return None
    if isinstance(body, (dict, list)):
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
        return json.dumps(body).encode("utf-8")
    if isinstance(body, str):
        return body.encode("utf-8")
    return body


def header_dict(message):
    """Response headers as a dict with lower-case names (repeats joined)."""
    result = {}
    for name, value in message.items():
        name = name.lower()
        result[name] = result[name] + ", " + value if name in result \
            else value
    return result


def http_request(host, port, method, path, body=None, headers=None,
                 timeout=30.0, connection=None):
    """Send one request; return (status, headers_dict, body_bytes).

    A new connection is used unless an http.client connection is given.
    """
    headers = dict(headers or {})
    data = encode_body(body, headers)
    conn = connection or http.client.HTTPConnection(host, port,
                                                    timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        content = resp.read()
        return resp.status, header_dict(resp.msg), content
    finally:
        if connection is None:
            conn.close()


class SSEList(list):
    """Raw SSE events (str blocks without the blank line), plus:

    status, headers (dict, lower-case), body (raw bytes received), and
    error (None, or the exception that ended the read early, e.g.
    http.client.IncompleteRead when the stream was cut).
    """

    status = None
    headers = None
    body = b""
    error = None

    def parsed(self):
        """[(event_name or None, data_str)] for every event."""
        return [parse_sse_event(raw) for raw in self]

    def names(self):
        """The "event:" names (None where absent)."""
        return [name for name, _ in self.parsed()]

    def data(self):
        """The data strings, including "[DONE]"."""
        return [data for _, data in self.parsed()]

    def json(self):
        """The data of every event parsed as JSON, skipping "[DONE]"."""
        return [json.loads(data) for data in self.data()
                if data and data != "[DONE]"]

    def text(self):
        """The decoded body as received."""
        return self.body.decode("utf-8", "replace")


def parse_sse_event(raw):
    """Split one raw SSE event block into (event_name, data)."""
    name = None
    data = []
    for line in raw.splitlines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    return name, "\n".join(data)


def split_sse(text):
    """Split a complete SSE text into raw event blocks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [block for block in text.split("\n\n") if block.strip()]


def http_stream(host, port, method, path, body=None, headers=None,
                timeout=30.0, max_events=None):
    """Send one request and read an SSE answer event by event.

    Returns an SSEList.  With max_events, the connection is closed after
    that many events (a client that goes away mid-stream).  A stream cut by
    the server ends the list early and sets .error.
    """
    headers = dict(headers or {})
    data = encode_body(body, headers)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    result = SSEList()
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        result.status = resp.status
        result.headers = header_dict(resp.msg)
        content_type = result.headers.get("content-type", "")
        if "text/event-stream" not in content_type:
            result.body = resp.read()
            return result
        received = []
        block = []
        while True:
            if max_events is not None and len(result) >= max_events:
                break
            try:
                line = resp.readline()
            except (http.client.HTTPException, OSError) as exc:
                result.error = exc
                break
            if not line:
                break
            received.append(line)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text == "":
                if block:
                    result.append("\n".join(block))
                    block = []
            else:
                block.append(text)
        if block and max_events is None:
            # an unterminated last event: keep it so tests can see it
            result.append("\n".join(block))
        result.body = b"".join(received)
        return result
    finally:
        if max_events is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        conn.close()
