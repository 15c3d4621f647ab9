"""Proxying: which provider a request reaches, with which headers and path.

Covers DESIGN.md "Routes" (routing by route, prefix, `models` globs, built-in
families and default_provider; header allowlist and credentials; refused
paths), upstream connection reuse, and "Errors the gateway itself returns"
(format per route, provider errors passed through, 502 and 504).

One gateway serves the whole module; each test creates its own virtual key
through the admin API, so usage rows are told apart by key id.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import (ANTHROPIC_UPSTREAM_KEY, OPENAI_UPSTREAM_KEY,
                      closed_port, key_rows, module_gateway, new_key,
                      raw_exchange)
from fakes import DEFAULT_USAGE, Reply, error_body, openai_chat_json


GEMINI_UPSTREAM_KEY = "sk-upstream-gemini-test-0001"
MISTRAL_UPSTREAM_KEY = "sk-upstream-mistral-test-0001"
FALLBACK_UPSTREAM_KEY = "sk-upstream-fallback-test-0001"
DOWN_UPSTREAM_KEY = "sk-upstream-down-test-0001"

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"

PROJECT = "proxy-tests"


def chat_body(model="gpt-4o-mini", **extra):
    body = {"model": model,
            "messages": [{"role": "user", "content": "Say hello."}]}
    body.update(extra)
    return body


def messages_body(model="claude-3-5-haiku-latest", **extra):
    body = {"model": model, "max_tokens": 64,
            "messages": [{"role": "user", "content": "Say hello."}]}
    body.update(extra)
    return body


class _IdleClosingHandler(BaseHTTPRequestHandler):
    """Answers every POST with a chat completion; closes idle connections.

    Like a provider whose keep-alive timeout is short, it drops (FIN) a
    connection that stays idle for `timeout` seconds without saying so in
    its answer.
    """

    protocol_version = "HTTP/1.1"
    timeout = 0.3

    def log_message(self, format, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps(openai_chat_json(
            "gpt-4o-mini", "hi", DEFAULT_USAGE, "chatcmpl-idle")).encode()
        with self.server.lock:
            self.server.peer_ports.append(self.client_address[1])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def finish(self):
        try:
            BaseHTTPRequestHandler.finish(self)
        finally:
            with self.server.lock:
                self.server.closed += 1


class IdleClosingUpstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        ThreadingHTTPServer.__init__(self, ("127.0.0.1", 0),
                                     _IdleClosingHandler)
        self.lock = threading.Lock()
        self.peer_ports = []
        self.closed = 0
        self.thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05},
            daemon=True)
        self.thread.start()

    @property
    def base_url(self):
        return "http://127.0.0.1:%d/v1" % self.server_address[1]

    def wait_closed(self, count, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.closed >= count:
                    return True
            time.sleep(0.02)
        return False

    def stop(self):
        self.shutdown()
        self.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def idle_upstream():
    server = IdleClosingUpstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(upstream_server, idle_upstream, tmp_path_factory):
    """One gateway with extra providers, all but two on the fake upstream.

    local: OpenAI-type, no key, models llama* and phi-4-mini (ollama-like)
    gemini, mistral: built-in providers moved onto the fake
    fallback: the default_provider
    down, down-anthropic: a closed port
    idle: a provider that silently closes idle connections
    """
    url = upstream_server.url
    dead = "http://127.0.0.1:%d/v1" % closed_port()
    overrides = {
        "default_provider": "fallback",
        "providers": {
            "local": {"type": "openai", "base_url": url + "/local/v1",
                      "api_keys": [], "models": ["llama*", "phi-4-mini"]},
            "gemini": {"type": "openai", "base_url": url + "/gemini/v1",
                       "api_keys": [GEMINI_UPSTREAM_KEY]},
            "mistral": {"type": "openai", "base_url": url + "/mistral/v1",
                        "api_keys": [MISTRAL_UPSTREAM_KEY]},
            "fallback": {"type": "openai", "base_url": url + "/fallback/v1",
                         "api_keys": [FALLBACK_UPSTREAM_KEY]},
            "down": {"type": "openai", "base_url": dead,
                     "api_keys": [DOWN_UPSTREAM_KEY]},
            "down-anthropic": {"type": "anthropic", "base_url": dead,
                               "api_keys": [DOWN_UPSTREAM_KEY]},
            "idle": {"type": "openai", "base_url": idle_upstream.base_url,
                     "api_keys": [OPENAI_UPSTREAM_KEY]},
        },
    }
    with module_gateway(upstream_server, tmp_path_factory, "proxy-gw",
                        overrides) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def slow_gw(upstream_server, tmp_path_factory):
    """A gateway that waits at most 1 s for the provider's answer."""
    slow = {"limits": {"upstream_read_timeout_s": 1}}
    with module_gateway(upstream_server, tmp_path_factory, "proxy-slow-gw",
                        slow) as gateway:
        yield gateway


@pytest.fixture
def key(gw, upstream):
    return new_key(gw, PROJECT)


def openai_error(content):
    """Parse an OpenAI-style error body and check its shape."""
    body = json.loads(content.decode("utf-8"))
    assert set(body) == {"error"}, body
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    return body["error"]


def anthropic_error(content):
    """Parse an Anthropic-style error body and check its shape."""
    body = json.loads(content.decode("utf-8"))
    assert body.get("type") == "error", body
    assert set(body["error"]) >= {"type", "message", "code"}, body
    assert body["error"]["message"], body
    return body["error"]


def forwarded(gateway, upstream, path, body, **kwargs):
    """POST body, which must be answered 200; return what upstream got."""
    status, _, content = gateway.request("POST", path, body, **kwargs)
    assert status == 200, content
    return upstream.last


def post_not_json(gateway, path, key):
    """POST a body that is not JSON, with the key in x-api-key."""
    return gateway.request("POST", path, b"{not json",
                           headers={"x-api-key": key["secret"],
                                    "Content-Type": "application/json"})


def assert_refused_and_recorded(gateway, upstream, key):
    """Nothing reached the provider; one 400 invalid_request row."""
    assert upstream.requests == []
    rows = key_rows(gateway, key)
    assert [(r["status"], r["error"]) for r in rows] == \
        [(400, "invalid_request")]


def assert_gateway_error(gateway, key, answer, status, code, anthropic,
                         anthropic_type=None):
    """A gateway-made error: status, body shape and code, one usage row.

    answer is what gateway.request returned; anthropic_type, when given,
    is the "type" an Anthropic-shaped error must have.  Returns the row.
    """
    got, _, content = answer
    assert got == status
    if anthropic:
        error = anthropic_error(content)
        if anthropic_type is not None:
            assert error["type"] == anthropic_type
    else:
        error = openai_error(content)
    assert error["code"] == code
    rows = key_rows(gateway, key)
    assert len(rows) == 1
    assert rows[0]["status"] == status
    assert rows[0]["error"] == code
    return rows[0]


def raw_request(method, target, body, headers, version="HTTP/1.1"):
    data = json.dumps(body).encode("utf-8")
    lines = ["%s %s %s" % (method, target, version),
             "Host: 127.0.0.1",
             "Content-Type: application/json",
             "Content-Length: %d" % len(data),
             "Connection: close"]
    lines += ["%s: %s" % item for item in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


# ---------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", [MESSAGES, MESSAGES + "/count_tokens"])
def test_messages_routes_go_to_the_anthropic_provider_in_native_format(
        gw, upstream, key, path):
    body = messages_body("claude-3-5-haiku-latest")
    rec = forwarded(gw, upstream, path, body, key=key)

    assert rec.path == path
    assert rec.headers.get("x-api-key") == ANTHROPIC_UPSTREAM_KEY
    assert "authorization" not in rec.headers
    assert rec.json == body


def test_messages_route_goes_to_anthropic_even_for_a_model_others_claim(
        gw, upstream, key):
    # llama* would go to the "local" provider on any other /v1/ route
    status, _, content = gw.request("POST", MESSAGES,
                                    messages_body("llama-3-70b"), key=key)

    assert status == 200, content
    assert upstream.last.path == MESSAGES
    assert upstream.last.headers.get("x-api-key") == ANTHROPIC_UPSTREAM_KEY


@pytest.mark.parametrize("prefixed, path, sent", [
    ("local/some-model", "/local/v1/chat/completions", "some-model"),
    ("mistral/mistral-large-latest", "/mistral/v1/chat/completions",
     "mistral-large-latest"),
    ("openai/gpt-4o-mini", "/v1/chat/completions", "gpt-4o-mini"),
])
def test_provider_prefix_picks_the_provider_and_is_stripped_before_forwarding(
        gw, upstream, key, prefixed, path, sent):
    body = chat_body(prefixed, temperature=0.25, user="u-1")
    rec = forwarded(gw, upstream, CHAT, body, key=key)

    assert rec.path == path
    expected = dict(body, model=sent)
    assert rec.json == expected


def test_models_glob_of_a_configured_provider_picks_that_provider(
        gw, upstream, key):
    body = chat_body("llama3.1:8b")
    rec = forwarded(gw, upstream, CHAT, body, key=key)

    assert rec.path == "/local/v1/chat/completions"
    assert rec.json == body
    # the local provider has no key: no credential at all goes upstream
    assert "authorization" not in rec.headers
    assert "x-api-key" not in rec.headers


@pytest.mark.parametrize("model, path, auth", [
    ("gpt-4o-mini", "/v1/chat/completions",
     ("authorization", "Bearer " + OPENAI_UPSTREAM_KEY)),
    ("o3-mini", "/v1/chat/completions",
     ("authorization", "Bearer " + OPENAI_UPSTREAM_KEY)),
    ("claude-sonnet-4-5", "/v1/chat/completions",
     ("x-api-key", ANTHROPIC_UPSTREAM_KEY)),
    ("gemini-2.5-flash", "/gemini/v1/chat/completions",
     ("authorization", "Bearer " + GEMINI_UPSTREAM_KEY)),
    ("mistral-small-latest", "/mistral/v1/chat/completions",
     ("authorization", "Bearer " + MISTRAL_UPSTREAM_KEY)),
])
def test_builtin_model_families_pick_their_provider(gw, upstream, key, model,
                                                    path, auth):
    rec = forwarded(gw, upstream, CHAT, chat_body(model), key=key)

    assert rec.path == path
    assert rec.headers.get(auth[0]) == auth[1]
    assert rec.json["model"] == model


def test_embeddings_family_goes_to_openai(gw, upstream, key):
    body = {"model": "text-embedding-3-small", "input": "hello"}
    status, _, content = gw.request("POST", "/v1/embeddings", body, key=key)

    assert status == 200, content
    assert upstream.last.path == "/v1/embeddings"
    assert upstream.last.headers.get("authorization") == \
        "Bearer " + OPENAI_UPSTREAM_KEY


def test_a_model_nobody_claims_goes_to_the_default_provider(gw, upstream,
                                                            key):
    body = chat_body("my-house-model-7b")
    rec = forwarded(gw, upstream, CHAT, body, key=key)

    assert rec.path == "/fallback/v1/chat/completions"
    assert rec.headers.get("authorization") == \
        "Bearer " + FALLBACK_UPSTREAM_KEY
    assert rec.json == body


@pytest.mark.parametrize("path, model, upstream_path", [
    ("/local/v1/chat/completions", "gpt-4o-mini",
     "/local/v1/chat/completions"),
    ("/mistral/v1/chat/completions", "claude-sonnet-4-5",
     "/mistral/v1/chat/completions"),
    ("/openai/v1/chat/completions", "llama3.1:8b", "/v1/chat/completions"),
])
def test_provider_route_goes_to_that_provider_whatever_the_model(
        gw, upstream, key, path, model, upstream_path):
    body = chat_body(model)
    rec = forwarded(gw, upstream, path, body, key=key)

    assert rec.path == upstream_path
    assert rec.json == body


def test_anthropic_provider_route_reaches_its_messages_endpoint(gw, upstream,
                                                                key):
    body = messages_body()
    rec = forwarded(gw, upstream, "/anthropic/v1/messages", body, key=key)

    assert rec.path == MESSAGES
    assert rec.headers.get("x-api-key") == ANTHROPIC_UPSTREAM_KEY


def test_provider_route_forwards_get_requests_and_query_strings(gw, upstream,
                                                                key):
    status, _, content = gw.request("GET", "/local/v1/models?limit=5",
                                    key=key)

    assert status == 200, content
    assert upstream.last.method == "GET"
    assert upstream.last.path == "/local/v1/models?limit=5"
    assert json.loads(content)["object"] == "list"


def test_models_list_is_answered_by_the_gateway_in_openai_format(
        gw, upstream, key):
    status, headers, content = gw.request("GET", "/v1/models", key=key)

    assert status == 200, content
    assert headers["content-type"].startswith("application/json")
    body = json.loads(content)
    assert body["object"] == "list"
    for item in body["data"]:
        assert item["object"] == "model"
        assert isinstance(item["id"], str) and item["id"]
        assert isinstance(item["created"], int)
        assert isinstance(item["owned_by"], str)
    ids = [item["id"] for item in body["data"]]
    assert len(ids) == len(set(ids))
    # from the price table, and a literal name in a provider's models
    assert {"gpt-4o", "claude-sonnet-4-5", "phi-4-mini"} <= set(ids)
    assert upstream.requests == []


def test_models_list_is_filtered_by_the_keys_allow_list(gw, upstream):
    key = new_key(gw, PROJECT, models=["gpt-4o*"])
    status, _, content = gw.request("GET", "/v1/models", key=key)

    assert status == 200, content
    ids = [item["id"] for item in json.loads(content)["data"]]
    assert "gpt-4o" in ids and "gpt-4o-mini" in ids
    assert all(i.startswith("gpt-4o") for i in ids), ids


def test_models_list_needs_a_virtual_key(gw, upstream):
    status, _, content = gw.request("GET", "/v1/models")

    assert status == 401
    assert openai_error(content)["code"] == "invalid_api_key"


# ---------------------------------------------------------------------------
# headers and credentials
# ---------------------------------------------------------------------------

def test_openai_type_upstream_gets_allowlisted_headers_and_its_own_key_only(
        gw, upstream, key):
    secret = key["secret"]
    headers = {
        "Authorization": "Bearer " + secret,
        "x-api-key": secret,
        "api-key": secret,
        "x-goog-api-key": secret,
        "OpenAI-Beta": "assistants=v2",
        "X-Stainless-Lang": "python",
        "X-Stainless-Retry-Count": "0",
        "Idempotency-Key": "idem-123",
        "User-Agent": "OpenAI/Python 1.50.0",
        "Accept": "application/json",
        "Cookie": "session=abc",
        "X-Secret-Internal": "do-not-leak",
        "X-Forwarded-For": "10.9.8.7",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Connection": "keep-alive, X-Hop-Marker",
        "X-Hop-Marker": "1",
    }
    got = forwarded(gw, upstream, CHAT, chat_body(), headers=headers).headers

    assert got["authorization"] == "Bearer " + OPENAI_UPSTREAM_KEY
    assert got["openai-beta"] == "assistants=v2"
    assert got["x-stainless-lang"] == "python"
    assert got["x-stainless-retry-count"] == "0"
    assert got["idempotency-key"] == "idem-123"
    assert got["user-agent"] == "OpenAI/Python 1.50.0"
    assert got["content-type"] == "application/json"
    for name in ("x-api-key", "api-key", "x-goog-api-key", "cookie",
                 "x-secret-internal", "x-forwarded-for",
                 "proxy-authorization", "keep-alive", "te", "x-hop-marker"):
        assert name not in got, name
    assert "x-hop-marker" not in got.get("connection", "").lower()
    for name, value in upstream.last.header_list:
        assert secret not in value, name


def test_headers_the_client_names_in_connection_are_not_forwarded(
        gw, upstream, key):
    # RFC 9110 7.6.1: a header listed in Connection is hop-by-hop, even one
    # that would otherwise be forwarded
    headers = {"Authorization": "Bearer " + key["secret"],
               "Connection": "keep-alive, X-Stainless-Lang, OpenAI-Beta",
               "X-Stainless-Lang": "python",
               "OpenAI-Beta": "assistants=v2",
               "X-Stainless-Arch": "arm64"}
    got = forwarded(gw, upstream, CHAT, chat_body(), headers=headers).headers

    assert got.get("x-stainless-arch") == "arm64"
    assert "x-stainless-lang" not in got
    assert "openai-beta" not in got


def test_anthropic_type_upstream_gets_x_api_key_and_a_default_version(
        gw, upstream, key):
    secret = key["secret"]
    headers = {
        "x-api-key": secret,
        "Authorization": "Bearer " + secret,
        "anthropic-beta": "prompt-caching-2024-07-31",
        "X-Stainless-Arch": "x64",
        "Cookie": "session=abc",
        "X-Secret-Internal": "do-not-leak",
    }
    got = forwarded(gw, upstream, MESSAGES, messages_body(),
                    headers=headers).headers

    assert got["x-api-key"] == ANTHROPIC_UPSTREAM_KEY
    assert got["anthropic-version"] == "2023-06-01"
    assert got["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert got["x-stainless-arch"] == "x64"
    for name in ("authorization", "cookie", "x-secret-internal"):
        assert name not in got, name
    for name, value in upstream.last.header_list:
        assert secret not in value, name


def test_anthropic_version_sent_by_the_client_is_kept(gw, upstream, key):
    headers = {"x-api-key": key["secret"],
               "anthropic-version": "2023-01-01"}
    status, _, content = gw.request("POST", MESSAGES, messages_body(),
                                    headers=headers)

    assert status == 200, content
    assert upstream.last.headers["anthropic-version"] == "2023-01-01"
    sent = [value for name, value in upstream.last.header_list
            if name.lower() == "anthropic-version"]
    assert sent == ["2023-01-01"]


@pytest.mark.parametrize("path, body", [
    (CHAT, chat_body()), (MESSAGES, messages_body())],
    ids=["chat", "messages"])
@pytest.mark.parametrize("header, template", [
    ("Authorization", "Bearer %s"), ("x-api-key", "%s"), ("api-key", "%s"),
    ("x-goog-api-key", "%s")])
def test_virtual_key_is_accepted_in_every_client_credential_header(
        gw, upstream, key, header, template, path, body):
    status, _, content = gw.request("POST", path, body,
                                    headers={header: template % key["secret"]})

    assert status == 200, content
    assert len(upstream.requests) == 1
    for name, value in upstream.last.header_list:
        assert key["secret"] not in value, name


@pytest.mark.parametrize("header, template", [
    ("Authorization", "Bearer %s"), ("x-api-key", "%s"), ("api-key", "%s"),
    ("x-goog-api-key", "%s")])
def test_an_unknown_key_in_any_credential_header_is_refused_before_upstream(
        gw, upstream, header, template):
    secret = "sk-gw-" + "N" * 40
    status, headers, content = gw.request(
        "POST", CHAT, chat_body(), headers={header: template % secret})

    assert status == 401
    assert openai_error(content)["code"] == "invalid_api_key"
    assert upstream.requests == []


# ---------------------------------------------------------------------------
# refused paths
# ---------------------------------------------------------------------------

BAD_TARGETS = [
    "/v1/../admin/virtual-keys",
    "/v1/chat/../../../etc/passwd",
    "/openai/v1/../../v1/chat/completions",
    "/v1/%2e%2e/chat/completions",
    "/v1/%2E%2E/%2e%2e/chat/completions",
    "/local/v1/%2e%2e%2f%2e%2e%2fv1/chat/completions",
    "/v1/chat%2fcompletions",
    "/openai/v1/chat%2Fcompletions",
    "/v1/chat\\completions",
    "/local/v1/..\\..\\v1/chat/completions",
    "http://evil/v1/chat/completions",
    "http://127.0.0.1:{fake}/v1/chat/completions",
    "//evil/v1/chat/completions",
]


@pytest.mark.parametrize("target", BAD_TARGETS)
def test_unsafe_request_targets_are_refused_and_nothing_reaches_upstream(
        gw, upstream, key, target):
    target = target.replace("{fake}", str(upstream.port))
    data = raw_request("POST", target, chat_body(),
                       {"Authorization": "Bearer " + key["secret"]})
    status, _, content = raw_exchange(gw.port, data)

    assert status == 400, content
    body = json.loads(content.decode("utf-8"))
    assert body["error"]["code"] == "invalid_request"
    assert upstream.requests == []


@pytest.mark.parametrize("target", [
    "/v1/chat/\x01completions", "/v1/chat/completions\x7f",
    "/v1/\x00/chat/completions"], ids=["soh", "del", "nul"])
def test_a_control_character_in_the_path_is_refused(gw, upstream, key,
                                                   target):
    data = raw_request("POST", target, chat_body(),
                       {"Authorization": "Bearer " + key["secret"]})
    status, _, content = raw_exchange(gw.port, data)

    assert status == 400, content
    assert upstream.requests == []


# ---------------------------------------------------------------------------
# upstream connections
# ---------------------------------------------------------------------------

def test_sequential_requests_reuse_one_upstream_connection(gw, upstream, key):
    for index in range(4):
        if index == 1:  # a finished stream leaves its connection reusable
            events = gw.stream(CHAT, chat_body(stream=True), key=key)
            assert events.status == 200 and events.data()[-1] == "[DONE]"
        status, _, content = gw.request("POST", CHAT, chat_body(), key=key)
        assert status == 200, content

    ports = [rec.peer_port for rec in upstream.requests]
    assert len(ports) == 5
    assert len(set(ports)) == 1, ports


def test_a_connection_the_provider_announced_closed_is_not_reused(
        gw, upstream, key):
    upstream.queue(Reply(close=True))
    first = gw.request("POST", CHAT, chat_body(), key=key)
    second = gw.request("POST", CHAT, chat_body(), key=key)

    assert first[0] == 200 and second[0] == 200, (first, second)
    ports = [rec.peer_port for rec in upstream.requests]
    assert len(ports) == 2 and ports[0] != ports[1]


def test_a_pooled_connection_the_provider_closed_while_idle_is_retried(
        gw, upstream, idle_upstream, key):
    closed_before = idle_upstream.closed
    status, _, content = gw.request("POST", "/idle/v1/chat/completions",
                                    chat_body(), key=key)
    assert status == 200, content
    # the provider drops the idle keep-alive connection, silently
    assert idle_upstream.wait_closed(closed_before + 1)

    status, _, content = gw.request("POST", "/idle/v1/chat/completions",
                                    chat_body(), key=key)

    assert status == 200, content
    assert json.loads(content)["object"] == "chat.completion"
    rows = key_rows(gw, key, 2)
    assert [row["status"] for row in rows] == [200, 200]
    assert [row["error"] for row in rows] == [None, None]


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

def test_gateway_errors_on_openai_routes_use_the_openai_shape(gw, upstream):
    status, headers, content = gw.request("POST", CHAT, chat_body())

    assert status == 401
    assert headers["content-type"].startswith("application/json")
    error = openai_error(content)
    assert error["code"] == "invalid_api_key"
    assert error["type"]


def test_gateway_errors_on_the_messages_route_use_the_anthropic_shape(
        gw, upstream):
    status, _, content = gw.request("POST", MESSAGES, messages_body())

    assert status == 401
    error = anthropic_error(content)
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert upstream.requests == []


def test_gateway_errors_on_anthropic_type_provider_routes_are_anthropic_shaped(
        gw, upstream, key):
    status, _, content = post_not_json(gw, "/anthropic/v1/messages", key)

    assert status == 400
    error = anthropic_error(content)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert upstream.requests == []


def test_a_body_that_is_not_json_is_refused_in_the_anthropic_shape(
        gw, upstream, key):
    status, _, content = post_not_json(gw, MESSAGES, key)

    assert status == 400
    assert anthropic_error(content)["code"] == "invalid_request"
    assert_refused_and_recorded(gw, upstream, key)


def test_an_unknown_provider_prefix_in_the_model_is_refused(gw, upstream,
                                                            key):
    status, _, content = gw.request("POST", CHAT,
                                    chat_body("nosuch/model-x"), key=key)

    assert status == 400
    assert openai_error(content)["code"] == "invalid_request"
    assert_refused_and_recorded(gw, upstream, key)


def test_a_body_without_a_model_is_refused(gw, upstream, key):
    status, _, content = gw.request("POST", CHAT, {"messages": []}, key=key)

    assert status == 400
    assert openai_error(content)["code"] == "invalid_request"
    assert_refused_and_recorded(gw, upstream, key)


def test_an_unknown_provider_route_is_not_found(gw, upstream, key):
    status, _, content = gw.request("POST", "/nosuch/v1/chat/completions",
                                    chat_body(), key=key)

    assert status == 404
    assert openai_error(content)["code"] == "not_found"
    assert upstream.requests == []


@pytest.mark.parametrize("path, body, reply", [
    (CHAT, chat_body(), Reply.error(400, "bad 'messages' field")),
    (CHAT, chat_body(), Reply.error(429, retry_after=7)),
    (CHAT, chat_body(stream=True), Reply.error(503)),
    (MESSAGES, messages_body(), Reply.error(429)),
    (MESSAGES, messages_body(), Reply.error(529)),
], ids=["chat-400", "chat-429", "chat-stream-503", "messages-429",
        "messages-529"])
def test_provider_errors_are_passed_through_unchanged(gw, upstream, key,
                                                      path, body, reply):
    upstream.queue(reply)
    status, headers, content = gw.request(
        "POST", path, body, headers={"x-api-key": key["secret"]})

    assert status == reply.status
    expected = json.dumps(error_body(path, reply.status, reply.message))
    assert content == expected.encode("utf-8")
    if "retry-after" in reply.headers:
        assert headers.get("retry-after") == "7"
    rows = key_rows(gw, key)
    assert len(rows) == 1
    assert rows[0]["status"] == reply.status
    assert rows[0]["error"]


def test_provider_error_with_an_unusual_body_is_passed_through_byte_for_byte(
        gw, upstream, key):
    raw = b'{"error": {"message": "model overloaded",  "type": "x"}}\n'
    upstream.queue(Reply(status=500, body=raw))
    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 500
    assert content == raw


@pytest.mark.parametrize("path, body, anthropic", [
    ("/down/v1/chat/completions", chat_body(), False),
    ("/down-anthropic/v1/messages", messages_body(), True),
    (CHAT, chat_body("down/gpt-4o-mini"), False),
], ids=["openai-type", "anthropic-type", "by-prefix"])
def test_an_unreachable_provider_gives_502_upstream_error(gw, upstream, key,
                                                          path, body,
                                                          anthropic):
    answer = gw.request("POST", path, body, key=key)

    row = assert_gateway_error(gw, key, answer, 502, "upstream_error",
                               anthropic, "api_error")
    assert row["provider"] in ("down", "down-anthropic")


@pytest.mark.parametrize("path, body, anthropic", [
    (CHAT, chat_body(), False),
    (MESSAGES, messages_body(), True),
], ids=["chat", "messages"])
def test_a_provider_answering_garbage_gives_502_upstream_error(
        gw, upstream, key, path, body, anthropic):
    upstream.queue(Reply(garbage=True))
    answer = gw.request("POST", path, body, key=key)

    assert_gateway_error(gw, key, answer, 502, "upstream_error", anthropic)


def test_a_provider_closing_without_an_answer_gives_502(gw, upstream, key):
    # twice: a reused connection may be retried once on a fresh one
    upstream.queue(Reply(close_before_status=True),
                   Reply(close_before_status=True))
    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status == 502
    assert openai_error(content)["code"] == "upstream_error"
    assert 1 <= len(upstream.requests) <= 2


def test_a_redirect_from_the_provider_is_not_followed(gw, upstream, key):
    upstream.queue(Reply.redirect(upstream.url + "/v1/chat/completions"))
    status, _, content = gw.request("POST", CHAT, chat_body(), key=key)

    assert status != 200
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("path, body, anthropic", [
    (CHAT, chat_body(), False),
    (MESSAGES, messages_body(), True),
], ids=["chat", "messages"])
def test_a_provider_silent_past_the_read_timeout_gives_504(
        slow_gw, upstream, path, body, anthropic):
    key = new_key(slow_gw, PROJECT)
    upstream.queue(Reply(stall=3))
    answer = slow_gw.request("POST", path, body, key=key, timeout=10)

    assert_gateway_error(slow_gw, key, answer, 504, "upstream_timeout",
                         anthropic, "timeout_error")
    # a request that may have reached the provider is never sent twice
    assert len(upstream.requests) == 1


def test_a_provider_silent_mid_stream_past_the_read_timeout_is_recorded(
        slow_gw, upstream):
    key = new_key(slow_gw, PROJECT)
    upstream.queue(Reply(pause=(3, 4)))
    events = slow_gw.stream(CHAT, chat_body(stream=True), key=key,
                            timeout=10)

    # the answer had started: the client sees a stream cut short
    assert events.status == 200
    assert "[DONE]" not in events.data()
    rows = key_rows(slow_gw, key)
    assert len(rows) == 1
    assert rows[0]["error"] == "upstream_timeout"
    assert rows[0]["streamed"] == 1
    assert rows[0]["estimated"] == 1
    assert rows[0]["input_tokens"] > 0
