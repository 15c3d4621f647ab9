"""The fake upstream itself behaves like the providers it imitates.

These tests talk to the fake directly with http.client; they need no
llmgw.py, and they guard the fixtures every other test relies on.
"""

import http.client
import json
import socket

import pytest

from conftest import clean_env, merge_config
from fakes import DEFAULT_TEXT, Reply, http_request, http_stream


def post(upstream, path, body, headers=None):
    return http_request(upstream.host, upstream.port, "POST", path, body,
                        headers)


def stream(upstream, path, body, **kwargs):
    return http_stream(upstream.host, upstream.port, "POST", path, body,
                       **kwargs)


# --- OpenAI ----------------------------------------------------------------

def test_chat_json_carries_usage_with_details_and_request_id(upstream):
    upstream.usage.update(prompt_tokens=100, cached_tokens=40,
                          completion_tokens=30, reasoning_tokens=12)
    conn = http.client.HTTPConnection(upstream.host, upstream.port,
                                      timeout=5)
    try:
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps({"model": "gpt-4o-mini",
                                      "messages": []}),
                     headers={"Content-Type": "application/json",
                              "Authorization": "Bearer sk-real"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()

    assert resp.status == 200
    assert resp.getheader("x-request-id") == "req_fake000001"
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    assert body["choices"][0]["message"]["content"] == DEFAULT_TEXT
    assert body["usage"]["prompt_tokens"] == 100
    assert body["usage"]["completion_tokens"] == 30
    assert body["usage"]["total_tokens"] == 130
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 40
    assert body["usage"]["completion_tokens_details"][
        "reasoning_tokens"] == 12


def test_chat_stream_without_include_usage_has_no_usage(upstream):
    events = stream(upstream, "/v1/chat/completions",
                    {"model": "gpt-4o", "stream": True})

    assert events.status == 200
    assert events.headers["transfer-encoding"] == "chunked"
    assert events.headers["content-type"].startswith("text/event-stream")
    assert events.data()[-1] == "[DONE]"
    chunks = events.json()
    assert all("usage" not in chunk for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "")
                   for c in chunks)
    assert text == DEFAULT_TEXT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_with_include_usage_ends_with_usage_chunk(upstream):
    body = {"model": "gpt-4o", "stream": True,
            "stream_options": {"include_usage": True}}
    events = stream(upstream, "/v1/chat/completions", body)

    chunks = events.json()
    assert events.data()[-1] == "[DONE]"
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 21
    assert chunks[-1]["usage"]["completion_tokens"] == 9
    assert "prompt_tokens_details" in chunks[-1]["usage"]


def test_reply_usage_overrides_apply_to_one_reply(upstream):
    upstream.queue(Reply(usage={"completion_tokens": 500}))
    body = {"model": "gpt-4o", "stream": True,
            "stream_options": {"include_usage": True}}
    first = stream(upstream, "/v1/chat/completions", body).json()
    second = stream(upstream, "/v1/chat/completions", body).json()

    assert first[-1]["usage"]["completion_tokens"] == 500
    assert second[-1]["usage"]["completion_tokens"] == 9


def test_legacy_completion_embeddings_and_models(upstream):
    status, _, body = post(upstream, "/v1/completions",
                           {"model": "gpt-3.5-turbo-instruct",
                            "prompt": "hi"})
    assert status == 200
    assert json.loads(body)["choices"][0]["text"] == DEFAULT_TEXT

    events = stream(upstream, "/v1/completions",
                    {"model": "x", "prompt": "hi", "stream": True,
                     "stream_options": {"include_usage": True}})
    assert events.json()[-1]["usage"]["total_tokens"] == 30

    status, _, body = post(upstream, "/v1/embeddings",
                           {"model": "text-embedding-3-small",
                            "input": ["a", "b"]})
    data = json.loads(body)
    assert status == 200
    assert len(data["data"]) == 2
    assert data["usage"] == {"prompt_tokens": 21, "total_tokens": 21}

    status, _, body = http_request(upstream.host, upstream.port, "GET",
                                   "/v1/models")
    assert status == 200
    assert json.loads(body)["object"] == "list"


def test_responses_stream_reports_usage_in_response_completed(upstream):
    upstream.usage.update(prompt_tokens=50, cached_tokens=10,
                          completion_tokens=20, reasoning_tokens=5)
    events = stream(upstream, "/v1/responses",
                    {"model": "gpt-4o", "input": "hi", "stream": True})

    names = events.names()
    assert names[0] == "response.created"
    assert names[-1] == "response.completed"
    assert "response.output_text.delta" in names
    usage = events.json()[-1]["response"]["usage"]
    assert usage["input_tokens"] == 50
    assert usage["input_tokens_details"]["cached_tokens"] == 10
    assert usage["output_tokens_details"]["reasoning_tokens"] == 5

    status, _, body = post(upstream, "/v1/responses",
                           {"model": "gpt-4o", "input": "hi"})
    assert json.loads(body)["usage"]["output_tokens"] == 20


# --- Anthropic -------------------------------------------------------------

def test_anthropic_stream_has_the_full_event_sequence(upstream):
    upstream.usage.update(input_tokens=7, cache_creation_input_tokens=3,
                          cache_read_input_tokens=4, output_tokens=25)
    events = stream(upstream, "/v1/messages",
                    {"model": "claude-3-5-haiku-latest", "stream": True,
                     "max_tokens": 10, "messages": []})

    names = events.names()
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta",
                          "message_stop"]
    data = events.json()
    start = data[0]["message"]["usage"]
    assert start == {"input_tokens": 7, "cache_creation_input_tokens": 3,
                     "cache_read_input_tokens": 4, "output_tokens": 1}
    assert data[-2]["usage"]["output_tokens"] == 25
    text = "".join(d["delta"]["text"] for d in data
                   if d["type"] == "content_block_delta")
    assert text == DEFAULT_TEXT
    assert events.headers["request-id"] == "req_fake000001"


def test_anthropic_json_and_count_tokens(upstream):
    status, headers, body = post(upstream, "/v1/messages",
                                 {"model": "claude-x", "max_tokens": 5,
                                  "messages": []})
    message = json.loads(body)
    assert status == 200
    assert message["type"] == "message"
    assert message["usage"]["input_tokens"] == 17
    assert "request-id" in headers

    status, _, body = post(upstream, "/v1/messages/count_tokens",
                           {"model": "claude-x", "messages": []})
    assert json.loads(body) == {"input_tokens": 17}


def test_errors_use_the_route_format(upstream):
    upstream.queue(Reply.error(429, retry_after=3), Reply.error(529))
    status, headers, body = post(upstream, "/v1/chat/completions",
                                 {"model": "gpt-4o"})
    assert status == 429
    assert headers["retry-after"] == "3"
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"

    status, _, body = post(upstream, "/v1/messages", {"model": "claude-x"})
    assert status == 529
    assert json.loads(body)["error"]["type"] == "overloaded_error"


# --- faults ----------------------------------------------------------------

def test_reset_before_status_gives_the_client_no_answer(upstream):
    upstream.queue(Reply(reset_before_status=True))
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        post(upstream, "/v1/chat/completions", {"model": "gpt-4o"})
    assert upstream.last.wait_done()
    assert upstream.last.outcome == "reset"


def test_reset_after_n_events_cuts_the_stream(upstream):
    upstream.queue(Reply(reset_after=2))
    events = stream(upstream, "/v1/chat/completions",
                    {"model": "gpt-4o", "stream": True})
    assert len(events) == 2
    assert events.error is not None


def test_truncate_and_end_after_end_the_body_cleanly(upstream):
    upstream.queue(Reply(truncate=True), Reply(end_after=1))
    body = {"model": "claude-x", "stream": True}
    truncated = stream(upstream, "/v1/messages", body)
    short = stream(upstream, "/v1/messages", body)
    assert truncated.error is None
    assert truncated.names()[-1] == "message_delta"
    assert short.names() == ["message_start"]


def test_scripted_events_with_split_chunks_arrive_intact(upstream):
    upstream.queue(Reply(events=[{"type": "ping"}, ("data: 1\n\n", 0.01),
                                 "data: [DONE]\n\n"], split_events=True))
    events = stream(upstream, "/v1/anything", {})
    assert events.parsed() == [("ping", '{"type":"ping"}'), (None, "1"),
                               (None, "[DONE]")]


def test_stall_is_silence_that_reset_cuts_short(upstream):
    upstream.queue(Reply(stall=30))
    conn = http.client.HTTPConnection(upstream.host, upstream.port,
                                      timeout=0.3)
    try:
        conn.request("POST", "/v1/chat/completions", body=b"{}")
        with pytest.raises(socket.timeout):
            conn.getresponse()
    finally:
        conn.close()
    stalled = upstream.last
    upstream.reset()
    assert stalled.wait_done(5)
    assert stalled.outcome in ("aborted", "client_gone")


def test_garbage_redirect_and_short_body(upstream):
    upstream.queue(Reply(garbage=True), Reply.redirect("http://x.invalid/"),
                   Reply(body=b"{}", content_length=10 ** 9))
    status, _, body = post(upstream, "/v1/chat/completions", {})
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(body)

    status, headers, _ = post(upstream, "/v1/chat/completions", {})
    assert status == 307
    assert headers["location"] == "http://x.invalid/"

    with pytest.raises(http.client.IncompleteRead):
        post(upstream, "/v1/chat/completions", {})


def test_status_headers_and_body_are_scriptable(upstream):
    upstream.queue(Reply(status=500, body="oops",
                         headers={"Content-Type": "text/plain",
                                  "X-Extra": "1"}))
    status, headers, body = post(upstream, "/v1/chat/completions", {})
    assert (status, body) == (500, b"oops")
    assert headers["content-type"] == "text/plain"
    assert headers["x-extra"] == "1"


def test_queue_is_fifo_then_default_then_builtin(upstream):
    upstream.queue(Reply.error(500), lambda rec: Reply(body={
        "echo": rec.json["n"]}))
    upstream.set_default(Reply.error(503))
    results = [post(upstream, "/v1/chat/completions", {"n": n})
               for n in range(3)]
    assert [r[0] for r in results] == [500, 200, 503]
    assert json.loads(results[1][2]) == {"echo": 1}
    upstream.set_default(None)
    assert post(upstream, "/v1/chat/completions", {})[0] == 200
    assert upstream.pending() == 0


# --- recording -------------------------------------------------------------

def test_requests_are_recorded_with_headers_body_and_peer_port(upstream):
    conn = http.client.HTTPConnection(upstream.host, upstream.port,
                                      timeout=5)
    try:
        for n in range(2):
            http_request(None, None, "POST", "/groq/v1/chat/completions",
                         {"n": n}, {"X-Api-Key": "abc"}, connection=conn)
    finally:
        conn.close()
    post(upstream, "/v1/embeddings", b"raw", {"Content-Type": "text/plain"})

    first, second, third = upstream.requests
    assert first.method == "POST"
    assert first.path == "/groq/v1/chat/completions"
    assert first.route == "/v1/chat/completions"
    assert first.headers["x-api-key"] == "abc"
    assert first.json == {"n": 0}
    assert third.body == b"raw"
    assert third.json is None
    # one keep-alive connection for the first two, a new one for the third
    assert first.peer_port == second.peer_port != third.peer_port


def test_chunked_request_bodies_are_recorded(upstream):
    conn = http.client.HTTPConnection(upstream.host, upstream.port,
                                      timeout=5)
    try:
        conn.request("POST", "/v1/chat/completions",
                     body=iter([b'{"model": ', b'"gpt-4o"}']),
                     headers={"Transfer-Encoding": "chunked"},
                     encode_chunked=True)
        assert conn.getresponse().read()
    finally:
        conn.close()
    assert upstream.last.json == {"model": "gpt-4o"}


def test_reset_forgets_requests_and_queue(upstream):
    upstream.queue(Reply.error(500))
    upstream.usage["prompt_tokens"] = 1
    post(upstream, "/v1/chat/completions", {})
    upstream.queue(Reply.error(500))
    upstream.reset()
    assert upstream.requests == []
    assert upstream.pending() == 0
    assert upstream.usage["prompt_tokens"] == 21


# --- conftest helpers ------------------------------------------------------

def test_merge_config_is_deep_and_none_deletes():
    base = {"admin_key": "a", "limits": {"x": 1, "y": 2}}
    merged = merge_config(base, {"admin_key": None, "limits": {"y": 3}})
    assert merged == {"limits": {"x": 1, "y": 3}}
    assert base == {"admin_key": "a", "limits": {"x": 1, "y": 2}}


def test_clean_env_drops_credentials(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real")
    monkeypatch.setenv("LLMGW_ADMIN_KEY", "admin")
    env = clean_env({"ANTHROPIC_API_KEY": "sk-test"})
    assert "OPENAI_API_KEY" not in env
    assert "LLMGW_ADMIN_KEY" not in env
    assert env["ANTHROPIC_API_KEY"] == "sk-test"
