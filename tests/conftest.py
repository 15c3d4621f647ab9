"""Shared fixtures of the llmgw test suite.

    upstream      the fake provider (tests/fakes.py), one per session, reset
                  before and after every test
    tmp_db        path of a database file that does not exist yet
    tmp_config    tmp_config(overrides=None) -> path of a config file whose
                  providers point at the fake upstream
    run_cli       run_cli(*args, input=None, env=None) -> (rc, out, err)
    gateway       gateway(config=None, env=None, ...) -> a running Gateway

Helpers for test modules: ServeProcess (a `serve` subprocess; Gateway is
one with --config and --db), start_gateway and module_gateway (one gateway
shared by a module), new_key (a virtual key made through the admin API),
key_rows, insert_usage_rows, chat, poll, raw_exchange, closed_port,
openai_error, file_mode and assert_one_line_error.

Every subprocess gets a clean environment: no *_API_KEY, no LLMGW_*, no
proxy variables, no NOTIFY_SOCKET, so a developer's real keys never reach
llmgw.  Tests add what they need with env={...}.
"""

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest

from fakes import FakeUpstream, header_dict, http_request, http_stream


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
LLMGW = os.path.join(os.path.dirname(TESTS_DIR), "llmgw.py")

# Credentials written into every test config.  The provider keys are what
# the fake upstream should see; the admin key opens /admin/... routes.
ADMIN_KEY = "test-admin-key-0123456789abcdef"
OPENAI_UPSTREAM_KEY = "sk-upstream-openai-test-0001"
ANTHROPIC_UPSTREAM_KEY = "sk-ant-upstream-test-0001"

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
CLI_TIMEOUT_S = 60.0

# How long a change made by another process may take to reach a running
# gateway: DESIGN.md says one second; the rest is slack for a loaded CI box.
PROPAGATION_S = 1.5

_LISTENING = re.compile(r"listening on (https?)://127\.0\.0\.1:(\d+)")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def clean_env(extra=None):
    """Return os.environ without credentials, llmgw or proxy settings.

    extra is merged on top; a value of None removes that variable.
    """
    env = {}
    for name, value in os.environ.items():
        upper = name.upper()
        if (upper.endswith("_API_KEY") or upper.endswith("_BASE_URL")
                or upper.startswith("LLMGW_")
                or upper.endswith("_PROXY") or upper == "NOTIFY_SOCKET"
                or upper == "OLLAMA_HOST"):
            continue
        env[name] = value
    # Python 3.8 block-buffers a piped stderr: keep the log line timely
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def merge_config(base, overrides):
    """Deep-merge overrides into a copy of base; None deletes a key."""
    result = dict(base)
    for key, value in (overrides or {}).items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_config(result[key], value)
        else:
            result[key] = value
    return result


def base_config(upstream):
    """A config whose openai and anthropic providers are the fake upstream.

    Timeouts are short so that failure tests finish quickly; tests that
    need other values override them.
    """
    return {
        "admin_key": ADMIN_KEY,
        "default_provider": "openai",
        "providers": {
            "openai": {"type": "openai", "base_url": upstream.base_url,
                       "api_keys": [OPENAI_UPSTREAM_KEY]},
            "anthropic": {"type": "anthropic",
                          "base_url": upstream.base_url,
                          "api_keys": [ANTHROPIC_UPSTREAM_KEY]},
        },
        "limits": {
            "upstream_connect_timeout_s": 5,
            "upstream_read_timeout_s": 15,
            "header_timeout_s": 5,
            "idle_timeout_s": 5,
            "drain_timeout_s": 5,
        },
    }


def write_config(path, config):
    """Write config as JSON, mode 0600 like llmgw itself would."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle, indent=2)
    return path


def run_llmgw(args, input=None, env=None, cwd=None, timeout=CLI_TIMEOUT_S):
    """Run `python llmgw.py ARGS`; return (returncode, stdout, stderr).

    input may be str or bytes; env is merged into clean_env(); output is
    decoded as UTF-8.
    """
    if isinstance(input, str):
        input = input.encode("utf-8")
    proc = subprocess.run(
        [sys.executable, LLMGW] + [str(arg) for arg in args],
        input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=clean_env(env), cwd=cwd, timeout=timeout)
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


def query_db(db_path, sql, params=()):
    """Run one query on a database; return the rows as dicts."""
    conn = sqlite3.connect(db_path, timeout=2.0)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def insert_usage_rows(db_path, rows):
    """Write usage rows (dicts of column: value) straight into a database."""
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            for row in rows:
                columns = list(row)
                conn.execute(
                    "insert into usage (%s) values (%s)"
                    % (", ".join(columns), ",".join("?" * len(columns))),
                    [row[column] for column in columns])
    finally:
        conn.close()


def poll(send, accept, timeout=PROPAGATION_S, interval=0.05):
    """Call send() until accept(result) (bounded); return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = send()
        if accept(result) or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def closed_port():
    """A local port nothing listens on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def raw_exchange(port, data, timeout=5.0):
    """Send raw bytes to 127.0.0.1:port; parse one response.

    Returns (status, headers dict with lower-case names, body bytes).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        content = resp.read()
        return resp.status, header_dict(resp.msg), content
    finally:
        sock.close()


def openai_error(obj, code):
    """Check a parsed OpenAI-shaped error and its code; return the error."""
    assert set(obj) == {"error"}, obj
    err = obj["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    return err


def file_mode(path):
    """The permission bits of a file, e.g. 0o600."""
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_one_line_error(rc, err, *words):
    """Exit 1, one stderr line `llmgw: error: ...` naming every word."""
    assert rc == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, "expected one error line, got:\n" + err
    assert lines[0].startswith("llmgw: error:"), err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, err)


class _Drain(object):
    """Reads a pipe in a thread into a buffer, so it can never fill up."""

    def __init__(self, pipe, name):
        self._pipe = pipe
        self._chunks = []
        self._cond = threading.Condition()
        self.closed = False
        self._thread = threading.Thread(target=self._run, name=name,
                                        daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for line in iter(self._pipe.readline, b""):
                with self._cond:
                    self._chunks.append(line)
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def text(self):
        with self._cond:
            return b"".join(self._chunks).decode("utf-8", "replace")

    def wait_for(self, predicate, timeout):
        """Wait until predicate(text) is true or the pipe closes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = b"".join(self._chunks).decode("utf-8", "replace")
                result = predicate(text)
                remaining = deadline - time.monotonic()
                if result or self.closed or remaining <= 0:
                    return result
                self._cond.wait(min(remaining, 0.1))

    def join(self, timeout):
        self._thread.join(timeout)


# ---------------------------------------------------------------------------
# the running gateway
# ---------------------------------------------------------------------------

class ServeProcess(object):
    """One `llmgw.py ... serve` subprocess: started, read and stopped.

    args are the llmgw.py arguments before `serve`; the server listens on
    127.0.0.1, port 0, and the constructor returns once it says where.
    Attributes: url, scheme, port, proc, env.
    """

    def __init__(self, args, cwd, env=None, serve_args=(),
                 ready_timeout=READY_TIMEOUT_S):
        self.env = dict(env or {})
        self.port = None
        self.url = None
        self.scheme = None
        cmd = ([sys.executable, LLMGW] + [str(arg) for arg in args]
               + ["serve", "--host", "127.0.0.1", "--port", "0"]
               + [str(arg) for arg in serve_args])
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=clean_env(self.env), cwd=str(cwd))
        self._stderr = _Drain(self.proc.stderr, "gw-stderr")
        self._stdout = _Drain(self.proc.stdout, "gw-stdout")
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout):
        """Wait for the `listening on` line; stop and fail without it."""
        match = self._stderr.wait_for(_LISTENING.search, timeout)
        if not match:
            self.stop()
            raise RuntimeError(
                "llmgw serve did not report `listening on` within %.0f s "
                "(exit status %r); stderr:\n%s"
                % (timeout, self.proc.returncode, self.stderr_text()))
        self.scheme = match.group(1)
        self.port = int(match.group(2))
        self.url = "%s://127.0.0.1:%d" % (self.scheme, self.port)

    def signal(self, signum):
        """Send a signal to the server process (if it still runs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout=STOP_TIMEOUT_S):
        """SIGTERM, wait (bounded), then SIGKILL; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.join(2)
        self._stdout.join(2)
        for pipe in (self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        return self.proc.returncode

    # --- output ----------------------------------------------------------

    def stderr_text(self):
        """Everything the server wrote to stderr so far."""
        return self._stderr.text()

    def stdout_text(self):
        """Everything the server wrote to stdout so far."""
        return self._stdout.text()

    def wait_for_log(self, pattern, timeout=5.0):
        """Wait (bounded) for a regex in stderr; return the match or None."""
        regex = re.compile(pattern)
        return self._stderr.wait_for(regex.search, timeout)


class Gateway(ServeProcess):
    """`llmgw.py --config --db serve` and helpers to talk to it.

    Attributes: url, scheme, port, db_path, config_path, config (the dict
    written), admin_key, proc, workdir.
    """

    def __init__(self, config, config_path, db_path, workdir, env=None,
                 args=(), ready_timeout=READY_TIMEOUT_S):
        self.config = config
        self.config_path = config_path
        self.db_path = db_path
        self.workdir = workdir
        self.admin_key = config.get("admin_key")
        ServeProcess.__init__(
            self, ["--config", config_path, "--db", db_path], workdir,
            env=env, serve_args=args, ready_timeout=ready_timeout)

    # --- HTTP ------------------------------------------------------------

    def _headers(self, headers, key):
        headers = dict(headers or {})
        if key is not None:
            if isinstance(key, dict):
                key = key["secret"]
            headers["Authorization"] = "Bearer " + key
        return headers

    def request(self, method, path, body=None, headers=None, key=None,
                timeout=30.0):
        """Send one request on a new connection.

        body: dict/list (sent as JSON), str or bytes.  key: a secret or
        the dict create_key returned, sent as Authorization: Bearer.
        Returns (status, headers dict with lower-case names, body bytes).
        """
        assert self.scheme == "http", "request() speaks plain HTTP only"
        return http_request("127.0.0.1", self.port, method, path, body,
                            self._headers(headers, key), timeout)

    def json_request(self, method, path, body=None, headers=None, key=None,
                     timeout=30.0):
        """Like request(), but return (status, headers, parsed JSON)."""
        status, resp_headers, content = self.request(
            method, path, body, headers, key, timeout)
        return status, resp_headers, json.loads(content.decode("utf-8"))

    def stream(self, path, body=None, headers=None, key=None,
               method="POST", max_events=None, timeout=30.0):
        """Send a request and read its SSE answer event by event.

        Returns a fakes.SSEList: a list of raw event blocks (str), with
        .status, .headers, .body, .error and .json()/.data()/.names().
        max_events=N hangs up after N events, like a client going away.
        """
        assert self.scheme == "http", "stream() speaks plain HTTP only"
        return http_stream("127.0.0.1", self.port, method, path, body,
                           self._headers(headers, key), timeout, max_events)

    def admin(self, method, path, body=None, timeout=30.0):
        """Call the admin API with the admin key; (status, headers, body)."""
        return self.request(method, path, body,
                            {"Authorization": "Bearer %s" % self.admin_key},
                            timeout=timeout)

    # --- CLI and database ------------------------------------------------

    def cli(self, *args, **kwargs):
        """run_llmgw with this gateway's --config and --db."""
        kwargs.setdefault("cwd", self.workdir)
        env = dict(self.env)
        env.update(kwargs.pop("env", None) or {})
        return run_llmgw(["--config", self.config_path, "--db",
                          self.db_path] + list(args), env=env, **kwargs)

    def create_key(self, project, *flags):
        """`keys create PROJECT FLAGS --output json`; return the dict."""
        code, out, err = self.cli("keys", "create", project, *(
            list(flags) + ["--output", "json"]))
        assert code == 0, "keys create failed (%d): %s" % (code, err)
        return json.loads(out)

    def rows(self, sql="select * from usage", params=()):
        """Query the database; return a list of dicts."""
        return query_db(self.db_path, sql, params)

    def wait_rows(self, count, sql="select * from usage", params=(),
                  timeout=5.0):
        """Poll (bounded) until the query returns at least count rows."""
        def found():
            try:
                return self.rows(sql, params)
            except sqlite3.OperationalError:
                return []
        return poll(found, lambda rows: len(rows) >= count, timeout)


def start_gateway(upstream, workdir, overrides=None):
    """A Gateway in workdir whose config is base_config + overrides."""
    config = merge_config(base_config(upstream), overrides)
    path = write_config(str(workdir / "llmgw.json"), config)
    return Gateway(config, path, str(workdir / "llmgw.db"), str(workdir))


@contextlib.contextmanager
def module_gateway(upstream, tmp_path_factory, name, overrides=None):
    """A gateway in a new folder `name`, stopped when the block ends.

    For module-scoped fixtures: `with module_gateway(...) as gw: yield gw`.
    """
    gateway = start_gateway(upstream, tmp_path_factory.mktemp(name),
                            overrides)
    try:
        yield gateway
    finally:
        gateway.stop()


def new_key(gateway, project, **fields):
    """Create a virtual key through the admin API; return its dict."""
    body = dict(fields, project=project)
    status, _, content = gateway.admin("POST", "/admin/virtual-keys", body)
    assert status == 201, content
    return json.loads(content.decode("utf-8"))


def key_rows(gateway, key, count=1, timeout=5.0):
    """The usage rows of one key, oldest first (waits for count rows)."""
    return gateway.wait_rows(
        count, "select * from usage where key_id = ? order by id",
        (key["id"],), timeout=timeout)


def chat(gateway, key, model="gpt-4o-mini"):
    """POST a one-message /v1/chat/completions; (status, headers, body)."""
    return gateway.request("POST", "/v1/chat/completions",
                           {"model": model,
                            "messages": [{"role": "user", "content": "hi"}]},
                           key=key)


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def upstream_server():
    """The one fake upstream of the session (use `upstream` instead)."""
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture
def upstream(upstream_server):
    """The fake upstream, with an empty queue and record for this test."""
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()


@pytest.fixture
def tmp_db(tmp_path):
    """Path (str) of a database file that does not exist yet."""
    return str(tmp_path / "llmgw-test.db")


@pytest.fixture
def tmp_config(tmp_path, upstream):
    """tmp_config(overrides=None, name="llmgw-test.json") -> path (str).

    Writes base_config(upstream) deep-merged with overrides.
    """
    def make(overrides=None, name="llmgw-test.json"):
        config = merge_config(base_config(upstream), overrides)
        return write_config(str(tmp_path / name), config)
    return make


@pytest.fixture
def run_cli(tmp_path):
    """run_cli(*args, input=None, env=None, cwd=tmp_path) -> (rc, out, err).

    Runs `python llmgw.py ARGS` (give --config/--db yourself) in a clean
    environment; env is merged into it.
    """
    def run(*args, **kwargs):
        kwargs.setdefault("cwd", str(tmp_path))
        return run_llmgw(list(args), **kwargs)
    return run


@pytest.fixture
def gateway(tmp_path, upstream):
    """gateway(config=None, env=None, args=(), db_path=None) -> Gateway.

    config is deep-merged into base_config(upstream) (None values delete
    keys, e.g. {"admin_key": None}); env is added to the clean environment;
    args are extra `serve` arguments; db_path reuses a database (e.g. of a
    gateway stopped earlier).  Every gateway is stopped at teardown.
    """
    started = []

    def start(config=None, env=None, args=(), db_path=None,
              ready_timeout=READY_TIMEOUT_S):
        workdir = tmp_path / ("gw%d" % len(started))
        workdir.mkdir()
        merged = merge_config(base_config(upstream), config)
        config_path = write_config(str(workdir / "llmgw.json"), merged)
        db_path = db_path or str(workdir / "llmgw.db")
        gw = Gateway(merged, config_path, db_path, str(workdir), env=env,
                     args=args, ready_timeout=ready_timeout)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1: (cert path, key path)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make a "
                    "test certificate")
    cert = str(tmp_path / "cert.pem")
    key = str(tmp_path / "key.pem")
    proc = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=llmgw",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    return cert, key
