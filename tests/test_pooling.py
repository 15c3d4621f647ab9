"""Upstream connections are reused only when their last answer is done."""

from fakes import Reply

CHAT = "/v1/chat/completions"
SSE = (b'data: {"id":"c1","object":"chat.completion.chunk","choices":'
       b'[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
       b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],'
       b'"usage":{"prompt_tokens":3,"completion_tokens":1,'
       b'"total_tokens":4}}\n\n'
       b'data: [DONE]\n\n')


def test_a_stream_framed_by_content_length_leaves_a_reusable_connection(
        gateway, upstream):
    gw = gateway()
    key = gw.create_key("pool")
    body = {"model": "gpt-4o-mini", "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        upstream.queue(Reply(body=SSE, headers={
            "Content-Type": "text/event-stream"}))
        events = gw.stream(CHAT, body, key=key)
        assert events.status == 200
        assert events.data()[-1] == "[DONE]"
    ports = {r.peer_port for r in upstream.requests}
    assert len(upstream.requests) == 3
    assert len(ports) == 1  # one pooled connection served all three
    rows = gw.wait_rows(3)
    assert [r["status"] for r in rows] == [200, 200, 200]
    assert [r["output_tokens"] for r in rows] == [1, 1, 1]
