"""Header values reach a provider only when they are clean."""

import http.client
import json
import select
import socket

import pytest

from conftest import OPENAI_UPSTREAM_KEY, raw_exchange, write_config


def test_a_header_value_with_a_control_character_is_refused(gateway,
                                                            upstream):
    gw = gateway()
    key = gw.create_key("strict")
    body = json.dumps({"model": "gpt-4o-mini",
                       "messages": [{"role": "user", "content": "hi"}]})
    request = ("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
               "Authorization: Bearer %s\r\nContent-Type: application/json"
               "\r\nX-Stainless-Lang: py\x00thon\r\nContent-Length: %d\r\n"
               "\r\n%s" % (key["secret"], len(body), body))
    status, _, answer = raw_exchange(gw.port, request.encode("latin-1"))
    assert status == 400
    assert json.loads(answer)["error"]["code"] == "invalid_request"
    assert upstream.requests == []


def test_a_provider_key_with_a_space_is_a_config_error(tmp_path, run_cli):
    path = str(tmp_path / "bad.json")
    write_config(path, {"providers": {"openai": {
        "api_keys": ["sk-abc def"]}}})
    rc, out, err = run_cli("--config", path, "config", "check")
    assert rc == 1
    assert "spaces or characters a header cannot carry" in err
    assert "sk-abc def" not in err + out


# A request head usually arrives in one piece and is split in one go; one
# that trickles in is read line by line. Both must apply the same rules.

def head_request(secret, *extra_lines, ending="\r\n"):
    body = json.dumps({"model": "gpt-4o-mini",
                       "messages": [{"role": "user", "content": "hi"}]})
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: gw",
             "Authorization: Bearer %s" % secret,
             "Content-Type: application/json"] + list(extra_lines) + [
             "Content-Length: %d" % len(body), ""]
    return (ending.join(lines) + ending + body).encode("latin-1")


def trickle_exchange(port, data, pieces=7):
    """Send data in small writes with pauses; parse one response."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        size = len(data) // pieces + 1
        for at in range(0, len(data), size):
            if select.select([sock], [], [], 0.02)[0]:
                break  # answered (and closed) before the end of the head
            sock.sendall(data[at:at + size])
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()
    finally:
        sock.close()


@pytest.mark.parametrize("send", ["at_once", "trickled"])
def test_a_lone_cr_or_control_character_in_any_header_line_is_refused(
        gateway, upstream, send):
    gw = gateway()
    secret = gw.create_key("strict")["secret"]
    for line in ("X-Trace: a\rb", "X-Trace: a\x1bb", "X-Tr\x7face: ab"):
        data = head_request(secret, line)
        if send == "at_once":
            status, _, answer = raw_exchange(gw.port, data)
        else:
            status, answer = trickle_exchange(gw.port, data)
        assert status == 400, line
        assert json.loads(answer)["error"]["code"] == "invalid_request"
    assert upstream.requests == []


@pytest.mark.parametrize("send", ["at_once", "trickled"])
def test_repeated_headers_tabs_and_bare_lf_line_ends_are_read_as_before(
        gateway, upstream, send):
    gw = gateway()
    secret = gw.create_key("lenient")["secret"]
    for ending in ("\r\n", "\n"):
        data = head_request(secret, "X-Stainless-Tag: one",
                            "x-stainless-tag:\ttwo\t ", "User-Agent:  ua/1  ",
                            ending=ending)
        if send == "at_once":
            status, _, _ = raw_exchange(gw.port, data)
        else:
            status, _ = trickle_exchange(gw.port, data)
        assert status == 200, (ending, send)
        seen = upstream.requests[-1].headers
        assert seen["x-stainless-tag"] == "one, two"
        assert seen["user-agent"] == "ua/1"
        assert seen["authorization"] == "Bearer " + OPENAI_UPSTREAM_KEY
    assert len(upstream.requests) == 2
    assert len(gw.wait_rows(2)) == 2


def test_a_request_without_header_fields_gets_an_answer(gateway, upstream):
    # HTTP/1.0 needs no Host; an HTTP/1.1 request without one is refused
    # (RFC 9112, section 3.2), as is one with two
    gw = gateway()
    status, _, answer = raw_exchange(gw.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert status == 200
    assert json.loads(answer)["status"] == "ok"
    for head in (b"GET /health HTTP/1.1\r\n\r\n",
                 b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"):
        status, _, answer = raw_exchange(gw.port, head)
        assert status == 400, head
        assert "Host" in json.loads(answer)["error"]["message"]
