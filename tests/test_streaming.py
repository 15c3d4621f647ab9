"""Relaying answers: whole bodies byte for byte, streams event by event.

DESIGN.md: the gateway "forwards the request, streams the answer back
untouched"; for OpenAI streams it may add stream_options.include_usage
upstream, but then removes the usage-only chunk, so "the client sees the
events it would have seen without the gateway (chunks may carry
"usage": null)".

Every comparison with "what the provider sends" is made against a request
sent straight to the fake upstream with the same body; ids that follow the
fake's request counter are normalised.
"""

import http.client
import json
import re
import socket

import pytest

from conftest import module_gateway, new_key, raw_exchange
from fakes import (DEFAULT_TEXT, DEFAULT_USAGE, Reply, anthropic_json,
                   http_stream, parse_sse_event)


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"

PROMPT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def gw(upstream_server, tmp_path_factory):
    with module_gateway(upstream_server, tmp_path_factory,
                        "streaming-gw") as gateway:
        yield gateway


@pytest.fixture
def key(gw, upstream):
    return new_key(gw, "streaming-tests")


def stream_body(path, **extra):
    """A streaming request body for one of the routes."""
    if path == CHAT:
        body = {"model": "gpt-4o-mini", "messages": PROMPT}
    elif path == COMPLETIONS:
        body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hello."}
    elif path == RESPONSES:
        body = {"model": "gpt-4o-mini", "input": "Say hello."}
    else:
        body = {"model": "claude-3-5-haiku-latest", "max_tokens": 64,
                "messages": PROMPT}
    body["stream"] = True
    body.update(extra)
    return body


def direct_stream(upstream, path, body):
    """The events the fake sends for body, asked without the gateway."""
    events = http_stream(upstream.host, upstream.port, "POST", path, body)
    assert events.status == 200
    return events


def normalised(events):
    """Raw events with the fake's per-request ids made equal."""
    return [re.sub(r"fake\d{6}", "fakeN", raw) for raw in events]


def without_null_usage(events):
    """Parsed events, dropping a "usage": null field where present."""
    out = []
    for raw in normalised(events):
        name, data = parse_sse_event(raw)
        if data == "[DONE]":
            out.append((name, data))
            continue
        obj = json.loads(data)
        if isinstance(obj, dict) and "usage" in obj and obj["usage"] is None:
            del obj["usage"]
        out.append((name, obj))
    return out


def read_event(resp):
    """Read one SSE event block from an http.client response."""
    lines = []
    while True:
        line = resp.readline()
        if not line:
            raise EOFError("the stream ended")
        text = line.decode("utf-8").rstrip("\r\n")
        if text == "":
            if lines:
                return "\n".join(lines)
            continue
        lines.append(text)


# ---------------------------------------------------------------------------
# whole answers
# ---------------------------------------------------------------------------

def test_a_json_answer_is_relayed_with_status_type_request_id_and_exact_bytes(
        gw, upstream, key):
    raw = (b'{"id":"chatcmpl-raw",  "object":"chat.completion",'
           b'"created":1700000000,"model":"gpt-4o-mini",'
           b'"choices":[{"index":0,"message":{"role":"assistant",'
           b'"content":"caf\\u00e9 \xe2\x9c\x93"},'
           b'"finish_reason":"stop"}],'
           b'"usage":{"prompt_tokens":5,"completion_tokens":2,'
           b'"total_tokens":7}}\n')
    upstream.queue(Reply(status=200, body=raw, headers={
        "Content-Type": "application/json; charset=utf-8",
        "openai-processing-ms": "42"}))
    status, headers, content = gw.request(
        "POST", CHAT, {"model": "gpt-4o-mini", "messages": PROMPT}, key=key)

    assert status == 200
    assert content == raw
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["x-request-id"] == upstream.last.upstream_request_id
    assert headers["openai-processing-ms"] == "42"
    assert headers["content-length"] == str(len(raw))


def test_an_anthropic_answer_is_relayed_with_its_request_id_header(
        gw, upstream, key):
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 64,
            "messages": PROMPT}
    status, headers, content = gw.request(
        "POST", MESSAGES, body, headers={"x-api-key": key["secret"]})

    assert status == 200
    rec = upstream.last
    expected = anthropic_json(body["model"], DEFAULT_TEXT, DEFAULT_USAGE,
                              "msg_" + rec.upstream_request_id[4:])
    assert content == json.dumps(expected).encode("utf-8")
    assert headers["request-id"] == rec.upstream_request_id
    assert headers["content-type"] == "application/json"


def test_a_non_2xx_answer_with_a_custom_status_is_relayed(gw, upstream, key):
    raw = (b'{"error":{"message":"no such model",'
           b'"type":"invalid_request_error",'
           b'"param":"model","code":"model_not_found"}}')
    upstream.queue(Reply(status=404, body=raw))
    status, headers, content = gw.request(
        "POST", CHAT, {"model": "gpt-4o-mini", "messages": PROMPT}, key=key)

    assert status == 404
    assert content == raw
    assert headers["x-request-id"] == upstream.last.upstream_request_id


# ---------------------------------------------------------------------------
# streams: timing and framing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", [CHAT, RESPONSES, MESSAGES])
def test_stream_events_reach_the_client_while_the_provider_is_still_sending(
        gw, upstream, key, path):
    # after 3 events the provider goes silent for 8 s; the client gives up
    # reading after 4 s, so the 3 events must come before the stream ends
    upstream.queue(Reply(pause=(3, 8)))
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=4)
    try:
        conn.request("POST", path, json.dumps(stream_body(path)),
                     {"Content-Type": "application/json",
                      "x-api-key": key["secret"]})
        resp = conn.getresponse()
        assert resp.status == 200
        received = []
        try:
            for _ in range(3):
                received.append(read_event(resp))
        except socket.timeout:
            pass
    finally:
        conn.close()

    sent = direct_stream(upstream, path, stream_body(path))
    assert len(received) == 3, received
    if path == CHAT:
        # the gateway may add "usage": null to each chunk
        assert without_null_usage(received) == without_null_usage(sent[:3])
    else:
        assert normalised(received) == normalised(sent[:3])


def test_a_stream_to_an_http11_client_is_chunked(gw, upstream, key):
    events = gw.stream(CHAT, stream_body(CHAT), key=key)

    assert events.status == 200
    assert events.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in events.headers
    assert events.headers["content-type"].startswith("text/event-stream")
    assert events.headers["x-request-id"] == upstream.last.upstream_request_id
    assert events.error is None
    assert events.data()[-1] == "[DONE]"


def test_a_connection_stays_usable_after_a_stream(gw, upstream, key):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    headers = {"Content-Type": "application/json",
               "Authorization": "Bearer " + key["secret"]}
    try:
        conn.request("POST", CHAT, json.dumps(stream_body(CHAT)), headers)
        first = conn.getresponse()
        streamed = first.read()
        assert first.status == 200
        assert b"[DONE]" in streamed
        assert conn.sock is not None, "the gateway closed the connection"
        port = conn.sock.getsockname()[1]

        conn.request("POST", CHAT, json.dumps(
            {"model": "gpt-4o-mini", "messages": PROMPT}), headers)
        second = conn.getresponse()
        answer = json.loads(second.read())
        assert conn.sock is not None
        same_port = conn.sock.getsockname()[1] == port
    finally:
        conn.close()

    assert second.status == 200
    assert answer["object"] == "chat.completion"
    assert same_port


def test_a_stream_to_an_http10_client_ends_by_closing_the_connection(
        gw, upstream, key):
    body = json.dumps(stream_body(CHAT)).encode("utf-8")
    head = ("POST %s HTTP/1.0\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n"
            "Authorization: Bearer %s\r\n\r\n"
            % (CHAT, len(body), key["secret"])).encode("latin-1")
    status, headers, content = raw_exchange(gw.port, head + body,
                                            timeout=10)

    assert status == 200
    assert "chunked" not in headers.get("transfer-encoding", "")
    text = content.decode("utf-8")
    assert text.rstrip().endswith("data: [DONE]")
    assert "\r\n0\r\n" not in text


# ---------------------------------------------------------------------------
# streams: the events themselves
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_client_asking_for_usage_gets_the_providers_events_unchanged(
        gw, upstream, key, path):
    body = stream_body(path, stream_options={"include_usage": True})
    events = gw.stream(path, body, key=key)
    got = upstream.last.json

    assert events.status == 200
    assert got["stream_options"] == {"include_usage": True}
    sent = direct_stream(upstream, path, body)
    assert normalised(events) == normalised(sent)
    # the usage chunk is there, with the provider's numbers
    usage_chunks = [c for c in events.json() if c.get("usage")]
    assert len(usage_chunks) == 1
    assert usage_chunks[0]["choices"] == []
    assert usage_chunks[0]["usage"]["prompt_tokens"] == \
        DEFAULT_USAGE["prompt_tokens"]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("options", [None, {"include_usage": False}],
                         ids=["no-options", "include-usage-false"])
def test_usage_added_upstream_is_removed_from_what_the_client_sees(
        gw, upstream, key, path, options):
    body = stream_body(path)
    if options is not None:
        body["stream_options"] = options
    events = gw.stream(path, body, key=key)
    got = upstream.last.json

    assert events.status == 200
    assert events.error is None
    # the provider was asked for usage ...
    assert got["stream_options"]["include_usage"] is True
    assert {k: v for k, v in got.items() if k != "stream_options"} == \
        {k: v for k, v in body.items() if k != "stream_options"}
    # ... but the client sees what the provider sends without it
    sent = direct_stream(upstream, path, body)
    assert all("usage" not in chunk for chunk in sent.json())
    assert without_null_usage(events) == without_null_usage(sent)
    assert events.data()[-1] == "[DONE]"
    for chunk in events.json():
        assert chunk.get("usage") is None
        assert chunk["choices"] != []


def test_usage_removal_also_works_when_each_event_arrives_in_two_pieces(
        gw, upstream, key):
    upstream.queue(Reply(split_events=True))
    body = stream_body(CHAT)
    events = gw.stream(CHAT, body, key=key)

    sent = direct_stream(upstream, CHAT, body)
    assert events.status == 200
    assert without_null_usage(events) == without_null_usage(sent)


@pytest.mark.parametrize("path", [RESPONSES, MESSAGES])
def test_responses_and_anthropic_streams_are_relayed_unchanged(
        gw, upstream, key, path):
    body = stream_body(path)
    events = gw.stream(path, body, headers={"x-api-key": key["secret"]})
    got = upstream.last

    assert events.status == 200
    assert events.error is None
    assert got.json == body
    sent = direct_stream(upstream, path, body)
    assert normalised(events) == normalised(sent)
    id_header = "request-id" if path == MESSAGES else "x-request-id"
    assert events.headers[id_header] == got.upstream_request_id


def test_scripted_events_are_relayed_byte_for_byte(gw, upstream, key):
    events_sent = [
        b": keep-alive comment\n\n",
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":"
        b"{\"id\":\"msg_x\",\"type\":\"message\",\"role\":\"assistant\","
        b"\"content\":[],\"model\":\"claude-3-5-haiku-latest\",\"usage\":"
        b"{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
        b"event: content_block_delta\r\n"
        b"data: {\"type\":\"content_block_delta\",\"index\":0,"
        b"\"delta\":{\"type\":\"text_delta\",\"text\":\"h\\u00e9\"}}"
        b"\r\n\r\n",
        b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":"
        b"{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
        b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ]
    upstream.queue(Reply(events=events_sent))
    events = gw.stream(MESSAGES, stream_body(MESSAGES),
                       headers={"x-api-key": key["secret"]})

    assert events.status == 200
    assert events.body == b"".join(events_sent)
