"""Upstream connections are reused only when their last answer is done."""

import contextlib
import os
import socket
import ssl
import sys
import threading
import time
import types

import pytest

from fakes import Reply

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import llmgw  # noqa: E402

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


# ---------------------------------------------------------------------------
# the same check on a TLS connection, where bytes can wait inside the TLS
# layer as well as in the socket
# ---------------------------------------------------------------------------

ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
          b"Content-Length: 2\r\n\r\n{}")


def tls_listener(certificate):
    """A TLS server context for the test certificate, and a listening
    socket on 127.0.0.1 for it."""
    cert, keyfile = certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, keyfile)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(10)
    return server_ctx, listener


@contextlib.contextmanager
def accept_request(server_ctx, listener):
    """Accept one TLS connection and read a request head on it: yields
    (the TLS socket, the head), and closes the socket after."""
    raw, _ = listener.accept()
    with server_ctx.wrap_socket(raw, server_side=True) as tls:
        tls.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(65536)
        yield tls, head


@pytest.mark.parametrize("after, reusable", [
    (b"", True),
    (b"\r\n", False),
    (ANSWER, False),
    (None, False),
], ids=["nothing", "stray-crlf", "stray-answer", "closed"])
def test_a_tls_connection_is_reused_only_when_nothing_follows_its_answer(
        certificate, after, reusable):
    cert, _ = certificate
    server_ctx, listener = tls_listener(certificate)
    done, release = threading.Event(), threading.Event()

    def provider():
        with accept_request(server_ctx, listener) as (tls, head):
            tls.sendall(ANSWER + (after or b""))
            if after is not None:
                done.set()
                release.wait(10)  # keep the connection open meanwhile
        done.set()

    thread = threading.Thread(target=provider, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=cert)
    where = types.SimpleNamespace(host="127.0.0.1",
                                  port=listener.getsockname()[1])
    conn = llmgw.UpstreamConnection(where, 10, client_ctx)
    try:
        conn.connect(10)
        conn.send_request("POST", "/v1/chat/completions",
                          {"content-type": "application/json"}, b"{}")
        resp = conn.getresponse("POST")
        assert resp.status == 200
        assert b"".join(llmgw.body_pieces(resp)) == b"{}"
        assert done.wait(10)
        time.sleep(0.1)  # what the provider wrote has arrived

        assert llmgw.alive(conn) is reusable
    finally:
        release.set()
        conn.close()
        thread.join(10)
        listener.close()


def test_an_early_answer_over_tls_reaches_the_client(gateway, certificate):
    # over TLS a write to a connection the provider dropped fails with a
    # TLS error rather than a reset; the answer it sent first still counts
    cert, _ = certificate
    server_ctx, listener = tls_listener(certificate)
    refusal = (b'{"error":{"message":"request too large","type":'
               b'"invalid_request_error","param":null,"code":null}}')
    answer = (b"HTTP/1.1 413 Payload Too Large\r\n"
              b"Content-Type: application/json\r\nConnection: close\r\n"
              b"Content-Length: %d\r\n\r\n" % len(refusal)) + refusal
    heads = []

    def provider():
        with accept_request(server_ctx, listener) as (tls, head):
            heads.append(head.split(b"\r\n", 1)[0])
            tls.sendall(answer)
            time.sleep(0.05)
        # closed with most of the body unread: the peer gets a reset

    thread = threading.Thread(target=provider, daemon=True)
    thread.start()
    try:
        url = "https://127.0.0.1:%d/v1" % listener.getsockname()[1]
        gw = gateway(config={"providers": {"openai": {"base_url": url}}},
                     env={"SSL_CERT_FILE": cert})
        key = gw.create_key("tls-early")
        body = {"model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "x" * (16 << 20)}]}

        status, _, content = gw.request("POST", CHAT, body, key=key)

        assert (status, content) == (413, refusal)
        assert heads == [b"POST /v1/chat/completions HTTP/1.1"]
        rows = gw.wait_rows(1)
        assert rows[0]["status"] == 413, rows
        assert rows[0]["error"] == "provider_error", rows
    finally:
        thread.join(10)
        listener.close()
