"""Usage records: one row per request, tokens in one convention, cost.

DESIGN.md "Usage records": token counts come from the provider's own usage
fields; stored input tokens exclude cached and cache-write tokens, so cost =
input x input price + cached x cached price + cache-write x cache-write
price + output x output price; a stream cut short is still recorded, with
estimated tokens where the provider never reported them.

Prices are read from llmgw.BUILTIN_PRICES, so a change of price does not
break these tests but a change of arithmetic does.
"""

import json
import os
import re
import socket
import sys
import time

import pytest

from conftest import key_rows, module_gateway, new_key
from fakes import Reply

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import llmgw  # noqa: E402


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"
MESSAGES = "/v1/messages"

USAGE_COLUMNS = {
    "id", "ts", "request_id", "key_id", "project", "provider", "model",
    "route", "status", "input_tokens", "output_tokens", "cached_input_tokens",
    "cache_write_tokens", "reasoning_tokens", "cost_usd", "ttfb_ms",
    "latency_ms", "streamed", "estimated", "upstream_request_id", "error"}
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")

# OpenAI convention: prompt includes cached, completion includes reasoning
OPENAI_USAGE = {"prompt_tokens": 100, "cached_tokens": 40,
                "completion_tokens": 30, "reasoning_tokens": 10}
# Anthropic convention: input excludes both cache counts
ANTHROPIC_USAGE = {"input_tokens": 50, "cache_read_input_tokens": 200,
                   "cache_creation_input_tokens": 100, "output_tokens": 20}

LONG_TEXT = " ".join("word%d" % i for i in range(40))
PROMPT_TEXT = "Please write a long answer about the sea and the sky."

CONFIG_PRICES = {"my-finetune": {"input": 3.0, "output": 12.0,
                                 "cached_input": 1.5}}


@pytest.fixture(scope="module")
def gw(upstream_server, tmp_path_factory):
    with module_gateway(upstream_server, tmp_path_factory, "accounting-gw",
                        {"prices": CONFIG_PRICES}) as gateway:
        yield gateway


@pytest.fixture
def key(gw, upstream):
    return new_key(gw, "acct-project")


def one_row(gateway, key, timeout=10.0):
    rows = key_rows(gateway, key, 1, timeout)
    assert len(rows) == 1, rows
    return rows[0]


def price_of(model, input=0, cached=0, cache_write=0, output=0,
             prices=None):
    """The cost DESIGN.md's formula gives with the built-in prices."""
    p_in, p_cached, p_out, p_write = (prices or llmgw.BUILTIN_PRICES)[model]
    total = input * p_in + output * p_out
    if cached:
        assert p_cached is not None, "no cached price for %s" % model
        total += cached * p_cached
    if cache_write:
        assert p_write is not None, "no cache-write price for %s" % model
        total += cache_write * p_write
    return total / 1e6


def body_for(path, model, stream=False, **extra):
    if path in (CHAT, MESSAGES):
        body = {"model": model,
                "messages": [{"role": "user", "content": PROMPT_TEXT}]}
        if path == MESSAGES:
            body["max_tokens"] = 256
    elif path == COMPLETIONS:
        body = {"model": model, "prompt": PROMPT_TEXT}
    elif path == RESPONSES:
        body = {"model": model, "input": PROMPT_TEXT}
    else:
        body = {"model": model, "input": PROMPT_TEXT}
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def call(gateway, path, body, key):
    """Send the request (streaming or not, read to the end); return status."""
    headers = {"x-api-key": key["secret"]}
    if body.get("stream"):
        events = gateway.stream(path, body, headers=headers)
        assert events.error is None, events.error
        return events.status
    return gateway.request("POST", path, body, headers=headers)[0]


# ---------------------------------------------------------------------------
# one row, every field
# ---------------------------------------------------------------------------

def test_a_request_leaves_exactly_one_row_with_every_field(gw, upstream,
                                                           key):
    upstream.usage.update(OPENAI_USAGE)
    status, headers, content = gw.request(
        "POST", CHAT, body_for(CHAT, "gpt-4o"), key=key)
    assert status == 200, content

    row = one_row(gw, key)
    assert set(row) == USAGE_COLUMNS
    assert TS.match(row["ts"]), row["ts"]
    assert isinstance(row["request_id"], str) and row["request_id"]
    assert row["key_id"] == key["id"]
    assert row["project"] == "acct-project"
    assert row["provider"] == "openai"
    assert row["model"] == "gpt-4o"
    assert row["route"] == CHAT
    assert row["status"] == 200
    assert row["input_tokens"] == 60
    assert row["cached_input_tokens"] == 40
    assert row["cache_write_tokens"] == 0
    assert row["output_tokens"] == 30
    assert row["reasoning_tokens"] == 10
    assert row["cost_usd"] == pytest.approx(
        price_of("gpt-4o", input=60, cached=40, output=30))
    assert row["ttfb_ms"] is not None and row["latency_ms"] is not None
    assert 0 <= row["ttfb_ms"] <= row["latency_ms"]
    assert row["streamed"] == 0
    assert row["estimated"] == 0
    assert row["upstream_request_id"] == upstream.last.upstream_request_id
    assert row["error"] is None


def test_sequential_requests_leave_one_row_each(gw, upstream, key):
    for _ in range(5):
        status, _, _ = gw.request("POST", CHAT, body_for(CHAT, "gpt-4o-mini"),
                                  key=key)
        assert status == 200
    events = gw.stream(CHAT, body_for(CHAT, "gpt-4o-mini", stream=True),
                       key=key)
    assert events.status == 200

    rows = key_rows(gw, key, 6, timeout=10.0)
    assert len(rows) == 6
    assert len(set(row["request_id"] for row in rows)) == 6
    assert sorted(row["upstream_request_id"] for row in rows) == \
        sorted(rec.upstream_request_id for rec in upstream.requests)
    assert [row["streamed"] for row in rows] == [0, 0, 0, 0, 0, 1]


# ---------------------------------------------------------------------------
# tokens and cost, route by route
# ---------------------------------------------------------------------------

OPENAI_CASES = [
    (CHAT, False, {}),
    (CHAT, True, {}),
    (CHAT, True, {"stream_options": {"include_usage": True}}),
    (COMPLETIONS, False, {}),
    (COMPLETIONS, True, {}),
    (COMPLETIONS, True, {"stream_options": {"include_usage": True}}),
    (RESPONSES, False, {}),
    (RESPONSES, True, {}),
]


@pytest.mark.parametrize("path, stream, extra", OPENAI_CASES, ids=[
    "chat", "chat-stream", "chat-stream-include-usage", "completions",
    "completions-stream", "completions-stream-include-usage", "responses",
    "responses-stream"])
def test_openai_usage_is_stored_without_counting_cached_tokens_twice(
        gw, upstream, key, path, stream, extra):
    upstream.usage.update(OPENAI_USAGE)
    status = call(gw, path, body_for(path, "gpt-4o", stream, **extra), key)
    assert status == 200

    row = one_row(gw, key)
    assert (row["input_tokens"], row["cached_input_tokens"],
            row["cache_write_tokens"], row["output_tokens"],
            row["reasoning_tokens"]) == (60, 40, 0, 30, 10)
    assert row["cost_usd"] == pytest.approx(
        price_of("gpt-4o", input=60, cached=40, output=30))
    assert row["streamed"] == int(stream)
    assert row["estimated"] == 0
    assert row["error"] is None
    assert row["route"] == path
    assert row["upstream_request_id"] == upstream.last.upstream_request_id


def test_embeddings_usage_is_the_prompt_tokens(gw, upstream, key):
    upstream.usage.update(prompt_tokens=123)
    status = call(gw, EMBEDDINGS,
                  body_for(EMBEDDINGS, "text-embedding-3-small"), key)
    assert status == 200

    row = one_row(gw, key)
    assert row["input_tokens"] == 123
    assert row["output_tokens"] == 0
    assert row["cached_input_tokens"] == 0
    assert row["cost_usd"] == pytest.approx(
        price_of("text-embedding-3-small", input=123))
    assert row["provider"] == "openai"
    assert row["route"] == EMBEDDINGS


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_anthropic_usage_keeps_cache_reads_and_writes_apart(gw, upstream,
                                                            key, stream):
    upstream.usage.update(ANTHROPIC_USAGE)
    status = call(gw, MESSAGES, body_for(MESSAGES, "claude-sonnet-4-5",
                                         stream), key)
    assert status == 200

    row = one_row(gw, key)
    assert (row["input_tokens"], row["cached_input_tokens"],
            row["cache_write_tokens"], row["output_tokens"]) == \
        (50, 200, 100, 20)
    assert row["cost_usd"] == pytest.approx(price_of(
        "claude-sonnet-4-5", input=50, cached=200, cache_write=100,
        output=20))
    assert row["provider"] == "anthropic"
    assert row["model"] == "claude-sonnet-4-5"
    assert row["streamed"] == int(stream)
    assert row["estimated"] == 0
    assert row["error"] is None
    assert row["upstream_request_id"] == upstream.last.upstream_request_id


def test_anthropic_stream_usage_takes_the_last_cumulative_value(gw, upstream,
                                                                key):
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [],
        "model": "claude-haiku-4-5", "stop_reason": None,
        "usage": {"input_tokens": 12, "cache_read_input_tokens": 0,
                  "cache_creation_input_tokens": 0, "output_tokens": 1}}}
    events = [
        start,
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "message_delta", "delta": {"stop_reason": None},
         "usage": {"output_tokens": 7}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 15}},
        {"type": "message_stop"},
    ]
    upstream.queue(Reply(events=events))
    status = call(gw, MESSAGES, body_for(MESSAGES, "claude-haiku-4-5", True),
                  key)
    assert status == 200

    row = one_row(gw, key)
    assert row["input_tokens"] == 12
    assert row["output_tokens"] == 15
    assert row["cost_usd"] == pytest.approx(
        price_of("claude-haiku-4-5", input=12, output=15))


@pytest.mark.parametrize("model, family", [
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
])
def test_a_dated_openai_model_is_priced_as_its_family(gw, upstream, key,
                                                      model, family):
    upstream.usage.update(OPENAI_USAGE)
    assert call(gw, CHAT, body_for(CHAT, model), key) == 200

    row = one_row(gw, key)
    assert row["model"] == model
    assert row["cost_usd"] == pytest.approx(
        price_of(family, input=60, cached=40, output=30))


def test_a_dated_anthropic_model_is_priced_as_its_family(gw, upstream, key):
    upstream.usage.update(ANTHROPIC_USAGE)
    body = body_for(MESSAGES, "claude-sonnet-4-5-20250929")
    assert call(gw, MESSAGES, body, key) == 200

    row = one_row(gw, key)
    assert row["model"] == "claude-sonnet-4-5-20250929"
    assert row["cost_usd"] == pytest.approx(price_of(
        "claude-sonnet-4-5", input=50, cached=200, cache_write=100,
        output=20))


def test_an_unknown_model_is_recorded_with_a_null_cost(gw, upstream, key):
    upstream.usage.update(OPENAI_USAGE)
    assert call(gw, CHAT, body_for(CHAT, "totally-unknown-model-x"),
                key) == 200

    row = one_row(gw, key)
    assert row["model"] == "totally-unknown-model-x"
    assert row["cost_usd"] is None
    assert (row["input_tokens"], row["cached_input_tokens"],
            row["output_tokens"]) == (60, 40, 30)


def test_a_price_from_the_config_is_used_for_the_row(gw, upstream, key):
    upstream.usage.update(OPENAI_USAGE)
    assert call(gw, CHAT, body_for(CHAT, "my-finetune"), key) == 200

    row = one_row(gw, key)
    entry = CONFIG_PRICES["my-finetune"]
    assert row["cost_usd"] == pytest.approx(
        (60 * entry["input"] + 40 * entry["cached_input"] +
         30 * entry["output"]) / 1e6)


# ---------------------------------------------------------------------------
# streams cut short and failures
# ---------------------------------------------------------------------------

def test_a_client_leaving_mid_stream_leaves_one_estimated_row(gw, upstream,
                                                              key):
    upstream.queue(Reply(text=LONG_TEXT, event_delay=0.05))
    events = gw.stream(CHAT, body_for(CHAT, "gpt-4o-mini", True), key=key,
                       max_events=4)
    assert events.status == 200
    assert len(events) == 4

    row = one_row(gw, key)
    assert row["error"]
    assert row["status"] == 200
    assert row["streamed"] == 1
    assert row["estimated"] == 1
    assert row["input_tokens"] > 0
    assert row["output_tokens"] > 0
    assert row["cost_usd"] > 0
    # the provider was still sending: the full answer never arrived
    assert upstream.last.wait_done(10)
    assert upstream.last.outcome != "ok"


def send_chat_request(gateway, key):
    """Send a chat request on a raw socket, to close it as a client would."""
    data = json.dumps(body_for(CHAT, "gpt-4o-mini")).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(("POST %s HTTP/1.1\r\nHost: gw\r\n"
                  "Authorization: Bearer %s\r\nContent-Type: application/json"
                  "\r\nContent-Length: %d\r\n\r\n"
                  % (CHAT, key["secret"], len(data))).encode() + data)
    return sock


def test_a_client_that_gave_up_before_the_answer_is_recorded_as_gone(
        gw, upstream, key):
    # a client's own timeout: it closes while the provider still works.
    # The provider did the work, so its tokens count; but the answer was
    # never delivered, and the row must not say it was.
    upstream.queue(Reply(stall=0.8))
    sock = send_chat_request(gw, key)
    try:
        time.sleep(0.2)
    finally:
        sock.close()

    row = one_row(gw, key)
    assert row["error"] == "client_disconnected", row
    assert row["status"] == 200, row
    assert (row["input_tokens"], row["output_tokens"]) == (21, 9), row
    assert row["cost_usd"] > 0
    assert row["estimated"] == 0


def test_a_client_that_closed_only_its_sending_side_still_gets_the_answer(
        gw, upstream, key):
    # some scripts (nc -N, say) shut down writing after the request and
    # then read: the gateway cannot tell that from a client that left, so
    # it records the row as for one, but sends the answer all the same
    upstream.queue(Reply(stall=0.3))
    sock = send_chat_request(gw, key)
    try:
        sock.shutdown(socket.SHUT_WR)
        received = b""
        for _ in range(1000):  # until the gateway closes
            more = sock.recv(65536)
            if not more:
                break
            received += more
    finally:
        sock.close()

    head, _, content = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), received[:200]
    assert json.loads(content.decode("utf-8"))["usage"]["prompt_tokens"] == 21
    row = one_row(gw, key)
    assert row["error"] == "client_disconnected", row
    assert (row["input_tokens"], row["output_tokens"]) == (21, 9), row


def test_a_client_leaving_an_anthropic_stream_keeps_the_reported_input(
        gw, upstream, key):
    upstream.usage.update(ANTHROPIC_USAGE)
    upstream.queue(Reply(text=LONG_TEXT, event_delay=0.05))
    events = gw.stream(MESSAGES, body_for(MESSAGES, "claude-sonnet-4-5",
                                          True),
                       headers={"x-api-key": key["secret"]}, max_events=5)
    assert events.status == 200

    row = one_row(gw, key)
    assert row["error"]
    assert row["estimated"] == 1
    # message_start reported these before the client left
    assert (row["input_tokens"], row["cached_input_tokens"],
            row["cache_write_tokens"]) == (50, 200, 100)
    assert row["output_tokens"] > 0
    assert row["cost_usd"] > price_of("claude-sonnet-4-5", input=50,
                                      cached=200, cache_write=100)


@pytest.mark.parametrize("path, model", [
    (CHAT, "gpt-4o-mini"), (RESPONSES, "gpt-4o-mini"),
    (MESSAGES, "claude-haiku-4-5")])
def test_an_upstream_reset_mid_stream_leaves_one_estimated_row(
        gw, upstream, key, path, model):
    upstream.queue(Reply(text=LONG_TEXT, reset_after=8))
    events = gw.stream(path, body_for(path, model, True),
                       headers={"x-api-key": key["secret"]})
    assert events.status == 200

    row = one_row(gw, key)
    assert row["error"]
    assert row["streamed"] == 1
    assert row["estimated"] == 1
    assert row["output_tokens"] > 0
    assert row["input_tokens"] > 0
    # the client must not mistake the cut stream for a complete one
    assert events.error is not None or "[DONE]" not in events.data()


def test_a_stream_ending_without_its_terminator_or_usage_is_estimated(
        gw, upstream, key):
    upstream.queue(Reply(text=LONG_TEXT, end_after=10))
    events = gw.stream(CHAT, body_for(CHAT, "gpt-4o-mini", True), key=key)
    assert events.status == 200

    row = one_row(gw, key)
    assert row["error"]
    assert row["estimated"] == 1
    assert row["output_tokens"] > 0
    assert row["input_tokens"] > 0


@pytest.mark.parametrize("path, model, expected", [
    (CHAT, "gpt-4o", (60, 40, 0, 30)),
    (MESSAGES, "claude-sonnet-4-5", (50, 200, 100, 20)),
], ids=["chat", "messages"])
def test_a_truncated_stream_that_reported_usage_keeps_the_reported_tokens(
        gw, upstream, key, path, model, expected):
    upstream.usage.update(OPENAI_USAGE if path == CHAT else ANTHROPIC_USAGE)
    upstream.queue(Reply(truncate=True))
    gw.stream(path, body_for(path, model, True),
              headers={"x-api-key": key["secret"]})

    row = one_row(gw, key)
    assert row["error"]
    assert row["estimated"] == 0
    assert (row["input_tokens"], row["cached_input_tokens"],
            row["cache_write_tokens"], row["output_tokens"]) == expected


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_upstream_500_leaves_one_row_with_an_error(gw, upstream, key,
                                                      stream):
    upstream.queue(Reply.error(500))
    body = body_for(CHAT, "gpt-4o-mini", stream)
    status, _, content = gw.request("POST", CHAT, body, key=key)
    assert status == 500

    row = one_row(gw, key)
    assert row["status"] == 500
    assert row["error"]
    assert row["output_tokens"] == 0
    assert row["upstream_request_id"] == upstream.last.upstream_request_id


@pytest.mark.parametrize("end, usage", [
    ("response.incomplete", {"input_tokens": 70, "output_tokens": 12,
                             "total_tokens": 82}),
    ("response.failed", None),
])
def test_a_responses_stream_ending_incomplete_or_failed_is_not_cut_short(
        gw, upstream, key, end, usage):
    # Both are the stream's last event, as response.completed is; the
    # output deltas before them are plain text to count.
    upstream.queue(Reply(events=[
        {"type": "response.created",
         "response": {"id": "resp_x", "status": "in_progress",
                      "usage": None}},
        {"type": "response.output_text.delta", "delta": "Hello"},
        {"type": "response.output_text.delta", "delta": " there"},
        {"type": end,
         "response": {"id": "resp_x", "status": end.split(".")[1],
                      "usage": usage}},
    ]))
    events = gw.stream(RESPONSES, body_for(RESPONSES, "gpt-4o", True),
                       headers={"x-api-key": key["secret"]})
    assert events.status == 200
    assert events.names()[-1] == end

    row = one_row(gw, key)
    assert row["error"] is None  # not "upstream_truncated"
    if usage:
        assert row["estimated"] == 0
        assert (row["input_tokens"], row["output_tokens"]) == (70, 12)
