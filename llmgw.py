#!/usr/bin/env python3
"""llmgw: a self-hosted LLM API gateway in one file, standard library only.

Give each project a virtual key; its code keeps using the official OpenAI or
Anthropic SDK with this gateway as base URL. The gateway checks the key, swaps
in the real provider key, streams the answer back untouched and records
tokens, cost and latency per key and project in SQLite.

    python3 llmgw.py serve                 # gateway on 127.0.0.1:8000
    python3 llmgw.py keys create my-app    # a virtual key, shown once

Sections, in order (search for the banner "# ===== NAME"):

    errors        the error types raised everywhere below
    config        built-in providers, the JSON config file, real keys
    storage       SQLite schema, migrations, keys, usage rows, statistics
    pricing       the price table and cost arithmetic
    providers     routing, header rewriting, usage extraction per provider
    limits        budgets, rate limits, allow-lists, the key cache
    upstream      pooled keep-alive connections to providers
    http          connection handling: request parsing, limits, responses
    proxy         the proxy routes
    admin         the admin API
    server        the gateway object, signals, systemd notification
    cli           the command line
    main

Known limits:

- One gateway process per database. Several processes may share a database
  for keys (changes reach a running server within a second), but budget
  spend and rate-limit windows are kept in each process's memory.
- Budgets can be overshot by the cost of requests already admitted when the
  budget was reached (each is charged an estimate at admission).
- Token estimates for streams cut short are rough (about four characters a
  token) and marked as estimated.
- The gateway asks providers for uncompressed responses, so it can read usage.
- A POST that goes out just as a provider closes the idle connection it was
  sent on gets 502 (the SDKs retry it): it is sent again by the gateway only
  with an Idempotency-Key.
- Timeouts towards a provider apply to each read, not to a whole answer.

Security: the gateway holds real provider keys. Only SHA-256 hashes of virtual
keys are stored; secrets never reach the logs. It bounds request size, header
size and count, and the time a client may take to send them, but it is not a
DDoS shield: put it behind a firewall or a reverse proxy when it faces the
internet, and serve TLS (--tls-cert/--tls-key) on any untrusted network.

MIT licence; see LICENSE.
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime as dt
import fnmatch
import hashlib
import hmac
import http.client
import json
import logging
import marshal
import math
import os
import re
import secrets
import select
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.1.0"

log = logging.getLogger("llmgw")

DEFAULT_LISTEN = "127.0.0.1:8000"
DEFAULT_DB = "llmgw.db"
DEFAULT_CONFIG = "llmgw.json"

DEFAULT_LIMITS = {
    "max_body_bytes": 50 * 1024 * 1024,
    "upstream_connect_timeout_s": 10.0,
    "upstream_read_timeout_s": 600.0,
    "header_timeout_s": 10.0,
    "body_timeout_s": 60.0,
    "idle_timeout_s": 30.0,
    "drain_timeout_s": 30.0,
    "max_connections": 1024,
}

MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_COUNT = 100
MAX_HEADER_BYTES = 32 * 1024
# Non-streaming upstream bodies up to this size are read whole to find usage;
# larger ones are relayed in pieces and usage is read from their tail.
MAX_BUFFERED_RESPONSE = 8 * 1024 * 1024
# Failed key attempts from one address within a minute before it gets 429.
MAX_AUTH_FAILURES_PER_MIN = 30
# Header field values may not hold controls but tab (RFC 9110, 5.5); HTTP
# lengths are plain decimal digits.
_BAD_FIELD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# the same in header lines joined by CRLF: any control but tab, or a lone CR
_BAD_HEAD_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")
_DIGITS = re.compile(r"[0-9]+\Z")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
# HTTP versions: any 1.x is read as 1.1 (RFC 9110, section 2.5)
_HTTP_1 = re.compile(r"HTTP/1\.[0-9]\Z")
_HTTP_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]\Z")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime) -> str:
    """Format a UTC time the way the database stores it."""
    t = t.astimezone(dt.timezone.utc)
    # %-formatting: several times faster than strftime, and this is per row
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.microsecond)


def parse_time(text: str, end_of_day: bool = False) -> dt.datetime:
    """Parse YYYY-MM-DD or ISO 8601 (UTC unless an offset is given).

    A bare date means its start, or with end_of_day the last microsecond of
    that UTC day.
    """
    text = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = dt.datetime.strptime(text, "%Y-%m-%d")
            day = day.replace(tzinfo=dt.timezone.utc)
            if end_of_day:
                day += dt.timedelta(days=1, microseconds=-1)
            return day
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            "%r is not a date: use YYYY-MM-DD or an ISO 8601 time such as "
            "2026-01-31T12:00:00Z" % text) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc)


def mask(secret: str | None) -> str:
    """Show a credential as its prefix and last four characters."""
    if not secret:
        return ""
    if len(secret) < 12:
        return "..." + secret[-2:]
    head = secret[:3] if not secret.startswith("sk-gw-") else secret[:6]
    return "%s...%s" % (head, secret[-4:])


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


_LOGFMT_PLAIN = re.compile(r'[^ ="\\]+\Z')


def logfmt(value: object) -> str:
    """A value for a name=value log line, quoted when it holds a space,
    "=", a quote or a backslash (a model name, a path), or is empty."""
    if type(value) is not str or _LOGFMT_PLAIN.match(value):
        return str(value)
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')


def escape_control(value: object) -> str:
    """Make a value safe to put in a one-line log record."""
    text = str(value)
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()), text)


# ===== errors
#
# Every refusal the gateway makes is a GatewayError. One place (the http
# section) turns it into a response in the route's provider format.

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    411: "invalid_request_error",
    413: "request_too_large",
    414: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}

OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """A refusal with an HTTP status, a machine code and a readable message."""

    def __init__(self, status: int, code: str | None, message: str,
                 param: str | None = None, headers: dict | None = None,
                 close: bool = False):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.close = close  # the connection cannot be reused after this


class UsageError(Exception):
    """A command-line or input mistake the user can correct."""


class ConfigError(UsageError):
    """The configuration file cannot be used."""


class StorageUnavailable(Exception):
    """Usage cannot be recorded right now."""


def error_body(err: GatewayError, anthropic: bool) -> bytes:
    """Render an error in the OpenAI or the Anthropic format."""
    if anthropic:
        kind = ANTHROPIC_ERROR_TYPES.get(err.status, "api_error")
        body = {"type": "error", "error": {
            "type": kind, "message": err.message, "code": err.code}}
    else:
        kind = OPENAI_ERROR_TYPES.get(
            err.status,
            "server_error" if err.status >= 500 else "invalid_request_error")
        body = {"error": {"message": err.message, "type": kind,
                          "param": err.param, "code": err.code}}
    return json.dumps(body).encode()


# ===== config
#
# Built-in providers, the JSON config file and real provider keys. Loading a
# config never touches the network or the database.

# name: (type, base_url, environment variables holding its key)
BUILTIN_PROVIDERS = {
    "openai": ("openai", "https://api.openai.com/v1", ("OPENAI_API_KEY",)),
    "anthropic": ("anthropic", "https://api.anthropic.com/v1",
                  ("ANTHROPIC_API_KEY",)),
    "groq": ("openai", "https://api.groq.com/openai/v1", ("GROQ_API_KEY",)),
    "mistral": ("openai", "https://api.mistral.ai/v1", ("MISTRAL_API_KEY",)),
    "deepseek": ("openai", "https://api.deepseek.com/v1",
                 ("DEEPSEEK_API_KEY",)),
    "openrouter": ("openai", "https://openrouter.ai/api/v1",
                   ("OPENROUTER_API_KEY",)),
    "together": ("openai", "https://api.together.xyz/v1",
                 ("TOGETHER_API_KEY",)),
    "xai": ("openai", "https://api.x.ai/v1", ("XAI_API_KEY",)),
    "gemini": ("openai",
               "https://generativelanguage.googleapis.com/v1beta/openai",
               ("GEMINI_API_KEY", "GOOGLE_API_KEY")),
    "ollama": ("openai", "http://127.0.0.1:11434/v1", ()),
}

# Model name globs that pick a provider when no prefix or `models` glob does.
MODEL_FAMILIES = (
    ("gpt-*", "openai"), ("o1*", "openai"), ("o3*", "openai"),
    ("o4*", "openai"), ("text-embedding-*", "openai"),
    ("chatgpt-*", "openai"), ("omni-moderation-*", "openai"),
    ("dall-e-*", "openai"), ("whisper-*", "openai"), ("tts-*", "openai"),
    ("davinci-*", "openai"), ("babbage-*", "openai"),
    ("claude-*", "anthropic"),
    ("gemini-*", "gemini"),
    ("mistral-*", "mistral"), ("open-mistral-*", "mistral"),
    ("codestral-*", "mistral"), ("ministral-*", "mistral"),
    ("pixtral-*", "mistral"), ("magistral-*", "mistral"),
    ("deepseek-*", "deepseek"),
    ("grok-*", "xai"),
)

PROVIDER_TYPES = ("openai", "anthropic")
CONFIG_FIELDS = ("listen", "database", "admin_key", "default_provider",
                 "providers", "prices", "limits", "log_format", "durability",
                 "_comment")


class Provider:
    """One upstream API: where it is, how to authenticate, which models."""

    def __init__(self, name: str, kind: str, base_url: str,
                 keys: list, models: list):
        self.name = name
        self.type = kind
        self.base_url = base_url.rstrip("/")
        self.keys = [value for value, _ in keys]
        self.key_sources = keys  # (value, "config" | "env:NAME")
        self.models = models
        url = urllib.parse.urlsplit(self.base_url)
        self.scheme = url.scheme
        self.host = url.hostname or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.base_path = url.path.rstrip("/")
        self._next = 0
        self._lock = threading.Lock()

    @property
    def anthropic(self) -> bool:
        return self.type == "anthropic"

    def keys_in_turn(self) -> list:
        """The real keys, starting with the next in round-robin order."""
        if len(self.keys) < 2:
            return list(self.keys) or [None]
        with self._lock:
            start = self._next
            self._next = (start + 1) % len(self.keys)
        return self.keys[start:] + self.keys[:start]


def resolve_secret(value, env) -> tuple:
    """Return (secret or None, source) for a literal or an "env:NAME"."""
    if isinstance(value, str) and value.startswith("env:"):
        name = value[4:]
        return env.get(name) or None, "env:" + name
    return (value or None), "config"


def read_json_file(path: str) -> dict:
    """Read a JSON object, naming the line and column of a syntax error."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("cannot read config file %s: %s"
                          % (path, e.strerror or e)) from None
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise ConfigError("config file %s is not valid JSON: %s at line %d "
                          "column %d" % (path, e.msg, e.lineno, e.colno)) \
            from None
    if not isinstance(data, dict):
        raise ConfigError("config file %s must hold a JSON object, not %s"
                          % (path, type(data).__name__))
    return data


def check_base_url(name: str, url) -> str | None:
    """Return a problem with a provider's base_url, or None."""
    if not isinstance(url, str) or not url:
        return "provider %r needs a base_url string" % name
    parts = urllib.parse.urlsplit(url)
    # shown without query, fragment or credentials: they may hold secrets
    shown = (parts.scheme + "://" if parts.scheme else "") + \
        (parts.netloc + parts.path).rpartition("@")[2]
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ("provider %r has base_url %r: it must be an http:// or "
                "https:// URL with a host" % (name, shown))
    if parts.query or parts.fragment or "@" in parts.netloc:
        return ("provider %r has a base_url (%s) that carries a query, a "
                "fragment or credentials: remove them" % (name, shown))
    try:
        parts.port
    except ValueError:
        return "provider %r has base_url %r with a bad port" % (name, shown)
    return None


class Config:
    """The effective configuration: file values over built-in defaults."""

    def __init__(self, data: dict | None = None, path: str | None = None,
                 env=None):
        self.data = data or {}
        self.path = path
        self.env = os.environ if env is None else env
        self.problems = []  # fatal: the gateway would misbehave
        self.warnings = []
        self._model_routes = {}
        self._build()

    @classmethod
    def load(cls, path: str | None, env=None) -> "Config":
        """Load `path`, or $LLMGW_CONFIG, or ./llmgw.json, or defaults."""
        env = os.environ if env is None else env
        if path is None:
            path = env.get("LLMGW_CONFIG") or None
            if path is None and os.path.exists(DEFAULT_CONFIG):
                path = DEFAULT_CONFIG
        data = read_json_file(path) if path else {}
        return cls(data, path, env)

    def _build(self) -> None:
        data, problems = self.data, self.problems
        for field in data:
            if field not in CONFIG_FIELDS:
                self.warnings.append("unknown field %r is ignored" % field)
        self.listen = str(data.get("listen") or DEFAULT_LISTEN)
        if not re.fullmatch(r"\[?[^\s\]]*\]?:\d{1,5}", self.listen):
            problems.append("listen %r must be HOST:PORT" % self.listen)
        self.database = data.get("database")
        admin = data.get("admin_key")
        self.admin_key, self.admin_key_source = resolve_secret(admin, self.env)
        if admin is None:
            self.admin_key, self.admin_key_source = (
                self.env.get("LLMGW_ADMIN_KEY") or None, "env:LLMGW_ADMIN_KEY")
        self.log_format = data.get("log_format", "text")
        if self.log_format not in ("text", "json"):
            problems.append("log_format must be \"text\" or \"json\", not %r"
                            % self.log_format)
        self.durability = data.get("durability", "normal")
        if self.durability not in ("normal", "full"):
            problems.append("durability must be \"normal\" or \"full\", "
                            "not %r" % self.durability)
        self.limits = dict(DEFAULT_LIMITS)
        limits = data.get("limits") or {}
        if not isinstance(limits, dict):
            problems.append("limits must be an object")
            limits = {}
        for name, value in limits.items():
            if name == "_comment":
                continue
            if name not in DEFAULT_LIMITS:
                self.warnings.append("unknown limit %r is ignored" % name)
            elif (not isinstance(value, (int, float)) or
                  isinstance(value, bool) or value <= 0):
                problems.append("limits.%s must be a positive number, not %r"
                                % (name, value))
            else:
                self.limits[name] = value
        self.prices = data.get("prices") or {}
        if not isinstance(self.prices, dict):
            problems.append("prices must be an object of model -> prices")
            self.prices = {}
        for model, entry in self.prices.items():
            if model == "_comment":
                continue
            problem = check_price_entry(model, entry)
            if problem:
                problems.append(problem)
        self.providers = self._build_providers(data.get("providers") or {})
        self.default_provider = data.get("default_provider", "openai")
        configured = data.get("providers")
        # a configured provider that is broken has had its problem reported
        if self.default_provider not in self.providers and not (
                isinstance(configured, dict)
                and self.default_provider in configured):
            problems.append("default_provider %r is not a configured provider"
                            % self.default_provider)

    def _build_providers(self, configured) -> dict:
        if not isinstance(configured, dict):
            self.problems.append("providers must be an object")
            configured = {}
        providers = {}
        names = list(BUILTIN_PROVIDERS) + [
            n for n in configured if n not in BUILTIN_PROVIDERS]
        for name in names:
            if name == "_comment":
                continue
            kind, base_url, env_names = BUILTIN_PROVIDERS.get(
                name, (None, None, ()))
            entry = configured.get(name) or {}
            if not isinstance(entry, dict):
                self.problems.append("provider %r must be an object" % name)
                continue
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                self.problems.append(
                    "provider name %r may only hold letters, digits, '.', "
                    "'_' and '-'" % name)
                continue
            kind = entry.get("type", kind or "openai")
            if kind not in PROVIDER_TYPES:
                self.problems.append(
                    "provider %r has unknown type %r: use \"openai\" or "
                    "\"anthropic\"" % (name, kind))
                continue
            base_url = entry.get("base_url", base_url)
            problem = check_base_url(name, base_url)
            if problem:
                self.problems.append(problem)
                continue
            raw_keys = entry.get("api_keys")
            if raw_keys is None:
                raw_keys = entry.get("api_key")
            if raw_keys is None:
                # the first of the provider's variables that is set
                found = [n for n in env_names if self.env.get(n)]
                raw_keys = ["env:" + n for n in (found or env_names)[:1]]
            if isinstance(raw_keys, str):
                raw_keys = [raw_keys]
            if not isinstance(raw_keys, list):
                self.problems.append("provider %r: api_keys must be a list"
                                     % name)
                continue
            keys = []
            for raw in raw_keys:
                secret, source = resolve_secret(raw, self.env)
                if secret is not None and not isinstance(secret, str):
                    self.problems.append("provider %r: api_keys must be "
                                         "strings" % name)
                    continue
                secret = secret.strip() if secret else secret
                if secret and not re.fullmatch(r"[\x21-\x7e]+", secret):
                    # it goes into a header line as it is
                    problem = ("provider %r: the key from %s holds spaces or"
                               " characters a header cannot carry"
                               % (name, source))
                    if name in configured:
                        self.problems.append(problem)
                    else:
                        self.warnings.append(problem + "; it is not used")
                elif secret:
                    keys.append((secret, source))
                elif name in configured and raw:
                    self.warnings.append("provider %r: %s is not set"
                                         % (name, source))
            models = entry.get("models") or []
            if isinstance(models, str):
                models = [m.strip() for m in models.split(",") if m.strip()]
            providers[name] = Provider(name, kind, base_url, keys, models)
        return providers

    def provider_for_model(self, model: str) -> Provider | None:
        """The provider by `models` globs, then families, then default."""
        found = self._model_routes.get(model, False)
        if found is not False:
            return found
        found = None
        for provider in self.providers.values():
            if any(fnmatch.fnmatchcase(model, g) for g in provider.models):
                found = provider
                break
        if found is None and "/" not in model:
            for glob, name in MODEL_FAMILIES:
                if fnmatch.fnmatchcase(model, glob) and \
                        name in self.providers:
                    found = self.providers[name]
                    break
            else:
                found = self.providers.get(self.default_provider)
        if len(self._model_routes) < 10000:
            self._model_routes[model] = found
        return found

    def masked(self) -> dict:
        """The effective configuration with every secret masked."""
        out = {
            "config_file": self.path,
            "listen": self.listen,
            "database": self.database,
            "admin_key": mask(self.admin_key) or None,
            "default_provider": self.default_provider,
            "providers": {},
            "prices": self.prices,
            "limits": self.limits,
            "log_format": self.log_format,
            "durability": self.durability,
        }
        for p in self.providers.values():
            out["providers"][p.name] = {
                "type": p.type, "base_url": p.base_url,
                "api_keys": [mask(k) for k in p.keys], "models": p.models}
        return out


def write_private_file(path: str, text: str) -> None:
    """Write a file readable by its owner only, replacing it atomically."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ===== storage
#
# SQLite: the schema and its migrations, virtual keys, usage rows and the
# statistics built from them. Knows nothing of HTTP.

# Each migration runs in one transaction together with the user_version
# that records it. A shipped migration is never edited; add a new one.
MIGRATIONS = (
    # 1: virtual keys and usage rows
    (
        """CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            secret_hash TEXT NOT NULL UNIQUE,
            project TEXT NOT NULL,
            name TEXT,
            budget_usd REAL,
            budget_period TEXT,
            rpm INTEGER,
            tpm INTEGER,
            models TEXT,
            expires_at TEXT,
            created_at TEXT NOT NULL,
            revoked_at TEXT,
            rotated_at TEXT)""",
        """CREATE TABLE usage (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            request_id TEXT,
            key_id TEXT,
            project TEXT,
            provider TEXT,
            model TEXT,
            route TEXT,
            status INTEGER,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            cached_input_tokens INTEGER NOT NULL DEFAULT 0,
            cache_write_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL,
            ttfb_ms REAL,
            latency_ms REAL,
            streamed INTEGER NOT NULL DEFAULT 0,
            estimated INTEGER NOT NULL DEFAULT 0,
            upstream_request_id TEXT,
            error TEXT)""",
        "CREATE INDEX usage_ts ON usage (ts)",
    ),
    # 2: a change counter on keys, so a running server notices edits made
    # by another process; spend per key without a table scan
    (
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO meta (name, value) VALUES ('keys_version', 0)",
        """CREATE TRIGGER keys_insert AFTER INSERT ON keys BEGIN
            UPDATE meta SET value = value + 1 WHERE name = 'keys_version';
        END""",
        """CREATE TRIGGER keys_update AFTER UPDATE ON keys BEGIN
            UPDATE meta SET value = value + 1 WHERE name = 'keys_version';
        END""",
        """CREATE TRIGGER keys_delete AFTER DELETE ON keys BEGIN
            UPDATE meta SET value = value + 1 WHERE name = 'keys_version';
        END""",
        "CREATE INDEX usage_key_ts ON usage (key_id, ts)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

USAGE_COLUMNS = (
    "ts", "request_id", "key_id", "project", "provider", "model", "route",
    "status", "input_tokens", "output_tokens", "cached_input_tokens",
    "cache_write_tokens", "reasoning_tokens", "cost_usd", "ttfb_ms",
    "latency_ms", "streamed", "estimated", "upstream_request_id", "error")
INSERT_USAGE = "INSERT INTO usage (%s) VALUES (%s)" % (
    ", ".join(USAGE_COLUMNS), ", ".join("?" * len(USAGE_COLUMNS)))

KEY_COLUMNS = ("id", "project", "name", "budget_usd", "budget_period", "rpm",
               "tpm", "models", "expires_at", "created_at", "revoked_at",
               "rotated_at")
BUDGET_PERIODS = ("day", "week", "month", "total")


def connect(path: str, durability: str = "normal",
            busy_timeout_s: float = 5.0) -> sqlite3.Connection:
    """Open the database, creating it (mode 0600) and migrating it."""
    if path != ":memory:" and not os.path.exists(path):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        # SQLite gives its -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, timeout=busy_timeout_s,
                         isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    # WAL lets readers (auth, stats) go on while a usage row is written.
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal" and path != ":memory:":
        log.warning("database %s is not in WAL mode (%s)", path, mode)
    # NORMAL survives a process crash in WAL mode; FULL also a power loss.
    db.execute("PRAGMA synchronous=%s"
               % ("FULL" if durability == "full" else "NORMAL"))
    # Keep the WAL file from staying large after a checkpoint.
    db.execute("PRAGMA journal_size_limit=67108864")
    migrate(db)
    return db


def migrate(db: sqlite3.Connection) -> int:
    """Bring the schema up to SCHEMA_VERSION; return the version found."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise UsageError(
            "the database was made by a newer llmgw (schema %d, this one "
            "knows %d): upgrade llmgw.py" % (found, SCHEMA_VERSION))
    for number in range(found + 1, SCHEMA_VERSION + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            # another process may have migrated while we waited for the lock
            if db.execute("PRAGMA user_version").fetchone()[0] >= number:
                db.execute("ROLLBACK")
                continue
            for statement in MIGRATIONS[number - 1]:
                db.execute(statement)
            db.execute("PRAGMA user_version=%d" % number)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return found


def new_key_secret() -> str:
    return "sk-gw-" + secrets.token_urlsafe(32)


def key_row_to_dict(row) -> dict:
    """A key as the CLI and the admin API show it (never the hash)."""
    out = {name: row[name] for name in KEY_COLUMNS}
    out["models"] = json.loads(out["models"]) if out["models"] else []
    return out


class Store:
    """Keys, usage queries and statistics on one SQLite connection."""

    def __init__(self, path: str, durability: str = "normal"):
        self.path = path
        self.db = connect(path, durability)
        self.lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def query(self, sql: str, args=()) -> list:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def write(self, sql: str, args=()) -> int:
        with self.lock:
            return self.db.execute(sql, args).rowcount

    # keys

    def create_key(self, fields: dict) -> tuple:
        """Insert a key; return (key dict, secret). The secret is not kept."""
        secret = new_key_secret()
        created = iso(utcnow())
        for _ in range(5):
            key_id = "key_" + secrets.token_hex(4)
            try:
                self.write(
                    "INSERT INTO keys (id, secret_hash, project, name, "
                    "budget_usd, budget_period, rpm, tpm, models, "
                    "expires_at, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (key_id, hash_secret(secret),
                     fields["project"], fields.get("name"),
                     fields.get("budget_usd"), fields.get("budget_period"),
                     fields.get("rpm"), fields.get("tpm"),
                     json.dumps(fields.get("models") or []),
                     fields.get("expires_at"), created))
                return self.get_key(key_id), secret
            except sqlite3.IntegrityError as e:
                if "keys.id" not in str(e):
                    raise
                continue  # an id collision: draw another
        raise RuntimeError("could not draw a unique key id")

    def get_key(self, key_id: str) -> dict | None:
        rows = self.query("SELECT * FROM keys WHERE id = ?", (key_id,))
        return key_row_to_dict(rows[0]) if rows else None

    def list_keys(self, project: str | None = None,
                  include_all: bool = False) -> list:
        sql, args = "SELECT * FROM keys WHERE 1", []
        if project is not None:
            sql += " AND project = ?"
            args.append(project)
        if not include_all:
            sql += " AND revoked_at IS NULL AND (expires_at IS NULL OR " \
                   "expires_at > ?)"
            args.append(iso(utcnow()))
        rows = self.query(sql + " ORDER BY created_at, id", args)
        return [key_row_to_dict(r) for r in rows]

    def update_key(self, key_id: str, changes: dict) -> dict | None:
        if changes:
            if "models" in changes:
                changes = dict(changes, models=json.dumps(
                    changes["models"] or []))
            names = ", ".join("%s = ?" % n for n in changes)
            if changes.get("budget_usd") is not None and \
                    "budget_period" not in changes:
                names += ", budget_period = COALESCE(budget_period, 'month')"
            self.write("UPDATE keys SET %s WHERE id = ?" % names,
                       list(changes.values()) + [key_id])
        return self.get_key(key_id)

    def revoke_key(self, key_id: str) -> dict | None:
        self.write("UPDATE keys SET revoked_at = ? WHERE id = ? AND "
                   "revoked_at IS NULL", (iso(utcnow()), key_id))
        return self.get_key(key_id)

    def rotate_key(self, key_id: str) -> tuple:
        secret = new_key_secret()
        count = self.write(
            "UPDATE keys SET secret_hash = ?, rotated_at = ? WHERE id = ?",
            (hash_secret(secret), iso(utcnow()), key_id))
        return (self.get_key(key_id), secret) if count else (None, None)

    def keys_version(self) -> int:
        return self.query(
            "SELECT value FROM meta WHERE name = 'keys_version'")[0][0]

    def all_keys(self) -> list:
        return self.query("SELECT * FROM keys")

    # spend

    def spend(self, key_id: str, since: str | None = None) -> float:
        """USD spent by a key since an ISO time (or ever)."""
        if since is None:
            rows = self.query("SELECT SUM(cost_usd) FROM usage "
                              "WHERE key_id = ?", (key_id,))
        else:
            rows = self.query("SELECT SUM(cost_usd) FROM usage "
                              "WHERE key_id = ? AND ts >= ?", (key_id, since))
        return rows[0][0] or 0.0

    def with_spend(self, key: dict, now: dt.datetime | None = None) -> dict:
        """Add spend this period and in total to a key dict."""
        start = period_start(key["budget_period"] or "total",
                             now or utcnow())
        total = self.spend(key["id"])
        key["spend_total_usd"] = round(total, 6)
        key["spend_period_usd"] = round(
            self.spend(key["id"], iso(start)) if start else total, 6)
        key["period_start"] = iso(start) if start else None
        if key["budget_usd"] is not None:
            key["budget_remaining_usd"] = round(
                max(0.0, key["budget_usd"] - key["spend_period_usd"]), 6)
        return key

    # usage

    def usage_rows(self, since: str | None = None, after_id: int = 0,
                   limit: int = 1000, until: str | None = None) -> list:
        sql, args = "SELECT * FROM usage WHERE id > ?", [after_id]
        if since:
            sql += " AND ts >= ?"
            args.append(since)
        if until:
            sql += " AND ts <= ?"
            args.append(until)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        return [dict(r) for r in self.query(sql, args)]

    def stats(self, by: str = "project", since: str | None = None,
              until: str | None = None, project: str | None = None,
              key_id: str | None = None, model: str | None = None) -> list:
        """Aggregate usage rows by one dimension."""
        group = STATS_GROUPS[by]
        where, args = ["1"], []
        for column, value in (("project", project), ("key_id", key_id),
                              ("model", model)):
            if value is not None:
                where.append("%s = ?" % column)
                args.append(value)
        if since:
            where.append("ts >= ?")
            args.append(since)
        if until:
            where.append("ts <= ?")
            args.append(until)
        sql = STATS_SQL % (group, " AND ".join(where))
        rows = self.query(sql, args)
        out = []
        for r in rows:
            item = dict(r)
            if item["cost_usd"] is not None or not item["unpriced"]:
                item["cost_usd"] = round(item["cost_usd"] or 0.0, 6)
            # else: only unpriced requests, whose cost is unknown, not 0
            item["avg_latency_ms"] = round(item["avg_latency_ms"] or 0.0, 1)
            out.append(item)
        return out


STATS_GROUPS = {
    "project": "project", "key": "key_id", "model": "model",
    "provider": "provider", "day": "substr(ts, 1, 10)",
}
# Unpriced rows (a model with no price that used tokens) are counted apart
# and never added to cost as zero.
STATS_SQL = """
SELECT %s AS grp,
       COUNT(*) AS requests,
       SUM(status >= 400 OR error IS NOT NULL) AS errors,
       SUM(input_tokens) AS input_tokens,
       SUM(cached_input_tokens) AS cached_input_tokens,
       SUM(cache_write_tokens) AS cache_write_tokens,
       SUM(output_tokens) AS output_tokens,
       SUM(reasoning_tokens) AS reasoning_tokens,
       SUM(cost_usd) AS cost_usd,
       SUM(cost_usd IS NULL AND input_tokens + output_tokens
           + cached_input_tokens + cache_write_tokens > 0) AS unpriced,
       SUM(estimated) AS estimated,
       AVG(latency_ms) AS avg_latency_ms
FROM usage WHERE %s GROUP BY grp ORDER BY grp"""


def period_start(period: str, now: dt.datetime) -> dt.datetime | None:
    """Start of the UTC calendar period holding `now` (None for total)."""
    day = now.astimezone(dt.timezone.utc).replace(
        hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":  # ISO weeks start on Monday
        return day - dt.timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    return None


def period_end(period: str, now: dt.datetime) -> dt.datetime | None:
    """Start of the next period: when a spent budget is fresh again."""
    start = period_start(period, now)
    if start is None:
        return None
    if period == "day":
        return start + dt.timedelta(days=1)
    if period == "week":
        return start + dt.timedelta(days=7)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


class UsageLog:
    """Write usage rows with group commit.

    A request thread that records a row either finds a commit in progress
    and waits for it to end, or becomes the writer and commits every row
    queued so far in one transaction. No thread waits for more than one
    commit ahead of its own.

    When the database cannot be written (full disk, read-only file, a lock
    held too long), rows stay queued in memory and are written by the next
    commit that succeeds; meanwhile `healthy` is false and the gateway
    refuses new billable requests.
    """

    MAX_BACKLOG = 100000  # rows kept while the database cannot be written
    PATIENCE_S = 10.0     # how long a request waits for a sick database

    def __init__(self, path: str, durability: str = "normal"):
        self.db = connect(path, durability, busy_timeout_s=2.0)
        # checkpoints are the housekeeping thread's job (see Gateway)
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.cond = threading.Condition()
        self.pending = []
        self.writing = False
        self.healthy = True
        self.last_attempt = 0.0

    def record(self, row: tuple, wait: bool = True) -> bool:
        """Commit one row; True once it is committed.

        With wait=False the row is only queued for the next commit. When
        the database keeps failing, give up after PATIENCE_S and return
        False: the row stays queued and is written once the database
        recovers.
        """
        with self.cond:
            if len(self.pending) >= self.MAX_BACKLOG:
                log.error("usage backlog full: a row is lost")
                return False
            self.pending.append(row)
            if not wait:
                return False
        deadline = time.monotonic() + self.PATIENCE_S
        while True:
            with self.cond:
                while self.writing:
                    self.cond.wait()
                if not any(r is row for r in self.pending):
                    return True  # another thread's commit carried it
                rows = self._take()
            if self._finish(rows):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def amend(self, row: tuple, new_row: tuple) -> None:
        """Replace a row still waiting to be written."""
        with self.cond:
            for i, queued in enumerate(self.pending):
                if queued is row:
                    self.pending[i] = new_row
                    return

    def flush(self, probe: bool = True) -> bool:
        """Commit whatever is queued (at shutdown, and to probe the disk).

        With probe=False and nothing queued, do nothing.
        """
        with self.cond:
            while self.writing:
                self.cond.wait()
            if not self.pending and not probe:
                return True
            rows = self._take()
        return self._finish(rows)

    def _take(self) -> list:
        """Become the only writer and take the queued rows (lock held)."""
        self.writing = True
        rows, self.pending = self.pending, []
        return rows

    def _finish(self, rows: list) -> bool:
        ok = False
        try:
            ok = self._write(rows) if rows else self._probe()
        finally:
            self._release(rows, ok)
        return ok

    def _release(self, rows: list, ok: bool) -> None:
        with self.cond:
            self.writing = False
            if not ok:
                self.pending[:0] = rows  # kept for the next commit
            self.cond.notify_all()

    def _insert(self, rows: list) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(INSERT_USAGE, rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _write(self, rows: list) -> bool:
        self.last_attempt = time.monotonic()
        try:
            try:
                self._insert(rows)
            except (ValueError, OverflowError, TypeError):
                # a value SQLite cannot store: write the others, log it
                for row in rows:
                    try:
                        self._insert([row])
                    except (ValueError, OverflowError, TypeError) as e:
                        log.error("usage row of request %s cannot be "
                                  "stored and is lost: %s", row[1], e)
        except sqlite3.Error as e:
            if self.healthy:
                log.error("cannot record usage (%s): refusing billable "
                          "requests until the database is writable", e)
            self.healthy = False
            return False
        if not self.healthy:
            log.warning("usage recording works again")
        self.healthy = True
        return True

    def available(self) -> bool:
        """Can new billable requests be recorded? Retries once a second."""
        if self.healthy:
            return True
        if time.monotonic() - self.last_attempt >= 1.0:
            self.flush()
        return self.healthy

    def _probe(self) -> bool:
        """Check that the database takes a write."""
        self.last_attempt = time.monotonic()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("UPDATE meta SET value = value "
                                "WHERE name = 'keys_version'")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error:
            self.healthy = False
            return False
        self.healthy = True
        return True

    def close(self) -> None:
        self.flush()
        self.db.close()


# ===== pricing
#
# Turns token counts into USD. Pure arithmetic: no I/O.

PRICES_CHECKED = "2026-12-03"

# model: (input, cached input, output, cache write), USD per million tokens.
# None for cached input or cache write means the provider bills those tokens
# at the input price.
BUILTIN_PRICES = {
    # OpenAI
    "gpt-4o": (2.50, 1.25, 10.00, None),
    "gpt-4o-mini": (0.15, 0.075, 0.60, None),
    "gpt-4.1": (2.00, 0.50, 8.00, None),
    "gpt-4.1-mini": (0.40, 0.10, 1.60, None),
    "gpt-4.1-nano": (0.10, 0.025, 0.40, None),
    "o1": (15.00, 7.50, 60.00, None),
    "o3-mini": (1.10, 0.55, 4.40, None),
    "o4-mini": (1.10, 0.275, 4.40, None),
    "o3": (2.00, 0.50, 8.00, None),
    "gpt-5": (1.25, 0.125, 10.00, None),
    "gpt-5-mini": (0.25, 0.025, 2.00, None),
    "gpt-5-nano": (0.05, 0.005, 0.40, None),
    "gpt-5.1": (1.25, 0.125, 10.00, None),
    "gpt-5.2": (1.75, 0.175, 14.00, None),
    "gpt-5.4": (2.50, 0.25, 15.00, None),
    "gpt-5.4-mini": (0.75, 0.075, 4.50, None),
    "gpt-5.4-nano": (0.20, 0.02, 1.25, None),
    "gpt-5.5": (5.00, 0.50, 30.00, None),
    "gpt-5.5-pro": (30.00, None, 180.00, None),
    "gpt-5.6-sol": (4.00, 0.40, 20.00, 5.00),
    "gpt-5.6": (4.00, 0.40, 20.00, 5.00),
    "gpt-5.6-terra": (2.00, 0.20, 12.00, 2.50),
    "gpt-5.6-luna": (0.20, 0.02, 1.20, 0.25),
    "gpt-6-astra": (10.00, 1.00, 50.00, 12.50),
    "gpt-6-sol": (2.00, 0.20, 10.00, 2.50),
    "gpt-6-luna": (0.10, 0.01, 0.50, 0.125),
    "gpt-6.1-sol": (2.00, 0.10, 10.00, 2.50),
    "gpt-6.1-terra": (1.00, 0.05, 5.00, 1.25),
    "text-embedding-3-small": (0.02, None, 0.00, None),
    "text-embedding-3-large": (0.13, None, 0.00, None),
    # Anthropic (cache write: the 5-minute cache)
    "claude-opus-4-1": (15.00, 1.50, 75.00, 18.75),
    "claude-opus-4": (15.00, 1.50, 75.00, 18.75),
    "claude-sonnet-4": (3.00, 0.30, 15.00, 3.75),
    "claude-3-7-sonnet": (3.00, 0.30, 15.00, 3.75),
    "claude-3-5-haiku": (0.80, 0.08, 4.00, 1.00),
    "claude-sonnet-4-5": (3.00, 0.30, 15.00, 3.75),
    "claude-haiku-4-5": (1.00, 0.10, 5.00, 1.25),
    "claude-opus-4-5": (5.00, 0.50, 25.00, 6.25),
    "claude-opus-4-6": (5.00, 0.50, 25.00, 6.25),
    "claude-opus-4-7": (5.00, 0.50, 25.00, 6.25),
    "claude-opus-4-8": (5.00, 0.50, 25.00, 6.25),
    "claude-sonnet-4-6": (3.00, 0.30, 15.00, 3.75),
    "claude-opus-5": (5.00, 0.50, 25.00, 6.25),
    "claude-opus-5-5": (4.00, 0.20, 20.00, 5.00),
    "claude-sonnet-5": (2.00, 0.20, 10.00, 2.50),
    "claude-sonnet-5-5": (2.00, 0.10, 10.00, 2.50),
    "claude-haiku-5-5": (0.10, 0.01, 0.50, 0.125),
    "claude-fable-5": (10.00, 1.00, 50.00, 12.50),
    "claude-fable-5-1": (10.00, 0.25, 50.00, 12.50),
    "claude-fable-5-2": (8.00, 0.20, 40.00, 10.00),
    # Google Gemini
    "gemini-2.5-pro": (1.25, 0.125, 10.00, None),
    "gemini-2.5-flash": (0.30, 0.03, 2.50, None),
    "gemini-2.5-flash-lite": (0.10, 0.01, 0.40, None),
    "gemini-3.1-pro-preview": (2.00, 0.20, 12.00, None),
    "gemini-3.5-flash": (1.50, 0.15, 9.00, None),
    "gemini-3.5-flash-lite": (0.30, 0.03, 2.50, None),
    "gemini-3.8-flash": (0.75, 0.075, 3.75, None),
    # Mistral
    "mistral-large-latest": (0.50, 0.05, 1.50, None),
    "mistral-large-2512": (0.50, 0.05, 1.50, None),
    "mistral-large-4": (0.68, 0.07, 2.09, None),
    "mistral-medium-latest": (1.50, 0.15, 7.50, None),
    "mistral-medium-3.5": (1.50, 0.15, 7.50, None),
    "mistral-small-latest": (0.15, 0.015, 0.60, None),
    "codestral-latest": (0.30, 0.03, 0.90, None),
    # DeepSeek (peak-hour rates; off-peak is half)
    "deepseek-flash": (0.30, 0.006, 1.20, None),
    "deepseek-v4-flash": (0.30, 0.006, 1.20, None),
    "deepseek-v4-pro": (1.32, 0.044, 3.96, None),
    # Groq
    "openai/gpt-oss-120b": (0.15, 0.075, 0.60, None),
    "openai/gpt-oss-20b": (0.075, 0.0375, 0.30, None),
    "qwen/qwen3.8-27b": (0.80, None, 4.00, None),
    "llama-3.3-70b-versatile": (0.59, None, 0.79, None),
    "llama-3.1-8b-instant": (0.05, None, 0.08, None),
}

# model: (prompt tokens above which it applies, input, cached input, output,
# cache write). The whole request is billed at the higher tier.
LONG_PROMPT_PRICES = {
    "claude-sonnet-4": (200000, 6.00, 0.60, 22.50, 7.50),
    "claude-sonnet-4-5": (200000, 6.00, 0.60, 22.50, 7.50),
    "claude-haiku-5-5": (100000, 0.50, 0.05, 2.50, 0.625),
    "gemini-2.5-pro": (200000, 2.50, 0.25, 15.00, None),
    "gemini-3.1-pro-preview": (200000, 4.00, 0.40, 18.00, None),
    "gpt-5.4": (272000, 5.00, 0.50, 22.50, None),
    "gpt-5.5": (272000, 10.00, 1.00, 45.00, None),
    "gpt-5.6-sol": (272000, 8.00, 0.80, 30.00, 10.00),
    "gpt-5.6": (272000, 8.00, 0.80, 30.00, 10.00),
    "gpt-5.6-terra": (272000, 4.00, 0.40, 18.00, 5.00),
    "gpt-5.6-luna": (272000, 0.40, 0.04, 1.80, 0.50),
    "gpt-6-astra": (272000, 20.00, 2.00, 75.00, 25.00),
    "gpt-6-sol": (272000, 4.00, 0.40, 15.00, 5.00),
    "gpt-6-luna": (272000, 0.20, 0.02, 0.75, 0.25),
    "gpt-6.1-sol": (272000, 4.00, 0.20, 15.00, 5.00),
    "gpt-6.1-terra": (272000, 2.00, 0.10, 7.50, 2.50),
}

PRICE_FIELDS = ("input", "cached_input", "output", "cache_write")
_VERSION_SUFFIX = re.compile(
    r"(-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{4}|-0|-latest|-preview(-\d{2}-\d{2})?)$")


def check_price_entry(model: str, entry) -> str | None:
    """Return a problem with a config `prices` entry, or None."""
    if not isinstance(entry, dict):
        return "prices.%s must be an object such as {\"input\": 3.0, " \
               "\"output\": 12.0}" % model
    for name, value in entry.items():
        if name == "_comment":
            continue
        if name not in PRICE_FIELDS:
            return "prices.%s has unknown field %r (known: %s)" % (
                model, name, ", ".join(PRICE_FIELDS))
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or value < 0):
            return "prices.%s.%s must be a number of USD per million " \
                   "tokens, not %r" % (model, name, value)
    if "input" not in entry or "output" not in entry:
        return "prices.%s needs both \"input\" and \"output\"" % model
    return None


class PriceTable:
    """Built-in prices with the config's overrides on top."""

    def __init__(self, overrides: dict | None = None):
        self.prices = dict(BUILTIN_PRICES)
        self.long = dict(LONG_PROMPT_PRICES)
        self.sources = {m: "built-in" for m in self.prices}
        for model, entry in (overrides or {}).items():
            if model == "_comment" or check_price_entry(model, entry):
                continue
            self.prices[model] = (entry["input"], entry.get("cached_input"),
                                  entry["output"], entry.get("cache_write"))
            self.long.pop(model, None)
            self.sources[model] = "config"
        self._cache = {}

    def lookup(self, model: str | None) -> str | None:
        """The price table entry that applies to `model`, or None."""
        if not model:
            return None
        found = self._cache.get(model, False)
        if found is not False:
            return found
        found = None
        name = model
        for candidate in (model, model.rsplit("/", 1)[-1]):
            name = candidate
            while name:
                if name in self.prices:
                    found = name
                    break
                shorter = _VERSION_SUFFIX.sub("", name)
                if shorter == name:
                    break
                name = shorter
            if found:
                break
        if len(self._cache) < 10000:
            self._cache[model] = found
        return found

    def cost(self, model: str | None, usage: "Usage") -> float | None:
        """USD for one request's tokens, or None when the model is unpriced."""
        entry = self.lookup(model)
        if entry is None:
            return None
        price_in, price_cached, price_out, price_write = self.prices[entry]
        long = self.long.get(entry)
        prompt = usage.input + usage.cached + usage.cache_write
        if long and prompt > long[0]:
            price_in, price_cached, price_out, price_write = long[1:]
        if price_cached is None:
            price_cached = price_in
        if price_write is None:
            price_write = price_in
        return (usage.input * price_in + usage.cached * price_cached +
                usage.cache_write * price_write +
                usage.output * price_out) / 1e6

    def rows(self, model: str | None = None) -> list:
        """The table as dicts, for `prices` and `/v1/models`."""
        names = sorted(self.prices)
        if model:
            entry = self.lookup(model)
            names = [entry] if entry else []
        out = []
        for name in names:
            price_in, cached, price_out, write = self.prices[name]
            item = {"model": name, "input": price_in, "cached_input": cached,
                    "output": price_out, "cache_write": write,
                    "source": self.sources[name]}
            long = self.long.get(name)
            if long:
                item["long_prompt"] = dict(zip(
                    ("above_tokens", "input", "cached_input", "output",
                     "cache_write"), long))
            out.append(item)
        return out


# ===== providers
#
# Which provider serves a request, what headers it gets, and how many
# tokens each kind of response reports. Parses; does no I/O.

# Request headers a client may pass on to a provider; all others are
# dropped. Credentials are never on this list.
FORWARD_HEADERS = frozenset((
    "content-type", "accept", "user-agent", "openai-beta",
    "idempotency-key", "x-request-id", "x-client-request-id",
    "accept-language",
))
FORWARD_PREFIXES = ("anthropic-", "x-stainless-")
# Response headers that are about this hop, or that we set ourselves.
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "content-length", "set-cookie", "server", "date", "alt-svc",
    "proxy-connection",
))
CLIENT_KEY_HEADERS = ("authorization", "x-api-key", "api-key",
                      "x-goog-api-key")
# Paths whose JSON body must name a model.
MODEL_PATHS = frozenset(("/chat/completions", "/completions", "/responses",
                         "/embeddings", "/messages",
                         "/messages/count_tokens"))
# encoded slashes, backslashes, dots and control characters, raw or encoded
_BAD_PATH = re.compile(
    r"%2f|%5c|\\|%2e|%[01][0-9a-f]|%7f|[\x00-\x20\x7f]", re.I)
_BAD_QUERY = re.compile(r"%[01][0-9a-f]|%7f|[\x00-\x20\x7f]", re.I)
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                        "0123456789-_~")  # and ".", refused encoded


def _unescape_unreserved(match) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0)


class Usage:
    """Token counts in the stored convention: no token counted twice.

    input excludes cached and cache-write tokens; output includes reasoning
    tokens (reasoning is kept apart for information only).
    """

    __slots__ = ("input", "output", "cached", "cache_write", "reasoning",
                 "estimated", "reported")

    def __init__(self):
        self.input = self.output = self.cached = 0
        self.cache_write = self.reasoning = 0
        self.estimated = False
        self.reported = False

    def total(self) -> int:
        return self.input + self.output + self.cached + self.cache_write


def _int(value) -> int:
    """A token count from a provider, or 0 for anything implausible."""
    return value if isinstance(value, int) and 0 < value < 2 ** 53 else 0


def usage_from(data, anthropic: bool, usage: Usage | None = None) -> Usage:
    """Read a provider's usage object into the stored convention.

    OpenAI's prompt_tokens (chat) and input_tokens (Responses API) include
    cached tokens; Anthropic's input_tokens excludes cache reads and
    writes. Anthropic's streamed message_delta usage is cumulative, so
    fields present in a later object replace earlier ones.
    """
    usage = usage or Usage()
    if not isinstance(data, dict):
        return usage
    usage.reported = True
    if anthropic or "cache_read_input_tokens" in data or \
            "cache_creation_input_tokens" in data:
        if "input_tokens" in data:
            usage.input = _int(data["input_tokens"])
        if "output_tokens" in data:
            usage.output = _int(data["output_tokens"])
        if "cache_read_input_tokens" in data:
            usage.cached = _int(data["cache_read_input_tokens"])
        if "cache_creation_input_tokens" in data:
            usage.cache_write = _int(data["cache_creation_input_tokens"])
        return usage
    if "prompt_tokens" in data:  # chat, completions, embeddings
        details = data.get("prompt_tokens_details") or {}
        prompt = _int(data.get("prompt_tokens"))
        output = _int(data.get("completion_tokens"))
        out_details = data.get("completion_tokens_details") or {}
    else:  # the Responses API
        details = data.get("input_tokens_details") or {}
        prompt = _int(data.get("input_tokens"))
        output = _int(data.get("output_tokens"))
        out_details = data.get("output_tokens_details") or {}
    cached = _int(details.get("cached_tokens")) if isinstance(
        details, dict) else 0
    usage.cached = min(cached, prompt)
    usage.input = prompt - usage.cached
    usage.output = output
    if isinstance(out_details, dict):
        usage.reasoning = _int(out_details.get("reasoning_tokens"))
    return usage


def usage_from_body(obj, path_kind: str, anthropic: bool) -> Usage:
    """Usage of a complete (non-streamed) JSON response."""
    if not isinstance(obj, dict):
        return Usage()
    if path_kind == "/messages/count_tokens":
        return Usage()  # counting tokens is free
    return usage_from(obj.get("usage"), anthropic)


def estimate_tokens(chars: int) -> int:
    """Rough tokens for a length of text: about four characters a token."""
    return (chars + 3) // 4


def request_text_chars(obj) -> int:
    """Characters of prompt text in a request body, for estimates."""
    total = 0
    stack = [obj.get(k) for k in ("messages", "input", "prompt", "system",
                                  "instructions", "tools")] \
        if isinstance(obj, dict) else []
    budget = 100000  # values visited at most
    while stack and budget:
        budget -= 1
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_TEXT_FIELD = re.compile(
    rb'"(?:content|text|delta|partial_json|arguments|thinking|refusal)"'
    rb'\s*:\s*"((?:[^"\\]|\\.)*)"')
_RESPONSE_DONE = (b"response.completed", b"response.incomplete",
                  b"response.failed")
# markers read from an event's own lines, never from the text it carries
_OPENAI_DONE = re.compile(rb"^data:\s*\[DONE\]\s*$", re.M)
_ANTHROPIC_EVENT = re.compile(
    rb"^event:\s*(message_start|message_delta|message_stop)\s*$", re.M)


def may_hold_usage_or_end(data: bytes) -> bool:
    """Whether events may be more than text to count: usage, the end of the
    stream or an Anthropic message event. Substring tests first: a pattern
    with alternatives tried at every byte cost several times more, per
    event. A false alarm only sends the events the careful way."""
    return (b'"usage"' in data and _USAGE_OBJECT.search(data) is not None) \
        or b"[DONE]" in data or b"message_" in data \
        or b"response.completed" in data or b"response.incomplete" in data \
        or b"response.failed" in data


MAX_EVENT_BYTES = 16 * 1024 * 1024


def _event_json(event: bytes):
    """The JSON of an SSE event's data lines, or None."""
    data = [line[5:] for line in event.splitlines()
            if line.startswith(b"data:")]
    if not data:
        return None
    try:
        return json.loads(b"\n".join(data))
    except (ValueError, RecursionError):
        return None


class StreamMeter:
    """Follow a server-sent event stream and read its usage.

    feed() takes bytes as they arrive and returns the bytes to pass on. In
    strip mode (the gateway added include_usage for an OpenAI client that
    did not ask for it) complete events are passed on and the usage-only
    chunk is held back; otherwise every byte is passed on as it came.
    """

    def __init__(self, anthropic: bool, responses_api: bool, strip: bool):
        self.anthropic = anthropic
        self.responses_api = responses_api
        self.strip = strip
        self.usage = Usage()
        self.text_chars = 0
        self.buffer = bytearray()
        self.scanned = 0  # how far the buffer was searched for an event end
        self.overflow = False
        self.done = False   # the stream said it was complete
        self.final = False  # the provider's final usage was seen

    def feed(self, data: bytes) -> bytes:
        if self.overflow:
            return data
        if not self.buffer and data.endswith((b"\n\n", b"\r\n\r\n")) \
                and not may_hold_usage_or_end(data):
            # whole events with nothing to account for but their text:
            # the usual case, served without splitting the chunk
            for match in _TEXT_FIELD.finditer(data):
                self.text_chars += len(match.group(1))
            return data
        buf = self.buffer
        buf += data
        out = []
        start = 0
        while True:
            match = _EVENT_END.search(buf, max(start, self.scanned))
            if match is None:
                break
            event = bytes(buf[start:match.end()])
            start = match.end()
            if self._event(event) or not self.strip:
                out.append(event)
        del buf[:start]
        self.scanned = max(0, len(buf) - 3)  # a separator may straddle
        if len(buf) > MAX_EVENT_BYTES:
            # an event too large to follow: pass it on unread
            self.overflow = True
            out.append(bytes(buf))
            del buf[:]
        return b"".join(out) if self.strip else data

    def rest(self) -> bytes:
        """Bytes held back when the stream ends (an unfinished event)."""
        rest = bytes(self.buffer)
        del self.buffer[:]
        if rest:
            self._event(rest)
        return rest if self.strip else b""

    def _event(self, event: bytes) -> bool:
        """Account for one event; return False to hold it back."""
        for match in _TEXT_FIELD.finditer(event):
            self.text_chars += len(match.group(1))
        if self.anthropic:
            found = _ANTHROPIC_EVENT.search(event)
            if found is not None:
                kind = found.group(1)
            elif b'"message_' in event:  # a stream with data: lines only
                obj = _event_json(event)
                kind = obj.get("type") if isinstance(obj, dict) else None
                kind = kind.encode() if isinstance(kind, str) else None
            else:
                return True
            if kind not in (b"message_start", b"message_delta",
                            b"message_stop"):
                return True
            if kind == b"message_stop":
                self.done = True
                return True
            obj = _event_json(event)
            if isinstance(obj, dict):
                if kind == b"message_start":
                    message = obj.get("message")
                    data = message.get("usage") if isinstance(
                        message, dict) else None
                else:  # message_delta: cumulative counts, the last wins
                    data = obj.get("usage")
                    self.final = True
                usage_from(data, True, self.usage)
            return True
        if self.responses_api:
            if any(name in event for name in _RESPONSE_DONE):
                obj = _event_json(event)
                if isinstance(obj, dict) and isinstance(
                        obj.get("response"), dict):
                    usage_from(obj["response"].get("usage"), False,
                               self.usage)
                    self.done = self.final = True
            return True
        if _OPENAI_DONE.search(event):
            self.done = True
            return True
        if _USAGE_OBJECT.search(event):
            obj = _event_json(event)
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                usage_from(obj["usage"], False, self.usage)
                self.final = True
                if self.strip and _EMPTY_CHOICES.search(event):
                    return False
        return True


class Route:
    """Where one request goes: provider, upstream path, error format."""

    __slots__ = ("provider", "path", "query", "kind", "explicit",
                 "anthropic_errors")

    def __init__(self, provider, path, query, explicit, anthropic_errors):
        self.provider = provider      # None until the model picks one
        self.path = path              # the part after the gateway's /v1
        self.query = query
        self.kind = path.rstrip("/")  # e.g. "/chat/completions"
        self.explicit = explicit      # /{provider}/v1/... was used
        self.anthropic_errors = anthropic_errors

    @property
    def anthropic_format(self) -> bool:
        """Anthropic Messages bodies (and their usage convention)."""
        return self.kind.startswith("/messages")

    def upstream_target(self) -> str:
        target = self.provider.base_path + self.path
        return target + "?" + self.query if self.query else target


def split_target(target: str) -> tuple:
    """Split a request target into (path, query), refusing unsafe ones.

    Only origin-form targets (RFC 9112, section 3.2.1) are accepted, and no
    path that could climb out of a provider's base URL: no dot segments,
    no encoded slashes or dots, no backslashes, no control characters.
    """
    if not target.startswith("/") or target.startswith("//"):
        raise GatewayError(400, "invalid_request",
                           "the request target must be a path such as "
                           "/v1/chat/completions", close=True)
    target = target.split("#", 1)[0]  # a fragment is the client's alone
    path, _, query = target.partition("?")
    if _BAD_PATH.search(path) or _BAD_QUERY.search(query):
        raise GatewayError(400, "invalid_request",
                           "the request path holds an encoded slash, a dot "
                           "segment, a backslash or a control character")
    if "%" in path:
        # "%65" in a path is "e" (RFC 3986, section 6.2.2.2): decoded, so
        # that routing, and reading usage from the answer, see the path the
        # provider serves
        path = _ESCAPE.sub(_unescape_unreserved, path)
    segments = path.split("/")
    if ".." in segments or "." in segments or "" in segments[1:-1]:
        raise GatewayError(400, "invalid_request",
                           "the request path must not hold '.', '..' or "
                           "empty segments")
    return path, query


def anthropic_target(config: Config, target: str) -> bool:
    """Does a request target name an Anthropic route? For the errors found
    before it is routed."""
    if target.startswith("/v1/messages"):
        return True
    name, _, rest = target[1:].partition("/")
    provider = config.providers.get(name)
    return provider is not None and provider.anthropic and \
        rest.startswith("v1")


def resolve_route(config: Config, path: str, query: str) -> Route | None:
    """Route a /v1/... or /{provider}/v1/... path; None if it is neither."""
    if path == "/v1" or path.startswith("/v1/"):
        rest = path[3:]
        anthropic = rest.startswith("/messages")
        provider = config.providers.get("anthropic") if anthropic else None
        return Route(provider, rest, query, False, anthropic)
    name, _, rest = path[1:].partition("/")
    if rest == "v1" or rest.startswith("v1/"):
        provider = config.providers.get(name)
        if provider is None:
            raise GatewayError(
                404, "not_found",
                "no provider named %r is configured: see `llmgw.py config "
                "show`" % name[:64])
        return Route(provider, rest[2:], query, True, provider.anthropic)
    return None


def choose_provider(config: Config, route: Route, model: str | None) -> str:
    """Pick the provider for `model`; return the model name to send on.

    In order: a `provider/model` prefix naming a configured provider, a
    provider whose `models` globs match, the built-in model families, then
    default_provider.
    """
    if route.explicit or not model:
        if route.provider is None:
            route.provider = config.providers.get(config.default_provider)
        return model
    prefix, slash, rest = model.partition("/")
    if slash and prefix in config.providers:
        provider = config.providers[prefix]
        if route.kind.startswith("/messages") and not provider.anthropic:
            raise GatewayError(
                400, "invalid_request",
                "provider %r is OpenAI-type: /v1/messages takes Anthropic-"
                "type providers only" % prefix, param="model")
        route.provider = provider
        return rest
    if route.provider is not None:  # /v1/messages: Anthropic
        return model
    route.provider = config.provider_for_model(model)
    if route.provider is None:
        raise GatewayError(
            400, "invalid_request",
            "model %r names no configured provider before the '/': "
            "use one of %s, or the route /{provider}/v1/..."
            % (model, ", ".join(sorted(config.providers))), param="model")
    return model


def upstream_headers(headers: dict, provider: Provider, real_key) -> dict:
    """The headers a provider gets: an allowlist plus its own auth."""
    # RFC 9110, 7.6.1: headers named in Connection are hop-by-hop too
    listed = headers.get("connection", "").lower()
    listed = {n.strip() for n in listed.split(",")} if listed else ()
    out = {name: value for name, value in headers.items()
           if (name in FORWARD_HEADERS or name.startswith(FORWARD_PREFIXES))
           and name not in listed}
    if provider.anthropic:
        if real_key:
            out["x-api-key"] = real_key
        out.setdefault("anthropic-version", "2023-06-01")
    elif real_key:
        out["authorization"] = "Bearer " + real_key
    # usage is read from the body, so ask for it uncompressed
    out["accept-encoding"] = "identity"
    return out


# ===== limits
#
# Who may make a request: the key cache, model allow-lists, budgets, rate
# limits and the throttle on failed key attempts. State lives in memory;
# the database is read only to fill the cache.

class VirtualKey:
    """A key as the proxy sees it, parsed once when the cache loads."""

    __slots__ = ("id", "project", "name", "budget_usd", "budget_period",
                 "rpm", "tpm", "models", "expires_at", "revoked", "_allowed",
                 "_pattern")

    def __init__(self, row):
        self.id = row["id"]
        self.project = row["project"]
        self.name = row["name"]
        self.budget_usd = row["budget_usd"]
        self.budget_period = row["budget_period"] or "total"
        self.rpm = row["rpm"]
        self.tpm = row["tpm"]
        self.models = json.loads(row["models"]) if row["models"] else []
        self.expires_at = (parse_time(row["expires_at"])
                           if row["expires_at"] else None)
        self.revoked = row["revoked_at"] is not None
        self._allowed = {}
        self._pattern = (re.compile("|".join(
            fnmatch.translate(g) for g in self.models))
            if self.models else None)

    def allows(self, model: str | None) -> bool:
        if self._pattern is None:
            return True
        if not model:
            return False
        found = self._allowed.get(model)
        if found is None:
            found = self._pattern.match(model) is not None
            if len(self._allowed) < 1000:
                self._allowed[model] = found
        return found


class KeyCache:
    """Virtual keys by secret hash, reloaded when the keys table changes.

    Another process (the CLI) may change keys at any time; a watcher calls
    refresh() a few times a second and a change counter kept by triggers
    tells whether anything needs reloading.
    """

    def __init__(self, store: Store):
        self.store = store
        self.version = None
        self.by_hash = {}
        self.lock = threading.Lock()
        self.refresh()

    def refresh(self) -> bool:
        """Reload the keys if the table changed; True if it did."""
        with self.lock:
            version = self.store.keys_version()
            if version == self.version:
                return False
            by_hash = {}
            for row in self.store.all_keys():
                try:
                    key = VirtualKey(row)
                except (ValueError, UsageError) as e:
                    log.error("key %s is unusable: %s", row["id"], e)
                    continue
                by_hash[row["secret_hash"]] = key
            self.by_hash, self.version = by_hash, version
            return True

    def lookup(self, secret: str) -> VirtualKey | None:
        digest = hash_secret(secret)
        key = self.by_hash.get(digest)
        if key is None:
            # perhaps a key created a moment ago by another process; another
            # thread may have reloaded meanwhile, so look again either way
            try:
                self.refresh()
            except sqlite3.Error as e:
                log.warning("cannot read keys from the database: %s", e)
            key = self.by_hash.get(digest)
        return key


class KeyState:
    """Per-key counters: rate windows, spend this period, reservations."""

    __slots__ = ("requests", "tokens", "token_sum", "period", "spent",
                 "reserved")

    def __init__(self):
        self.requests = collections.deque()  # admission times
        self.tokens = collections.deque()    # (time, tokens)
        self.token_sum = 0
        self.period = None   # (budget period, its start) that spent is for
        self.spent = 0.0
        self.reserved = 0.0


def usd(amount: float) -> str:
    """Dollars for a message: cents, or enough digits for tiny amounts."""
    return "%.2f" % amount if amount >= 0.1 or amount == 0 else \
        "%.6g" % amount


def retry_headers(seconds: float) -> dict:
    seconds = max(seconds, 0.001)
    return {"Retry-After": str(int(math.ceil(seconds))),
            "retry-after-ms": str(int(math.ceil(seconds * 1000)))}


class Limiter:
    """Check a request against its key's limits, and settle it afterwards.

    Budgets: spend for the current period is loaded once from the database
    and then kept up to date from the rows this process writes. Each
    admitted request reserves an estimate of its cost until its row is
    written, so concurrent requests cannot all slip under the budget: the
    overshoot is at most what admitted requests cost beyond their estimate.
    """

    WINDOW_S = 60.0

    def __init__(self, store: Store):
        self.store = store
        self.lock = threading.Lock()
        self.states = {}

    def _state(self, key_id: str) -> KeyState:
        state = self.states.get(key_id)
        if state is None:
            state = self.states.setdefault(key_id, KeyState())
        return state

    def check_key(self, key: VirtualKey, now_wall: float) -> None:
        if key.revoked:
            raise GatewayError(401, "key_revoked",
                               "this virtual key was revoked: ask the "
                               "gateway's operator for a new one",
                               headers={"x-should-retry": "false"})
        if key.expires_at is not None and \
                now_wall >= key.expires_at.timestamp():
            raise GatewayError(401, "key_expired",
                               "this virtual key expired at %s: ask the "
                               "gateway's operator to extend it or issue a "
                               "new one" % iso(key.expires_at),
                               headers={"x-should-retry": "false"})

    def admit(self, key: VirtualKey, model: str | None,
              estimate_usd: float) -> float:
        """Raise GatewayError if the request may not go; else reserve.

        Returns the USD reserved, to hand back to settle().
        """
        if not key.allows(model):
            raise GatewayError(
                403, "model_not_allowed",
                "model %r is not allowed for this key (allowed: %s)"
                % (model, ", ".join(key.models)), param="model",
                headers={"x-should-retry": "false"})
        now = time.monotonic()
        if key.budget_usd is not None:
            self._load_spend(key)
        with self.lock:
            state = self._state(key.id)
            if key.budget_usd is not None and \
                    state.spent + state.reserved >= key.budget_usd:
                raise self._budget_error(key, state)
            if key.rpm:
                window = state.requests
                while window and window[0] <= now - self.WINDOW_S:
                    window.popleft()
                if len(window) >= key.rpm:
                    wait = window[0] + self.WINDOW_S - now
                    raise GatewayError(
                        429, "rate_limit_exceeded",
                        "this key is limited to %d requests per minute; "
                        "retry in %.1f s" % (key.rpm, wait),
                        headers=retry_headers(wait))
            if key.tpm:
                wait = self._tokens_wait(state, key.tpm, now)
                if wait is not None:
                    raise GatewayError(
                        429, "rate_limit_exceeded",
                        "this key is limited to %d tokens per minute; "
                        "retry in %.1f s" % (key.tpm, wait),
                        headers=retry_headers(wait))
            if key.rpm:
                state.requests.append(now)
            state.reserved += estimate_usd
        return estimate_usd

    def _tokens_wait(self, state: KeyState, tpm: int, now: float):
        """Seconds until the token window is below tpm, or None if it is."""
        window = state.tokens
        while window and window[0][0] <= now - self.WINDOW_S:
            state.token_sum -= window.popleft()[1]
        if state.token_sum < tpm:
            return None
        remaining = state.token_sum
        for when, count in window:
            remaining -= count
            if remaining < tpm:
                return when + self.WINDOW_S - now
        return self.WINDOW_S

    def _budget_error(self, key: VirtualKey, state: KeyState):
        period = key.budget_period
        resets = period_end(period, utcnow())
        when = ("it resets at %s" % iso(resets) if resets else
                "it is a total budget: raise it with keys update --budget")
        label = {"day": "daily", "week": "weekly", "month": "monthly"}.get(
            period, "total")
        return GatewayError(
            402, "budget_exceeded",
            "this key has spent $%s of its %s budget of $%s; %s"
            % (usd(state.spent + state.reserved), label,
               usd(key.budget_usd), when),
            headers={"x-should-retry": "false"})

    def _load_spend(self, key: VirtualKey) -> None:
        """Make sure the key's spend is for the current budget period."""
        period = key.budget_period
        start = period_start(period, utcnow())
        marker = (period, start)
        state = self._state(key.id)
        if state.period == marker:
            return
        spent = self.store.spend(key.id, iso(start) if start else None)
        with self.lock:
            if state.period != marker:
                state.period = marker
                state.spent = spent

    def release(self, key_id: str, reserved_usd: float) -> None:
        with self.lock:
            state = self._state(key_id)
            state.reserved = max(0.0, state.reserved - reserved_usd)

    def settle(self, key_id: str, reserved_usd: float, cost_usd,
               tokens: int) -> None:
        """Replace a reservation by what the request really cost."""
        now = time.monotonic()
        with self.lock:
            state = self._state(key_id)
            state.reserved = max(0.0, state.reserved - reserved_usd)
            if cost_usd:
                state.spent += cost_usd
            if tokens:
                state.tokens.append((now, tokens))
                state.token_sum += tokens

    def forget(self, key_id: str) -> None:
        """Drop cached spend, e.g. after a key's budget period changed."""
        with self.lock:
            state = self.states.get(key_id)
            if state is not None:
                state.period = None


class AuthThrottle:
    """Slow down addresses that keep presenting unknown keys."""

    def __init__(self, limit: int = MAX_AUTH_FAILURES_PER_MIN):
        self.limit = limit
        self.failures = {}
        self.lock = threading.Lock()

    def blocked_for(self, address: str) -> float:
        """Seconds this address must wait, or 0."""
        now = time.monotonic()
        with self.lock:
            times = self.failures.get(address)
            if not times:
                return 0.0
            while times and times[0] <= now - 60:
                times.popleft()
            if len(times) < self.limit:
                return 0.0
            return times[0] + 60 - now

    def failed(self, address: str) -> None:
        with self.lock:
            if len(self.failures) > 10000:
                self.failures.clear()  # a spray of addresses: start afresh
            times = self.failures.setdefault(
                address, collections.deque(maxlen=self.limit))
            times.append(time.monotonic())

    def prune(self) -> None:
        now = time.monotonic()
        with self.lock:
            for address in [a for a, t in self.failures.items()
                            if not t or t[-1] <= now - 60]:
                del self.failures[address]


# ===== upstream
#
# Keep-alive connections to providers, pooled per origin, so a request pays
# no TCP or TLS handshake when an idle connection exists. TLS is verified
# against the system's trust store; redirects are never followed.
#
# The client is written here rather than taken from http.client: a proxy
# decides the framing of answers and the reuse of connections itself,
# which http.client keeps in private members, and one buffered reader per
# connection is cheaper than one per answer. http.client's exception
# classes are kept, so callers tell the same failures apart.

# Errors that mean the connection ended before any byte of an answer: a
# pooled connection the provider closed while idle, or a provider that
# dropped the request (getresponse raises nothing else for that).
STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected,
                           ConnectionResetError, BrokenPipeError,
                           ConnectionAbortedError)
# methods forwarded to providers
PROXY_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# requests that may be repeated (RFC 9110, section 9.2.2)
IDEMPOTENT_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE"))
# what may not appear in a request target on the wire (space, controls,
# anything outside ASCII)
_BAD_TARGET = re.compile(r"[^\x21-\x7e]")
MAX_STATUS_LINE = 64 * 1024
MAX_ANSWER_HEAD = 256 * 1024  # all header fields of one answer


class BadAnswer(http.client.HTTPException):
    """An answer that breaks HTTP/1.1; the message says how, in words
    that follow the provider's name."""


class ResponseHeaders:
    """A response's header fields, in order, and by lower-case name
    (get() and tokens() take the name in lower case)."""

    __slots__ = ("fields", "by_name")

    def __init__(self, fields: list):
        self.fields = fields
        self.by_name = {}
        for name, value in fields:
            self.by_name.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default=None):
        values = self.by_name.get(name)
        return values[0] if values else default

    def tokens(self, name: str) -> list:
        """The comma-separated items of every field of that name, in
        lower case (Connection, Transfer-Encoding)."""
        values = self.by_name.get(name)
        if not values:
            return []
        return [item.strip().lower() for value in values
                for item in value.split(",") if item.strip()]


def content_length(values: list) -> int:
    """The body length that every Content-Length value agrees on."""
    found = {item.strip() for value in values for item in value.split(",")}
    if len(found) != 1:
        raise BadAnswer("sent Content-Length fields that disagree")
    length = found.pop()
    if not _DIGITS.match(length) or len(length) > 18:
        raise BadAnswer("sent a Content-Length that is not a length")
    return int(length)


class UpstreamResponse:
    """A provider's status and header fields, and how its body is framed
    (RFC 9112, section 6.3). body_pieces() reads the body."""

    __slots__ = ("status", "headers", "fp", "chunked", "length",
                 "will_close")

    def __init__(self, status: int, version: str, headers: ResponseHeaders,
                 fp, method: str):
        self.status = status
        self.headers = headers
        self.fp = fp
        options = headers.tokens("connection")
        if version == "HTTP/1.0":
            self.will_close = "keep-alive" not in options and \
                headers.get("keep-alive") is None
        else:
            self.will_close = "close" in options
        self.chunked = False
        self.length = None  # unknown: the body ends with the connection
        codings = headers.tokens("transfer-encoding")
        if status in (204, 304) or method == "HEAD":
            self.length = 0  # no body, whatever the fields say
        elif codings:
            # Transfer-Encoding overrides Content-Length (RFC 9112, section
            # 6.3). An answer in HTTP/1.0 or with both fields can be an
            # attempt to smuggle a second answer: its connection is closed
            # after it.
            if codings[-1] != "chunked" or \
                    any(c != "identity" for c in codings[:-1]):
                # the gateway asks for none (it sends no TE field), and
                # could pass none on: Transfer-Encoding is hop-by-hop
                raise BadAnswer("sent a transfer coding the gateway did not "
                                "ask for")
            self.chunked = True
            if version == "HTTP/1.0" or "content-length" in headers.by_name:
                self.will_close = True
        elif "content-length" in headers.by_name:
            self.length = content_length(headers.by_name["content-length"])
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True

    def getheader(self, name: str, default=None):
        return self.headers.get(name, default)

    def getheaders(self) -> list:
        return self.headers.fields


# A head of plain "name: value" lines, the usual case, is checked and split
# by one expression over the whole of it: it matches each such line, from
# its start, and no line with a control character, a bare CR, folding or
# space around the name or at the end.
_PLAIN_FIELD = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*"
                          r"((?:[^\x00-\x08\x0a-\x1f\x7f]*"
                          r"[^\x00-\x20\x7f])?)\r?\n", re.MULTILINE)


def read_fields(fp) -> list:
    """Header fields up to the blank line, as (name, value) pairs.

    Lines that are not a field (no colon, or a name that is not a token)
    are dropped; a control character in a value, a bare CR above all,
    becomes a space, so it can never end a line for the client (RFC 9112,
    section 2.2; RFC 9110, section 5.5).
    """
    lines = []
    size = 0
    for _ in range(MAX_HEADER_COUNT + 1):
        line = fp.readline(MAX_HEADER_BYTES + 1)
        if len(line) > MAX_HEADER_BYTES:
            raise BadAnswer("sent a header line over %d KiB"
                            % (MAX_HEADER_BYTES // 1024))
        if line in (b"\r\n", b"\n"):
            break
        if not line.endswith(b"\n"):
            raise BadAnswer("closed the connection in the middle of its "
                            "header fields")
        size += len(line)
        if size > MAX_ANSWER_HEAD:
            raise BadAnswer("sent over %d KiB of header fields"
                            % (MAX_ANSWER_HEAD // 1024))
        lines.append(line)
    else:
        raise BadAnswer("sent more than %d header fields" % MAX_HEADER_COUNT)
    fields = _PLAIN_FIELD.findall(b"".join(lines).decode("iso-8859-1"))
    if len(fields) == len(lines):  # every line is a plain field
        return fields
    fields = []
    for line in lines:
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if _BAD_FIELD_VALUE.search(text):
            text = _BAD_FIELD_VALUE.sub(" ", text)
        if text[:1] in (" ", "\t"):  # obsolete line folding
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, (value + " " + text.strip()).strip())
            continue
        name, colon, value = text.partition(":")
        name = name.rstrip()  # a proxy removes space before the colon
        if colon and _TOKEN.match(name):
            fields.append((name, value.strip()))
    return fields


class UpstreamConnection:
    """One keep-alive HTTP/1.1 connection to a provider's origin."""

    __slots__ = ("host", "port", "host_header", "timeout", "context",
                 "sock", "fp")

    def __init__(self, provider: Provider, timeout: float, context=None):
        self.host, self.port = provider.host, provider.port
        host = "[%s]" % self.host if ":" in self.host else self.host
        default = 443 if context is not None else 80
        self.host_header = host if self.port == default else \
            "%s:%d" % (host, self.port)
        self.timeout = timeout  # for connecting
        self.context = context  # TLS, or None for plain HTTP
        self.sock = self.fp = None

    def connect(self, read_timeout: float) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            # no Nagle delay: a write leaves at once, not after an ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.context is not None:
                sock = self.context.wrap_socket(sock,
                                                server_hostname=self.host)
            sock.settimeout(read_timeout)
        except BaseException:
            sock.close()
            raise
        self.sock, self.fp = sock, sock.makefile("rb")

    def send_request(self, method: str, target: str, fields: dict,
                     body: bytes) -> None:
        """Send a request whose header fields are already validated.

        The names are tokens and the values free of control characters
        (the request parser and the config check make sure). ValueError
        for a target that cannot go on the wire.
        """
        if _BAD_TARGET.search(target):
            raise ValueError("the request target holds a character that "
                             "cannot be sent")
        lines = ["%s %s HTTP/1.1\r\nhost: %s\r\n" % (method, target,
                                                     self.host_header)]
        lines.extend(["%s: %s\r\n" % item for item in fields.items()])
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append("content-length: %d\r\n" % len(body))
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        if len(body) <= 65536:
            self.sock.sendall(head + body)  # one packet, one wakeup
        else:
            self.sock.sendall(head)  # not copied to join the head
            self.sock.sendall(body)

    def getresponse(self, method: str) -> UpstreamResponse:
        """Read the status line and header fields of the next answer,
        skipping interim (1xx) answers.

        Only a connection that ends before any byte of an answer raises
        one of STALE_CONNECTION_ERRORS; once something came, the provider
        has the request and the failure is a BadAnswer.
        """
        fp = self.fp
        if not fp.peek(1):  # (fills the buffer that readline goes on with)
            raise http.client.RemoteDisconnected(
                "the provider closed the connection without an answer")
        try:
            for _ in range(MAX_HEADER_COUNT):
                line = fp.readline(MAX_STATUS_LINE + 1)
                if not line:
                    raise BadAnswer("closed the connection in the middle "
                                    "of its answer")
                if len(line) > MAX_STATUS_LINE:
                    raise BadAnswer("sent a status line over %d KiB"
                                    % (MAX_STATUS_LINE // 1024))
                text = line.decode("iso-8859-1").rstrip("\r\n")
                version, _, rest = text.partition(" ")
                code = rest[:3]
                if not _HTTP_1.match(version) or not _DIGITS.match(code) \
                        or rest[3:4] not in ("", " "):
                    raise BadAnswer("did not answer in HTTP/1.1")
                status = int(code)
                if status < 100 or status > 599:  # RFC 9110, section 15
                    raise BadAnswer("answered with status %d, which HTTP "
                                    "does not have" % status)
                if status == 101:
                    raise BadAnswer("switched protocols unasked")
                fields = read_fields(fp)
                if status >= 200:  # (the gateway sends its own reason)
                    return UpstreamResponse(
                        status, version, ResponseHeaders(fields), fp, method)
        except STALE_CONNECTION_ERRORS:  # it has the request: not stale
            raise BadAnswer("closed the connection in the middle of its "
                            "answer") from None
        raise BadAnswer("sent more than %d interim answers"
                        % MAX_HEADER_COUNT)

    def early_answer(self, method: str) -> UpstreamResponse | None:
        """The answer a provider sent before it stopped reading a request
        that could not be sent whole, if there is one."""
        try:
            resp = self.getresponse(method)
        except (OSError, http.client.HTTPException):
            return None
        resp.will_close = True  # the request was cut short
        return resp

    def close(self) -> None:
        fp, sock = self.fp, self.sock
        self.fp = self.sock = None
        if fp is not None:
            fp.close()
        if sock is not None:
            sock.close()


def alive(conn: UpstreamConnection) -> bool:
    """False when an idle connection cannot carry another request.

    An idle keep-alive connection has nothing to read. If the socket is
    readable, the provider has closed it or sent something unasked; if
    the reader holds bytes past the end of the last answer, they would be
    taken for the next request's answer (RFC 9112, section 6.3).
    """
    sock, fp = conn.sock, conn.fp
    if sock is None:
        return False
    try:
        poller = select.poll()  # select() refuses descriptors above 1023
        poller.register(sock, select.POLLIN)
        if poller.poll(0):
            return False
        timeout = sock.gettimeout()
        sock.settimeout(0)  # peek() reads the socket when nothing is held
        try:
            return not fp.peek(1)
        except ssl.SSLWantReadError:  # TLS, with nothing held or to read
            return True
        finally:
            sock.settimeout(timeout)
    except (OSError, ValueError):
        return False


class UpstreamPool:
    """Idle connections per (scheme, host, port)."""

    MAX_IDLE_PER_ORIGIN = 64
    MAX_IDLE_AGE_S = 50.0  # below the usual keep-alive timeouts of servers

    def __init__(self, connect_timeout: float, read_timeout: float):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._ssl_context = None  # loading the trust store takes a while
        self.idle = {}
        self.lock = threading.Lock()

    def get(self, provider: Provider, fresh: bool = False) -> tuple:
        """Return (connection, reused); with fresh, a new connection."""
        origin = (provider.scheme, provider.host, provider.port)
        now = time.monotonic()
        while not fresh:
            with self.lock:  # not held across alive(): it is a system call
                conns = self.idle.get(origin)
                if not conns:
                    break
                conn, since = conns.pop()
            if now - since < self.MAX_IDLE_AGE_S and alive(conn):
                return conn, True
            conn.close()
        context = None
        if provider.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            context = self._ssl_context
        return UpstreamConnection(provider, self.connect_timeout,
                                  context), False

    def put(self, provider: Provider, conn: UpstreamConnection) -> None:
        origin = (provider.scheme, provider.host, provider.port)
        with self.lock:
            conns = self.idle.setdefault(origin, [])
            if len(conns) < self.MAX_IDLE_PER_ORIGIN:
                conns.append((conn, time.monotonic()))
                return
        conn.close()

    def connect(self, conn: UpstreamConnection) -> None:
        """Open a new connection, then switch to the read timeout."""
        conn.connect(self.read_timeout)

    def close(self) -> None:
        with self.lock:
            for conns in self.idle.values():
                for conn, _ in conns:
                    conn.close()
            self.idle.clear()


# ===== http
#
# One client connection: reading requests within size and time limits,
# writing responses and errors. http.server checks almost nothing itself,
# so requests are parsed here: RFC 9112 framing, and the wall-clock
# deadlines that keep slow clients from holding threads.

_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
# the client has closed its side, or reset the connection (Linux)
_CLIENT_CLOSED = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | \
    select.POLLERR
REASONS = {code: msg for code, (msg, _) in
           BaseHTTPRequestHandler.responses.items()}


class Request:
    """One parsed request, before routing."""

    __slots__ = ("method", "target", "version", "headers", "lengths",
                 "path", "query", "body", "body_read", "keep_alive",
                 "client", "started", "id")

    def __init__(self, method, target, version, headers, lengths, client,
                 started, request_id):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.lengths = lengths  # every Content-Length value, as sent
        self.client = client
        self.started = started
        self.id = request_id
        self.path = self.query = ""
        self.body = b""
        self.body_read = lengths in ([], ["0"]) and \
            "transfer-encoding" not in headers
        conn = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in conn
        else:
            self.keep_alive = "keep-alive" in conn


class Watchdog:
    """Close connections whose request outlives its wall-clock deadline.

    Socket timeouts apply to each recv, so a client sending a byte every few
    seconds would never time out. The watchdog shuts such a connection down
    instead, which wakes the thread blocked reading it.
    """

    def __init__(self):
        self.deadlines = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def arm(self, conn, seconds: float, on_expiry=None) -> None:
        with self.lock:
            self.deadlines[conn] = (time.monotonic() + seconds, on_expiry)

    def disarm(self, conn) -> bool:
        """Stop watching conn; False if its deadline had passed, and the
        connection is being shut down (with a 408, for a request head)."""
        with self.lock:
            return self.deadlines.pop(conn, None) is not None

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            now = time.monotonic()
            with self.lock:
                late = [(c, f) for c, (t, f) in self.deadlines.items()
                        if t <= now]
                for conn, _ in late:
                    del self.deadlines[conn]
            for conn, on_expiry in late:
                if on_expiry is not None:
                    try:
                        on_expiry()
                    except OSError:
                        pass
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class ConnectionHandler(BaseHTTPRequestHandler):
    """Read requests and write responses on one client connection."""

    protocol_version = "HTTP/1.1"
    server_version = "llmgw/" + __version__

    def setup(self):
        super().setup()
        self.gw = self.server.gateway
        self.limits = self.gw.config.limits
        self.close_connection = False
        self.connection.settimeout(self.limits["idle_timeout_s"])
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP,
                                       socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a test socket pair, say)

    def handle(self):
        try:
            if isinstance(self.connection, ssl.SSLSocket):
                self.gw.watchdog.arm(self.connection,
                                     self.limits["header_timeout_s"])
                try:
                    self.connection.do_handshake()
                finally:
                    self.gw.watchdog.disarm(self.connection)
            while not self.close_connection:
                self.handle_one_request()
                if self.gw.draining:
                    break
        except (OSError, ValueError, ClientGone) as e:
            # the client went away or sent what TLS could not read
            log.debug("connection from %s ended: %s", self.client_address[0],
                      e)

    def handle_one_request(self):
        req = None
        self.status = 0
        self.anthropic_errors = False  # set once the route is known
        self.exchange = None           # set by the proxy routes
        try:
            req = self.read_request()
            if req is None:
                self.close_connection = True
                return
            self.dispatch(req)
        except GatewayError as err:
            if req is not None and not req.body_read:
                err.close = True  # its unread body must not be parsed
            self.send_gateway_error(err, req, self.anthropic_errors)
        except (OSError, ClientGone):
            raise  # the connection is gone: nobody to answer
        except Exception:
            request_id = req.id if req is not None else "-"
            log.exception("request %s failed", request_id)
            self.close_connection = True
            if not self.status:  # nothing sent yet: say what happened
                self.send_gateway_error(GatewayError(
                    500, "internal_error",
                    "the gateway failed on this request (%s); its log has "
                    "the details" % request_id, close=True),
                    req, self.anthropic_errors)
        finally:
            if self.status:
                self.gw.after_request(req, self.status, self.exchange)

    def dispatch(self, req: Request) -> None:
        raise NotImplementedError  # defined by the server section

    # reading

    def read_request(self) -> Request | None:
        """Read a request line and headers; None when the client is done."""
        idle = self.gw.idle_connections
        idle.add(self.connection)
        try:
            if self.gw.draining or not self.rfile.peek(1):
                return None  # an idle keep-alive client hung up
        except socket.timeout:
            return None
        finally:
            idle.discard(self.connection)
        started = time.monotonic()
        self.gw.watchdog.arm(self.connection, self.limits["header_timeout_s"],
                             self._send_timeout)
        try:
            req = self._read_head(started)
        finally:
            on_time = self.gw.watchdog.disarm(self.connection)
        if not on_time:  # the head came as the watchdog answered 408
            self.close_connection = True
            return None
        return req

    def _send_timeout(self):
        """Answer 408 from the watchdog: the client was too slow."""
        err = GatewayError(408, "request_timeout",
                           "the request line and headers took longer than "
                           "%gs" % self.limits["header_timeout_s"])
        self.connection.settimeout(1)
        self.wfile.write(self.error_bytes(err, self.anthropic_errors, None,
                                          True))

    def _read_head(self, started: float) -> Request | None:
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if line in (b"\r\n", b"\n"):  # one empty line first is allowed
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)  # (RFC 9112 2.2)
        if not line.endswith(b"\n"):
            if len(line) > MAX_REQUEST_LINE:
                raise GatewayError(414, None, "the request line is longer "
                                   "than %d bytes" % MAX_REQUEST_LINE,
                                   close=True)
            return None  # the client closed (or was cut off) mid-line
        try:
            text = line.decode("latin-1").rstrip("\r\n")
            method, target, version = text.split(" ")
        except ValueError:
            raise GatewayError(400, "invalid_request",
                               "malformed request line", close=True) \
                from None
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            if _HTTP_1.match(version):
                version = "HTTP/1.1"  # a later 1.x (RFC 9110, section 2.5)
            else:
                raise GatewayError(505 if _HTTP_VERSION.match(version) else
                                   400, "invalid_request",
                                   "only HTTP/1.0 and HTTP/1.1 requests are "
                                   "served", close=True)
        if not _TOKEN.match(method):
            raise GatewayError(400, "invalid_request",
                               "malformed request line", close=True)
        # errors from here on come in the format of the route it names
        self.anthropic_errors = anthropic_target(self.gw.config, target)
        lines = self._header_lines()
        if lines is None:
            return None  # cut off mid-headers
        headers, lengths, hosts = {}, [], 0
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon or not _TOKEN.match(name):
                # includes obsolete line folding and "Name :" (RFC 9112 5)
                raise GatewayError(400, "invalid_request",
                                   "malformed header line", close=True)
            name = name.lower()
            value = value.strip(" \t")
            if name == "content-length":
                lengths.append(value)
            elif name == "host":
                hosts += 1
            if name in headers:
                headers[name] += ", " + value
            else:
                headers[name] = value
        if hosts > 1 or (hosts == 0 and version == "HTTP/1.1"):
            raise GatewayError(400, "invalid_request", "an HTTP/1.1 request "
                               "carries exactly one Host header (RFC 9112, "
                               "section 3.2)", close=True)
        return Request(method, target, version, headers, lengths,
                       self.client_address[0], started,
                       self.gw.new_request_id())

    def _header_lines(self) -> list | None:
        """The request's header lines without their ends, within the size
        limits and free of control characters (RFC 9110, 5.5) but for tabs;
        None when the client closed before the blank line."""
        # Usually the whole head is buffered already: split it in one go.
        buffered = self.rfile.peek(1)
        if buffered[:2] == b"\r\n":
            self.rfile.read(2)
            return []
        end = buffered.find(b"\r\n\r\n")
        if 0 < end <= MAX_HEADER_BYTES - 4:
            text = buffered[:end].decode("latin-1")
            if text.count("\n") == text.count("\r\n"):  # no bare LF
                lines = text.split("\r\n")
                if len(lines) > MAX_HEADER_COUNT:
                    raise GatewayError(431, None, "more than %d request "
                                       "headers" % MAX_HEADER_COUNT,
                                       close=True)
                if _BAD_HEAD_CHARACTER.search(text):
                    raise GatewayError(400, "invalid_request",
                                       "a header holds a control character",
                                       close=True)
                self.rfile.read(end + 4)
                return lines
        # Line by line, as it arrives; a bare LF also ends a line here.
        lines, total = [], 0
        for _ in range(MAX_HEADER_COUNT + 1):
            line = self.rfile.readline(MAX_HEADER_BYTES + 1)
            total += len(line)
            if total > MAX_HEADER_BYTES:
                raise GatewayError(431, None, "request headers exceed %d "
                                   "bytes" % MAX_HEADER_BYTES, close=True)
            if not line.endswith(b"\n"):
                return None
            if line in (b"\r\n", b"\n"):
                return lines
            line = line.decode("latin-1")
            line = line[:-2] if line.endswith("\r\n") else line[:-1]
            if _BAD_FIELD_VALUE.search(line):
                raise GatewayError(400, "invalid_request",
                                   "a header holds a control character",
                                   close=True)
            lines.append(line)
        raise GatewayError(431, None, "more than %d request headers"
                           % MAX_HEADER_COUNT, close=True)

    def read_body(self, req: Request) -> bytes:
        """Read the body within max_body_bytes and the body deadline."""
        headers = req.headers
        te = headers.get("transfer-encoding")
        req.body_read = True  # from here on, or the connection is closed
        limit = self.limits["max_body_bytes"]
        if te is not None and req.lengths:
            raise GatewayError(400, "invalid_request", "a request may not "
                               "carry both Content-Length and Transfer-"
                               "Encoding", close=True)
        if te is not None and te.lower() != "chunked":
            raise GatewayError(400, "invalid_request", "only the chunked "
                               "transfer coding is accepted", close=True)
        length = None
        if req.lengths:
            values = set(v.strip() for vs in req.lengths
                         for v in vs.split(","))
            if len(values) != 1 or not _DIGITS.match(next(iter(values))):
                raise GatewayError(400, "invalid_request", "Content-Length "
                                   "must be one decimal number", close=True)
            length = int(values.pop())
            if length > limit:
                raise GatewayError(413, "request_too_large",
                                   "the body is %d bytes; this gateway "
                                   "takes at most %d (limits.max_body_bytes)"
                                   % (length, limit), close=True)
        elif te is None:
            if req.method in ("POST", "PUT", "PATCH"):
                raise GatewayError(411, None, "send a Content-Length header "
                                   "or a chunked body", close=True)
            return b""
        if length == 0:
            return b""
        if headers.get("expect", "").lower() == "100-continue" and \
                req.version == "HTTP/1.1":  # HTTP/1.0 knows no 100
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if te is not None and req.version == "HTTP/1.0":
            # RFC 9112, section 6.1: faulty framing, whatever it says; the
            # connection is not read again after this request
            self.close_connection = True
        self.gw.watchdog.arm(self.connection, self.limits["body_timeout_s"])
        try:
            if length is not None:
                body = self.rfile.read(length)
                if len(body) != length:
                    raise GatewayError(400, "invalid_request",
                                       "the body ended before Content-"
                                       "Length bytes", close=True)
            else:
                body = self._read_chunked(limit)
        except socket.timeout:
            raise GatewayError(408, "request_timeout",
                               "the body stopped arriving for %gs "
                               "(limits.idle_timeout_s)"
                               % self.limits["idle_timeout_s"],
                               close=True) from None
        except OSError:
            raise ClientGone() from None
        finally:
            if not self.gw.watchdog.disarm(self.connection):
                # the deadline passed and the connection is being shut
                # down: that, not what the cut read made of it, is the error
                raise GatewayError(408, "request_timeout",
                                   "the body took longer than %gs "
                                   "(limits.body_timeout_s)"
                                   % self.limits["body_timeout_s"],
                                   close=True)
        return body

    def _read_chunked(self, limit: int) -> bytes:
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            size = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not _HEX.match(size):
                raise GatewayError(400, "invalid_request",
                                   "malformed chunked body", close=True)
            size = int(size, 16)
            if size == 0:
                break
            total += size
            if total > limit:
                raise GatewayError(413, "request_too_large",
                                   "the chunked body exceeds %d bytes "
                                   "(limits.max_body_bytes)" % limit,
                                   close=True)
            data = self.rfile.read(size)
            if len(data) != size or self.rfile.readline(3) not in (
                    b"\r\n", b"\n"):
                raise GatewayError(400, "invalid_request",
                                   "malformed chunked body", close=True)
            parts.append(data)
        for _ in range(MAX_HEADER_COUNT):  # trailer fields, ignored
            line = self.rfile.readline(MAX_HEADER_BYTES)
            if line in (b"\r\n", b"\n"):
                return b"".join(parts)
            if not line.endswith(b"\n"):
                break
        raise GatewayError(400, "invalid_request", "malformed chunked body "
                           "trailer", close=True)

    # writing

    def head_bytes(self, status: int, headers, length=None,
                   chunked=False, req: Request | None = None,
                   close: bool | None = None) -> bytes:
        """The status line and headers of a response."""
        self.status = status
        lines = ["HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, ""))]
        for name, value in headers:
            lines.append("%s: %s\r\n" % (name, value))
        if req is not None:
            lines.append("x-llmgw-request-id: %s\r\n" % req.id)
        if chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        elif length is not None and status not in (204, 304):
            # (RFC 9110, sections 8.6 and 15.4.5)
            lines.append("Content-Length: %d\r\n" % length)
        if self.close_connection if close is None else close:
            lines.append("Connection: close\r\n")
        elif req is not None and req.version == "HTTP/1.0":
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def send_bytes(self, status: int, headers, body: bytes,
                   req: Request | None = None) -> None:
        """Send a whole response in one write (no Nagle stall)."""
        if req is not None and (not req.keep_alive or not req.body_read):
            self.close_connection = True  # an unread body must not be parsed
        if req is not None and req.method == "HEAD":
            body_out = b""
        else:
            body_out = body
        self.wfile.write(self.head_bytes(status, headers, len(body), False,
                                         req) + body_out)

    def send_json(self, status: int, obj, req: Request | None = None,
                  headers=()) -> None:
        body = json.dumps(obj, indent=None).encode()
        self.send_bytes(status, [("Content-Type", "application/json")] +
                        list(headers), body, req)

    def error_bytes(self, err: GatewayError, anthropic: bool,
                    req: Request | None, close: bool) -> bytes:
        body = error_body(err, anthropic)
        headers = [("Content-Type", "application/json")]
        headers.extend(err.headers.items())
        head = self.head_bytes(err.status, headers, len(body), False, req,
                               close)
        return head if req is not None and req.method == "HEAD" else \
            head + body

    def send_gateway_error(self, err: GatewayError, req: Request | None,
                           anthropic: bool = False) -> None:
        if err.close or req is None or not req.keep_alive:
            self.close_connection = True
        try:
            self.wfile.write(self.error_bytes(err, anthropic, req,
                                              self.close_connection))
        except OSError:
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors, as JSON like every other error."""
        self.close_connection = True
        err = GatewayError(code, None, message or REASONS.get(code, "error"),
                           close=True)
        try:
            self.wfile.write(self.error_bytes(err, False, None, True))
        except OSError:
            pass

    def log_message(self, format, *args):
        log.debug("%s " + format, self.client_address[0], *args)


# ===== proxy
#
# The proxy routes: authenticate, route, check limits, forward, relay the
# answer, and record exactly one usage row per request that presented a
# valid key. The row is committed before the response's last byte is sent.

def storage_error() -> GatewayError:
    return GatewayError(
        503, "storage_unavailable",
        "the gateway cannot record usage right now (database not "
        "writable), so it serves no billable request; retry shortly",
        headers=retry_headers(1.0))


class CannotConnect(Exception):
    """No connection to the provider: nothing was sent, so retrying is safe."""

    def __init__(self, reason: OSError):
        super().__init__(str(reason))
        self.reason = reason


class ClientGone(Exception):
    """The client closed the connection while we were answering."""


class UpstreamFailed(Exception):
    """The provider failed after the response started; the stream is cut."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class Exchange:
    """What one proxied request has learned so far, for its usage row."""

    __slots__ = ("req", "route", "key", "model", "usage", "status",
                 "error", "streamed", "ttfb_ms", "upstream_request_id",
                 "reserved", "body_obj", "recorded", "cost_usd", "meter")

    def __init__(self, req: Request, route: Route, key: VirtualKey):
        self.req = req
        self.route = route
        self.key = key
        self.model = None
        self.usage = Usage()
        self.status = 0
        self.error = None
        self.streamed = False
        self.ttfb_ms = None
        self.upstream_request_id = None
        self.reserved = 0.0
        self.body_obj = None
        self.recorded = False
        self.cost_usd = None
        self.meter = None  # the StreamMeter of a streamed answer

    def first_byte(self) -> None:
        if self.ttfb_ms is None:
            self.ttfb_ms = (time.monotonic() - self.req.started) * 1000


def cut_answer(e: Exception) -> UpstreamFailed:
    """What a failed read of an answer already reaching the client means."""
    if isinstance(e, socket.timeout):
        return UpstreamFailed("upstream_timeout",
                              "provider went silent mid-answer")
    return UpstreamFailed("upstream_reset", "provider cut its answer short")


def body_pieces(resp):
    """Yield an answer's body as it arrives, without chunk framing
    (RFC 9112, section 7.1). IncompleteRead when it is cut short; its
    `expected` is the bytes missing from a Content-Length body."""
    fp = resp.fp
    if not resp.chunked:
        left = resp.length  # None: until the provider closes
        while left != 0:
            data = fp.read1(65536 if left is None else min(left, 65536))
            if not data:
                if left:
                    raise http.client.IncompleteRead(b"", left)
                return
            if left is not None:
                left -= len(data)
            yield data
        return
    while True:
        line = fp.readline(1026)
        size = line.split(b";", 1)[0].strip()
        if not line.endswith(b"\n") or not _HEX.match(size):
            raise http.client.IncompleteRead(b"")  # cut short or garbled
        size = int(size, 16)
        if size == 0:
            for _ in range(MAX_HEADER_COUNT):  # trailer fields, ignored
                # (a provider that closes right after the last chunk is done)
                if fp.readline(MAX_HEADER_BYTES) in (b"\r\n", b"\n", b""):
                    return
            raise http.client.IncompleteRead(b"")  # no end to the trailer
        while size:
            data = fp.read1(min(size, 65536))
            if not data:
                raise http.client.IncompleteRead(b"")
            size -= len(data)
            yield data
        if fp.readline(3) not in (b"\r\n", b"\n"):
            raise http.client.IncompleteRead(b"")


def client_secret(headers: dict) -> str | None:
    """The virtual key from any of the headers clients put it in."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return auth.strip()
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        value = headers.get(name)
        if value:
            return value.strip()
    return None


def parse_json_body(req: Request):
    """The request body as JSON (None for an empty or non-JSON body)."""
    if not req.body:
        return None
    ctype = req.headers.get("content-type", "application/json").lower()
    if "json" not in ctype:
        return None
    body = req.body
    try:
        obj = json.loads(body)
        # Named twice, "model" is read here as the last value; a provider
        # may take the first, past the key's allow-list. Only a body with
        # the name twice, or with a lower-case letter written as an escape
        # (no encoder writes one), can name it twice.
        if isinstance(obj, dict) and (body.count(b'"model"') > 1 or
                                      body.count(b'"stream"') > 1 or
                                      b"\\u006" in body or
                                      b"\\u007" in body):
            refuse_repeated_names(body)
        return obj
    except (ValueError, UnicodeDecodeError) as e:
        raise GatewayError(400, "invalid_request",
                           "the request body is not valid JSON: %s" % e) \
            from None
    except RecursionError:
        raise GatewayError(400, "invalid_request",
                           "the request body is nested too deeply") from None


def refuse_repeated_names(body: bytes) -> None:
    """400 when the body's top level names "model" or "stream" twice."""
    objects = []  # the pairs of every object; the top level's come last
    json.loads(body, object_pairs_hook=lambda pairs: objects.append(
        pairs) or dict(pairs))
    names = [name for name, _ in objects[-1]]
    for name in ("model", "stream"):
        if names.count(name) > 1:
            raise GatewayError(400, "invalid_request",
                               "the request body names %r more than once"
                               % name, param=name)


def model_of(obj, req: Request) -> str | None:
    if isinstance(obj, dict):
        model = obj.get("model")
        if not isinstance(model, str) or not model:
            return None
        if len(model) > 256:
            raise GatewayError(400, "invalid_request",
                               "the model name is longer than 256 "
                               "characters", param="model")
        try:
            model.encode("utf-8")
        except UnicodeEncodeError:
            raise GatewayError(400, "invalid_request",
                               "the model name is not valid UTF-8",
                               param="model") from None
        return model
    ctype = req.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data") and req.body:
        # audio transcription and similar uploads name the model in a part
        found = re.search(rb'name="model"\r\n(?:[^\r\n]*\r\n)*\r\n([^\r\n]*)',
                          req.body[:65536])
        if found:
            return found.group(1).decode("utf-8", "replace") or None
    return None


class ProxyMixin:
    """The proxy routes, mixed into the connection handler."""

    def authenticate(self, req: Request) -> VirtualKey:
        """The request's virtual key; unknown keys are refused, and an
        address that keeps sending them is slowed down."""
        gw = self.gw
        secret = client_secret(req.headers)
        key = gw.keys.lookup(secret) if secret else None
        if key is not None:
            return key
        if secret:
            wait = gw.auth_throttle.blocked_for(req.client)
            gw.auth_throttle.failed(req.client)
            if wait > 0:
                raise GatewayError(
                    429, "rate_limit_exceeded",
                    "too many requests with unknown keys from this "
                    "address; retry in %.0f s" % wait,
                    headers=retry_headers(wait))
        raise GatewayError(
            401, "invalid_api_key",
            "unknown virtual key: send the key the gateway's operator "
            "gave you (sk-gw-...) as the API key" if secret else
            "no virtual key: send it as the API key (Authorization: "
            "Bearer sk-gw-... or x-api-key: sk-gw-...)",
            headers={"x-should-retry": "false"})

    def serve_proxy(self, req: Request, route: Route) -> None:
        gw = self.gw
        key = self.authenticate(req)
        ex = Exchange(req, route, key)
        self.exchange = ex
        gw.exchanges.add(ex)
        try:
            self._proxy(ex)
        except GatewayError as err:
            ex.status = err.status
            ex.error = ex.error or err.code or "error"
            self.finish_exchange(ex)
            raise
        except ClientGone:
            ex.error = ex.error or "client_disconnected"
            self.close_connection = True
            self.finish_exchange(ex)
        except UpstreamFailed as e:
            ex.error = e.kind
            self.close_connection = True
            self.finish_exchange(ex)
        except BaseException:
            ex.status = ex.status or 500
            ex.error = ex.error or "internal_error"
            self.finish_exchange(ex)
            raise
        finally:
            gw.exchanges.discard(ex)
            if ex.reserved:
                gw.limiter.release(key.id, ex.reserved)

    def _proxy(self, ex: Exchange) -> None:
        gw, req, route = self.gw, ex.req, ex.route
        gw.limiter.check_key(ex.key, time.time())
        req.body = self.read_body(req)
        obj = parse_json_body(req)
        ex.body_obj = obj
        model = model_of(obj, req)
        ex.model = model
        if (isinstance(obj, dict) or req.method == "POST") and \
                route.kind in MODEL_PATHS and not route.explicit and \
                model is None:
            raise GatewayError(400, "invalid_request",
                               "the request body must name a \"model\"",
                               param="model")
        sent_model = choose_provider(gw.config, route, model)
        if route.provider is None:
            raise GatewayError(400, "invalid_request",
                               "no provider is configured for this request:"
                               " set default_provider in the config")
        ex.model = sent_model
        if not gw.usage_log.available():
            raise storage_error()
        ex.reserved = gw.limiter.admit(
            ex.key, sent_model, self.estimate_cost(ex, obj))
        body, strip = req.body, False
        if isinstance(obj, dict):
            renamed = sent_model != model
            options = obj.get("stream_options")
            strip = (obj.get("stream") is True
                     and route.kind in ("/chat/completions", "/completions")
                     and not (isinstance(options, dict)
                              and options.get("include_usage")))
            if strip and not renamed and "stream_options" not in obj and \
                    body.lstrip()[:1] == b"{":
                # add the option as text: re-encoding a long prompt costs
                # far more than this, and the client's bytes stay as sent
                at = body.index(b"{") + 1
                body = body[:at] + b'"stream_options":{"include_usage":' \
                    b'true},' + body[at:]
            elif renamed or strip:
                obj["model"] = sent_model
                if strip:
                    obj["stream_options"] = dict(
                        options if isinstance(options, dict) else {},
                        include_usage=True)
                body = json.dumps(obj).encode()
        conn, resp = self.send_upstream(ex, body)
        self.relay(ex, conn, resp, strip)

    def estimate_cost(self, ex: Exchange, obj) -> float:
        """A cost to reserve against the budget while the request runs."""
        if ex.key.budget_usd is None:
            return 0.0
        usage = Usage()
        usage.input = estimate_tokens(request_text_chars(obj))
        if isinstance(obj, dict):
            wanted = obj.get("max_tokens") or obj.get(
                "max_completion_tokens") or obj.get("max_output_tokens")
            usage.output = min(wanted, 4096) if isinstance(
                wanted, int) and wanted > 0 else 256
        return self.gw.prices.cost(ex.model, usage) or 0.0

    # talking to the provider

    def send_upstream(self, ex: Exchange, body: bytes) -> tuple:
        """Send the request, trying the provider's next key on failure.

        Another key is tried on a connection failure, a 429 or a 5xx, all
        before any byte reached the client. A request that may have reached
        the provider without an answer (a timeout, a reset after sending)
        is not sent again unless it may be repeated (see _attempt): it
        could be billed twice.
        """
        provider = ex.route.provider
        pool = self.gw.pool
        target = ex.route.upstream_target()
        keys = provider.keys_in_turn()
        for attempt, real_key in enumerate(keys):
            last = attempt == len(keys) - 1
            headers = upstream_headers(ex.req.headers, provider, real_key)
            try:
                conn, resp = self._attempt(pool, provider, ex.req.method,
                                           target, body, headers)
            except CannotConnect as e:
                timeout = isinstance(e.reason, socket.timeout)
                if last or timeout:  # every key goes to the same host
                    raise GatewayError(
                        504 if timeout else 502,
                        "upstream_timeout" if timeout else "upstream_error",
                        "cannot reach provider %r at %s: %s" % (
                            provider.name, provider.base_url,
                            e.reason or "connection timed out")) from None
                log.warning("provider %s: cannot connect (%s), trying its "
                            "next key", provider.name, e.reason)
                continue
            status = resp.status
            if (status == 429 or status >= 500) and not last:
                log.warning("provider %s answered %d, trying its next key",
                            provider.name, status)
                conn.close()
                continue
            return conn, resp
        raise AssertionError("unreachable")

    def _attempt(self, pool, provider, method, target, body, headers):
        """One request on a pooled connection; sent again on a new one
        only when the provider cannot have started on it twice."""
        for attempt in range(2):
            conn, reused = pool.get(provider, fresh=attempt > 0)
            if conn.sock is None:
                try:
                    pool.connect(conn)
                except OSError as e:  # refused, unreachable, TLS, timeout
                    conn.close()
                    raise CannotConnect(e) from None
            try:
                conn.send_request(method, target, headers, body)
            except ValueError:  # a target that cannot go on the wire
                conn.close()
                raise GatewayError(400, "invalid_request",
                                   "the request cannot be forwarded as it "
                                   "is") from None
            except socket.timeout:
                conn.close()
                raise GatewayError(
                    504, "upstream_timeout",
                    "provider %r did not take the request in time"
                    % provider.name) from None
            except OSError as e:  # (TLS: SSLEOFError as well as resets)
                # it may have answered (a 413, say) and closed before
                # reading the whole body: that answer is the one to give
                resp = conn.early_answer(method)
                if resp is not None:
                    return conn, resp
                conn.close()
                if reused:
                    continue  # it never went out whole: no harm in resending
                raise GatewayError(
                    502, "upstream_error",
                    "provider %r closed the connection while the request "
                    "was being sent (%s)" % (provider.name,
                                             type(e).__name__)) from None
            try:
                return conn, conn.getresponse(method)
            except STALE_CONNECTION_ERRORS as e:
                conn.close()
                # Sent again on a new connection only if repeating it is
                # harmless: by its method, or by an Idempotency-Key the
                # provider dedupes on. A POST that went out as the provider
                # closed the idle connection it went on therefore gets a
                # 502, which the SDKs retry themselves.
                if reused and (method in IDEMPOTENT_METHODS
                               or "idempotency-key" in headers):
                    continue
                raise GatewayError(
                    502, "upstream_error",
                    "provider %r closed the connection without an answer"
                    " (%s)" % (provider.name, type(e).__name__)) from None
            except socket.timeout:
                conn.close()
                raise GatewayError(
                    504, "upstream_timeout",
                    "provider %r did not answer in time" % provider.name) \
                    from None
            except BadAnswer as e:
                conn.close()
                raise GatewayError(
                    502, "upstream_error",
                    "provider %r %s; the gateway cannot relay it"
                    % (provider.name, e)) from None
            except (OSError, http.client.HTTPException, ValueError) as e:
                conn.close()
                raise GatewayError(
                    502, "upstream_error",
                    "provider %r failed: %s" % (provider.name,
                                                type(e).__name__)) from None
        raise GatewayError(502, "upstream_error",
                           "provider %r keeps closing connections"
                           % provider.name)

    # relaying the answer

    def response_headers(self, resp) -> list:
        out = []
        for name, value in resp.getheaders():
            if name.lower() not in HOP_BY_HOP:
                out.append((name, value))
        return out

    def relay(self, ex: Exchange, conn, resp, strip: bool) -> None:
        provider = ex.route.provider
        ex.status = resp.status
        ex.upstream_request_id = resp.getheader("x-request-id") or \
            resp.getheader("request-id")
        if 300 <= resp.status < 400 and resp.status != 304:
            location = resp.getheader("location", "")
            conn.close()
            raise GatewayError(502, "upstream_error",
                               "provider %r answered with a redirect to %r,"
                               " which the gateway does not follow"
                               % (provider.name, location[:200]))
        ctype = (resp.getheader("content-type") or "").lower()
        if resp.status < 300 and "text/event-stream" in ctype and \
                resp.status != 204 and ex.req.method != "HEAD":
            self.relay_stream(ex, conn, resp, strip)
        else:
            self.relay_body(ex, conn, resp)

    def relay_body(self, ex: Exchange, conn, resp) -> None:
        """Relay a whole response, reading usage from it first."""
        provider = ex.route.provider
        pieces = body_pieces(resp)
        parts, size = [], 0
        try:
            for data in pieces:
                parts.append(data)
                size += len(data)
                if size > MAX_BUFFERED_RESPONSE:
                    return self.relay_large(ex, conn, resp, b"".join(parts),
                                            pieces)
        except socket.timeout:
            conn.close()
            raise GatewayError(504, "upstream_timeout",
                               "provider %r stopped sending its answer"
                               % provider.name) from None
        except http.client.IncompleteRead as e:
            conn.close()
            raise GatewayError(502, "upstream_error",
                               "provider %r closed its answer %d bytes "
                               "short of its Content-Length"
                               % (provider.name, e.expected) if e.expected
                               else "provider %r sent an incomplete answer"
                               % provider.name) from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise GatewayError(502, "upstream_error",
                               "provider %r sent an incomplete answer (%s)"
                               % (provider.name, type(e).__name__)) \
                from None
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        if resp.will_close:
            conn.close()
        else:
            self.gw.pool.put(provider, conn)
        ctype = (resp.getheader("content-type") or "").lower()
        if resp.status >= 400:
            ex.error = "provider_error"
        elif resp.status in (204, 304) or ex.req.method == "HEAD":
            pass  # no body, no usage
        elif "json" in ctype or ex.route.kind in MODEL_PATHS:
            try:
                obj = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise GatewayError(502, "upstream_error",
                                   "provider %r answered with a body that "
                                   "is not JSON" % provider.name) from None
            ex.usage = usage_from_body(obj, ex.route.kind,
                                       ex.route.anthropic_format)
        if self.client_left():  # (its own timeout, say)
            # sent all the same: it may have closed only its sending side
            ex.error = ex.error or "client_disconnected"
            self.close_connection = True
        ex.first_byte()
        if not self.finish_exchange(ex):
            raise storage_error()
        headers = self.response_headers(resp)
        try:
            self.send_bytes(resp.status, headers, body, ex.req)
        except OSError:
            self.close_connection = True

    def relay_large(self, ex: Exchange, conn, resp, first: bytes,
                    pieces) -> None:
        """Relay a response too large to hold, reading usage from its tail.

        The last piece is held back until the usage row is committed.
        """
        if not ex.req.keep_alive:
            self.close_connection = True
        ex.first_byte()
        length = resp.length  # None when chunked or ending with the close
        chunked = length is None
        if chunked and ex.req.version == "HTTP/1.0":
            self.close_connection = True
            chunked = False
        head = self.head_bytes(resp.status, self.response_headers(resp),
                               length, chunked, ex.req)
        tail = first[-65536:]
        try:
            self.write_client(head)
            held = first
            try:
                for data in pieces:
                    self.write_client(self.frame(held, chunked))
                    held = data
                    tail = (tail + data)[-65536:]
            except (OSError, http.client.HTTPException) as e:
                raise cut_answer(e) from None  # (the client's: ClientGone)
        except (ClientGone, UpstreamFailed):
            estimate_usage(ex)  # the usage was in the part never read
            raise
        finally:
            conn.close()
        at = tail.rfind(b'"usage"')
        if at >= 0:
            try:
                obj, _ = json.JSONDecoder().raw_decode(
                    tail[at:].decode("utf-8", "replace").split(":", 1)[1]
                    .lstrip())
                ex.usage = usage_from(obj, ex.route.anthropic_format)
            except (ValueError, IndexError):
                pass
        if not self.finish_exchange(ex):
            self.close_connection = True  # the client sees a cut answer
            return
        self.write_client(self.frame(held, chunked) +
                          (b"0\r\n\r\n" if chunked else b""))

    def relay_stream(self, ex: Exchange, conn, resp, strip: bool) -> None:
        """Relay server-sent events as they arrive, reading usage as they go.

        The usage row is committed before the last byte (the end of the
        chunked body) is sent.
        """
        provider = ex.route.provider
        ex.streamed = True
        meter = StreamMeter(ex.route.anthropic_format,
                            ex.route.kind.startswith("/responses"), strip)
        ex.meter, ex.usage = meter, meter.usage  # seen live at shutdown
        chunked = ex.req.version == "HTTP/1.1"
        if not chunked or not ex.req.keep_alive:
            self.close_connection = True
        head = self.head_bytes(resp.status, self.response_headers(resp),
                               None, chunked, ex.req)
        pending = head
        finished = False
        try:
            try:
                for data in body_pieces(resp):
                    out = meter.feed(data)
                    if out:
                        ex.first_byte()
                        self.write_client(pending + self.frame(out, chunked))
                        pending = b""
            except (OSError, http.client.HTTPException) as e:
                raise cut_answer(e) from None  # (the client's: ClientGone)
            finished = True
        except UpstreamFailed as e:
            ex.error = e.kind
            raise
        except ClientGone:
            ex.error = "client_disconnected"
            raise
        finally:
            if not meter.final:
                estimate_usage(ex)
            if finished and not resp.will_close:
                self.gw.pool.put(provider, conn)
            else:
                conn.close()
            if not finished:
                self.finish_exchange(ex)
        if not meter.done and ex.error is None:
            ex.error = "upstream_truncated"
        rest = meter.rest()
        ex.first_byte()
        if not self.finish_exchange(ex):
            self.close_connection = True  # the client sees a cut stream
            return
        self.write_client(pending + self.frame(rest, chunked) +
                          (b"0\r\n\r\n" if chunked else b""))

    @staticmethod
    def frame(data: bytes, chunked: bool) -> bytes:
        if not data:
            return b""
        if chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def write_client(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.connection.sendall(data)
        except OSError:
            raise ClientGone() from None

    def client_left(self) -> bool:
        """Has the client closed the connection, or its sending side,
        while waiting?

        A write to a closed connection still succeeds, so the answer would
        count as delivered. Where the system cannot tell (no POLLRDHUP,
        outside Linux), the answer counts as delivered.
        """
        try:
            poller = select.poll()
            poller.register(self.connection, _CLIENT_CLOSED)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return False

    def finish_exchange(self, ex: Exchange) -> bool:
        return record_exchange(self.gw, ex)


def estimate_usage(ex: Exchange) -> None:
    """Fill in tokens the provider never reported for a cut stream."""
    usage = ex.usage
    if not usage.reported:
        usage.input = estimate_tokens(request_text_chars(ex.body_obj))
        usage.estimated = True
    if ex.meter is not None:
        estimate = estimate_tokens(ex.meter.text_chars)
        if estimate > usage.output:
            usage.output = estimate
            usage.estimated = True


def record_exchange(gw, ex: Exchange, wait: bool = True,
                    shutdown: bool = False) -> bool:
    """Write an exchange's usage row (once) and settle the key's limits.

    Returns False when the row could not be committed: the caller must not
    then send the response's last byte. The row stays queued, marked as
    refused for storage, and is written once the database recovers. With
    wait=False the row is only queued (a refusal needs no commit first);
    shutdown records a request still in flight when the drain ends.
    """
    with gw.record_lock:  # the request's thread, or shutdown, not both
        if ex.recorded:
            return True
        ex.recorded = True
        if shutdown:
            ex.error = ex.error or "shutdown"
            if ex.meter is None or not ex.meter.final:
                estimate_usage(ex)
    usage = ex.usage
    latency_ms = (time.monotonic() - ex.req.started) * 1000
    cost = gw.prices.cost(ex.model, usage)
    provider = ex.route.provider.name if ex.route.provider else None
    row = (iso(utcnow()), ex.req.id, ex.key.id, ex.key.project,
           provider, ex.model, ex.req.path, ex.status or 0,
           usage.input, usage.output, usage.cached, usage.cache_write,
           usage.reasoning, cost,
           round(ex.ttfb_ms, 3) if ex.ttfb_ms is not None else None,
           round(latency_ms, 3), int(ex.streamed), int(usage.estimated),
           ex.upstream_request_id, ex.error)
    wait = wait and ex.error != "storage_unavailable"
    committed = gw.usage_log.record(row, wait)
    gw.limiter.settle(ex.key.id, ex.reserved, cost, usage.total())
    ex.reserved = 0.0
    ex.cost_usd = cost
    if wait and not committed:
        ex.status, ex.error = 503, "storage_unavailable"
        gw.usage_log.amend(row, row[:7] + (503,) + row[8:-1] +
                           ("storage_unavailable",))
        return False
    return True


# ===== admin
#
# Key fields as the CLI and the admin API take them, and the admin routes.

_DURATION = re.compile(r"(\d+)\s*([hdw])\Z")


def parse_expiry(text: str) -> str:
    """'30d', '12h', '2w', a date (valid through its end) or an ISO time."""
    text = str(text).strip()
    found = _DURATION.match(text)
    if found:
        hours = {"h": 1, "d": 24, "w": 24 * 7}[found.group(2)]
        return iso(utcnow() + dt.timedelta(
            hours=int(found.group(1)) * hours))
    return iso(parse_time(text, end_of_day=True))


def parse_models(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(
            isinstance(v, str) for v in value):
        raise UsageError("models must be a list of globs such as "
                         "[\"gpt-4o*\", \"claude-*\"]")
    return [v.strip() for v in value if v.strip()]


def _number(name: str, value, integer: bool):
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise UsageError("%s must be a number, not %r" % (name, value)) \
                from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            value < 0 or value >= 2 ** 63 or math.isnan(value) or \
            (integer and (value == 0 or not float(value).is_integer())):
        raise UsageError("%s must be a %s, not %r" % (
            name, "positive whole number" if integer else
            "number of USD, 0 or more", value))
    return int(value) if integer else float(value)


def key_fields(data: dict, creating: bool) -> dict:
    """Validate key fields from the CLI or the admin API.

    Keys absent from `data` are left out, so an update changes only what
    it names; a null clears a limit.
    """
    known = ("project", "name", "budget_usd", "budget_period", "rpm", "tpm",
             "models", "expires_at")
    unknown = [k for k in data if k not in known]
    if unknown:
        raise UsageError("unknown field %r (known: %s)"
                         % (unknown[0], ", ".join(known)))
    out = {}
    if creating or "project" in data:
        project = data.get("project")
        if not isinstance(project, str) or not project.strip():
            raise UsageError("a key needs a project: a non-empty name")
        out["project"] = project.strip()
    if "name" in data:
        name = data["name"]
        if name is not None and not isinstance(name, str):
            raise UsageError("name must be a string")
        out["name"] = name
    if "budget_usd" in data:
        out["budget_usd"] = _number("budget", data["budget_usd"], False)
    if "budget_period" in data and data["budget_period"] is not None:
        if data["budget_period"] not in BUDGET_PERIODS:
            raise UsageError("budget period must be one of %s, not %r"
                             % (", ".join(BUDGET_PERIODS),
                                data["budget_period"]))
        out["budget_period"] = data["budget_period"]
    elif creating and out.get("budget_usd") is not None:
        out["budget_period"] = "month"
    for name in ("rpm", "tpm"):
        if name in data:
            out[name] = _number(name, data[name], True)
    if "models" in data:
        out["models"] = parse_models(data["models"])
    if "expires_at" in data:
        value = data["expires_at"]
        out["expires_at"] = None if value in (None, "", "never") else \
            parse_expiry(value)
    return out


class AdminMixin:
    """The admin API, mixed into the connection handler."""

    def serve_admin(self, req: Request) -> None:
        self.require_admin(req)
        if req.method in ("POST", "PATCH") and not req.path.endswith(
                "/rotate"):
            req.body = self.read_body(req)
        path = req.path.rstrip("/")
        params = dict(urllib.parse.parse_qsl(req.query))
        parts = path.split("/")[2:]  # after /admin
        try:
            if parts == ["virtual-keys"]:
                if req.method == "POST":
                    return self.admin_create(req)
                if req.method == "GET":
                    return self.admin_list(req, params)
            elif len(parts) == 2 and parts[0] == "virtual-keys":
                if req.method == "GET":
                    return self.admin_show(req, parts[1])
                if req.method == "PATCH":
                    return self.admin_update(req, parts[1])
                if req.method == "DELETE":
                    return self.admin_revoke(req, parts[1])
            elif len(parts) == 3 and parts[0] == "virtual-keys" and \
                    parts[2] == "rotate" and req.method == "POST":
                return self.admin_rotate(req, parts[1])
            elif parts == ["usage-stats"] and req.method == "GET":
                return self.admin_stats(req, params)
            elif parts == ["usage"] and req.method == "GET":
                return self.admin_usage(req, params)
        except UsageError as e:
            raise GatewayError(400, "invalid_request", str(e)) from None
        raise GatewayError(404, "not_found", "no admin route %s %s"
                           % (req.method, req.path))

    def require_admin(self, req: Request) -> None:
        admin_key = self.gw.config.admin_key
        if not admin_key:
            raise GatewayError(
                403, "forbidden",
                "no admin key is configured: run `python3 llmgw.py init`, "
                "or set admin_key in the config or LLMGW_ADMIN_KEY in the "
                "environment", headers={"x-should-retry": "false"})
        wait = self.gw.auth_throttle.blocked_for(req.client)
        given = client_secret(req.headers) or ""
        if not hmac.compare_digest(given.encode("utf-8", "replace"),
                                   admin_key.encode("utf-8", "replace")):
            if given:
                self.gw.auth_throttle.failed(req.client)
            if wait > 0:
                raise GatewayError(429, "rate_limit_exceeded",
                                   "too many failed admin attempts from "
                                   "this address", headers=retry_headers(
                                       wait))
            raise GatewayError(401, "invalid_api_key",
                               "the admin API needs Authorization: Bearer "
                               "<admin key>", headers={
                                   "x-should-retry": "false"})

    def admin_json(self, req: Request) -> dict:
        try:
            data = json.loads(req.body or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise UsageError("the request body is not valid JSON: %s" % e) \
                from None
        if not isinstance(data, dict):
            raise UsageError("the request body must be a JSON object")
        return data

    def key_or_404(self, key_id: str) -> dict:
        key = self.gw.store.get_key(key_id)
        if key is None:
            raise GatewayError(404, "not_found", "no key with id %r"
                               % key_id[:64])
        return key

    def admin_create(self, req: Request) -> None:
        fields = key_fields(self.admin_json(req), creating=True)
        key, secret = self.gw.store.create_key(fields)
        self.gw.keys.refresh()
        key["secret"] = secret
        self.send_json(201, key, req)

    def admin_list(self, req: Request, params: dict) -> None:
        keys = self.gw.store.list_keys(
            params.get("project"), params.get("all") in ("1", "true"))
        now = utcnow()
        data = [self.gw.store.with_spend(k, now) for k in keys]
        self.send_json(200, {"object": "list", "data": data}, req)

    def admin_show(self, req: Request, key_id: str) -> None:
        key = self.key_or_404(key_id)
        self.send_json(200, self.gw.store.with_spend(key), req)

    def admin_update(self, req: Request, key_id: str) -> None:
        self.key_or_404(key_id)
        fields = key_fields(self.admin_json(req), creating=False)
        key = self.gw.store.update_key(key_id, fields)
        self.gw.keys.refresh()
        self.gw.limiter.forget(key_id)
        self.send_json(200, self.gw.store.with_spend(key), req)

    def admin_revoke(self, req: Request, key_id: str) -> None:
        self.key_or_404(key_id)
        key = self.gw.store.revoke_key(key_id)
        self.gw.keys.refresh()
        self.send_json(200, key, req)

    def admin_rotate(self, req: Request, key_id: str) -> None:
        self.key_or_404(key_id)
        key, secret = self.gw.store.rotate_key(key_id)
        self.gw.keys.refresh()
        key["secret"] = secret
        self.send_json(200, key, req)

    def admin_stats(self, req: Request, params: dict) -> None:
        self.send_json(200, stats_report(self.gw.store, params), req)

    def admin_usage(self, req: Request, params: dict) -> None:
        limit = min(_number("limit", params.get("limit", "100"), True),
                    10000)
        after = int(_number("after_id", params.get("after_id", "0") or "0",
                            False))
        since = params.get("since")
        rows = self.gw.store.usage_rows(
            iso(parse_time(since)) if since else None, after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        self.send_json(200, {
            "object": "list", "data": rows, "has_more": more,
            "next_after_id": rows[-1]["id"] if rows else after}, req)


def stats_report(store: Store, params: dict) -> dict:
    """Usage statistics as `stats --output json` and the admin API give them."""
    by = params.get("by") or "project"
    if by not in STATS_GROUPS:
        raise UsageError("by must be one of %s, not %r"
                         % (", ".join(STATS_GROUPS), by))
    since, until = params.get("since"), params.get("until")
    since = iso(parse_time(since)) if since else None
    until = iso(parse_time(until, end_of_day=True)) if until else None
    rows = store.stats(by, since, until, params.get("project"),
                       params.get("key"), params.get("model"))
    for row in rows:
        row[by] = row.pop("grp")
    total = {"requests": 0, "errors": 0, "input_tokens": 0,
             "cached_input_tokens": 0, "cache_write_tokens": 0,
             "output_tokens": 0, "reasoning_tokens": 0, "cost_usd": 0.0,
             "unpriced": 0, "estimated": 0}
    for row in rows:
        for name in total:
            total[name] += row[name] or 0
    total["cost_usd"] = round(total["cost_usd"], 6)
    return {"object": "list", "by": by, "since": since, "until": until,
            "data": rows, "total": total}


# ===== server
#
# The gateway object that owns all state, the route table, metrics, the
# access log, signals and systemd notification.

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _label(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters for GET /metrics, in memory since the process started."""

    # Model names come from clients, refused ones too: past this many, a
    # new name is counted under "(other)", so /metrics stays bounded.
    MAX_MODELS = 1000

    def __init__(self):
        self.lock = threading.Lock()
        self.models = set()
        self.requests = collections.Counter()   # labels -> count
        self.tokens = collections.Counter()     # labels + kind -> tokens
        self.cost = collections.Counter()       # labels -> USD
        self.latency = {}                       # provider -> bucket counts
        self.inflight = 0

    def observe(self, provider, model, project, status, usage, cost,
                latency_ms) -> None:
        seconds = latency_ms / 1000.0
        with self.lock:
            if model and model not in self.models:
                if len(self.models) < self.MAX_MODELS:
                    self.models.add(model)
                else:
                    model = "(other)"
            labels = (provider or "", model or "", project or "", status)
            self.requests[labels] += 1
            if usage is not None:
                for kind, count in (("input", usage.input),
                                    ("output", usage.output),
                                    ("cached_input", usage.cached),
                                    ("cache_write", usage.cache_write)):
                    if count:
                        self.tokens[labels[:3] + (kind,)] += count
            if cost:
                self.cost[labels[:3]] += cost
            if provider:
                hist = self.latency.get(provider)
                if hist is None:
                    hist = self.latency[provider] = [
                        0] * (len(LATENCY_BUCKETS_S) + 1) + [0.0]
                for i, bound in enumerate(LATENCY_BUCKETS_S):
                    if seconds <= bound:
                        hist[i] += 1
                        break
                else:
                    hist[len(LATENCY_BUCKETS_S)] += 1
                hist[-1] += seconds

    def render(self) -> str:
        out = []
        with self.lock:
            out.append("# HELP llmgw_requests_total Proxied requests.")
            out.append("# TYPE llmgw_requests_total counter")
            for (prov, model, proj, status), n in sorted(
                    self.requests.items()):
                out.append('llmgw_requests_total{provider="%s",model="%s",'
                           'project="%s",status="%s"} %d' % (
                               _label(prov), _label(model), _label(proj),
                               status, n))
            out.append("# HELP llmgw_tokens_total Tokens, by kind.")
            out.append("# TYPE llmgw_tokens_total counter")
            for (prov, model, proj, kind), n in sorted(self.tokens.items()):
                out.append('llmgw_tokens_total{provider="%s",model="%s",'
                           'project="%s",kind="%s"} %d' % (
                               _label(prov), _label(model), _label(proj),
                               kind, n))
            out.append("# HELP llmgw_cost_usd_total Cost of priced "
                       "requests in USD.")
            out.append("# TYPE llmgw_cost_usd_total counter")
            for (prov, model, proj), usd in sorted(self.cost.items()):
                out.append('llmgw_cost_usd_total{provider="%s",model="%s",'
                           'project="%s"} %.6f' % (
                               _label(prov), _label(model), _label(proj),
                               usd))
            out.append("# HELP llmgw_request_duration_seconds Time from "
                       "request to last byte, proxied requests.")
            out.append("# TYPE llmgw_request_duration_seconds histogram")
            for prov, hist in sorted(self.latency.items()):
                running = 0
                for bound, n in zip(LATENCY_BUCKETS_S, hist):
                    running += n
                    out.append('llmgw_request_duration_seconds_bucket{'
                               'provider="%s",le="%g"} %d'
                               % (_label(prov), bound, running))
                running += hist[len(LATENCY_BUCKETS_S)]
                out.append('llmgw_request_duration_seconds_bucket{'
                           'provider="%s",le="+Inf"} %d'
                           % (_label(prov), running))
                out.append('llmgw_request_duration_seconds_sum{'
                           'provider="%s"} %.6f' % (_label(prov), hist[-1]))
                out.append('llmgw_request_duration_seconds_count{'
                           'provider="%s"} %d' % (_label(prov), running))
            out.append("# HELP llmgw_inflight_requests Proxied requests "
                       "being served now.")
            out.append("# TYPE llmgw_inflight_requests gauge")
            out.append("llmgw_inflight_requests %d" % self.inflight)
        return "\n".join(out) + "\n"


class AccessFormatter(logging.Formatter):
    """Log records as text lines or JSON objects, control chars escaped."""

    def __init__(self, as_json: bool):
        super().__init__()
        self.as_json = as_json

    def format(self, record):
        fields = getattr(record, "access", None)
        return self.line(
            record.created, record.levelname.lower(), fields,
            record.getMessage() if fields is None else None,
            self.formatException(record.exc_info) if record.exc_info
            else None)

    def line(self, created: float, level: str, fields: dict | None = None,
             message: str | None = None, traceback: str | None = None):
        """One line: the access fields of a request, or a message."""
        t = time.gmtime(created)
        stamp = "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
            t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec,
            int(created % 1 * 1000))
        if self.as_json:
            obj = {"time": stamp, "level": level}
            if fields is not None:
                obj.update(fields)
            else:
                obj["message"] = message
            if traceback:
                obj["traceback"] = traceback
            return json.dumps(obj)
        if fields is not None:
            text = escape_control(" ".join(
                ["%s=%s" % (name, logfmt(value))
                 for name, value in fields.items() if value is not None]))
        else:
            text = escape_control(message)
        line = "%s %s %s" % (stamp, level, text)
        if traceback:
            line += "\n" + traceback
        return line


class BackgroundLogHandler(logging.Handler):
    """Format and write log records in a thread of their own.

    A request thread only appends its record to a queue, so writing the
    access log (a syscall, often to a pipe) never delays a response. The
    writer wakes every INTERVAL_S and writes what piled up in one go, so a
    busy gateway pays one write per interval, not one per request. close()
    writes what is left.
    """

    INTERVAL_S = 0.05

    def __init__(self, stream):
        super().__init__()
        self.stream = stream
        self.records = collections.deque()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llmgw-log",
                                       daemon=True)
        self.thread.start()

    def emit(self, record):
        self.records.append(record)

    def access(self, fields: dict) -> None:
        """Queue a request's access line, without the logging module's
        LogRecord (most of the cost of logging it)."""
        self.records.append((time.time(), fields))

    def _run(self) -> None:
        while not self.stopped.wait(self.INTERVAL_S):
            self._drain()

    def _drain(self) -> None:
        lines = []
        while self.records:
            record = self.records.popleft()
            try:
                if type(record) is tuple:  # from access()
                    lines.append(self.formatter.line(record[0], "info",
                                                     record[1]))
                else:
                    lines.append(self.format(record))
            except Exception:  # a broken record must not stop the log
                if type(record) is tuple:
                    lines.append(escape_control(repr(record[1])))
                else:
                    self.handleError(record)
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr is gone; nothing better to do

    def close(self):
        self.stopped.set()
        self.thread.join(timeout=2)
        self._drain()
        super().close()


class Handler(ProxyMixin, AdminMixin, ConnectionHandler):
    """Route each request to /health, /metrics, the admin API or the proxy.

        GET  /health                 no auth
        GET  /metrics                admin key
        *    /admin/...              admin key
        GET  /v1/models              virtual key
        *    /v1/...                 virtual key: provider by model
        *    /{provider}/v1/...      virtual key: that provider
    """

    def dispatch(self, req: Request) -> None:
        try:
            route = self.route(req)
        except GatewayError as err:
            self.record_refusal(req, err)
            raise
        if route is None:
            return  # answered: /health, /metrics or the admin API
        self.anthropic_errors = route.anthropic_errors
        if route.path == "/models" and req.method == "GET" and \
                not route.explicit:
            return self.serve_models(req)
        metrics = self.gw.metrics
        with metrics.lock:
            metrics.inflight += 1
        try:
            self.serve_proxy(req, route)
        finally:
            with metrics.lock:
                metrics.inflight -= 1

    def route(self, req: Request) -> Route | None:
        """The proxy route of a request; None once it has been answered."""
        path, query = split_target(req.target)
        req.path, req.query = path, query
        if path == "/health" and req.method in ("GET", "HEAD"):
            return self.send_json(200, {"status": "ok",
                                        "version": __version__}, req)
        if path == "/metrics" and req.method == "GET":
            self.require_admin(req)
            body = self.gw.metrics.render().encode()
            return self.send_bytes(200, [(
                "Content-Type", "text/plain; version=0.0.4")], body, req)
        if path == "/admin" or path.startswith("/admin/"):
            return self.serve_admin(req)
        route = resolve_route(self.gw.config, path, query)
        if route is None:
            raise GatewayError(404, "not_found",
                               "no route %s %s: the gateway serves /v1/..., "
                               "/{provider}/v1/..., /health and /admin/..."
                               % (req.method, path[:200]))
        if req.method not in PROXY_METHODS:
            # TRACE above all: a provider would echo the real key back
            raise GatewayError(405, "invalid_request",
                               "method %s is not forwarded to providers"
                               % req.method[:20],
                               headers={"Allow": ", ".join(PROXY_METHODS)})
        return route

    def record_refusal(self, req: Request, err: GatewayError) -> None:
        """A usage row for a valid key refused before it was routed."""
        secret = client_secret(req.headers)
        key = self.gw.keys.lookup(secret) if secret else None
        if key is None or req.path == "/metrics" or \
                req.path.startswith("/admin"):
            return  # not a proxy route: nothing to account for
        req.path = req.path or req.target.partition("?")[0][:200]
        ex = Exchange(req, Route(None, req.path, "", False, False), key)
        ex.status, ex.error = err.status, err.code
        record_exchange(self.gw, ex, wait=False)

    def serve_models(self, req: Request) -> None:
        """GET /v1/models: the models this key may use, OpenAI format.

        Answered from memory and not billable, so it writes no usage row
        and keeps working while the database cannot be written.
        """
        key = self.authenticate(req)
        self.gw.limiter.check_key(key, time.time())
        owners = {}
        for name in self.gw.prices.prices:
            provider = self.gw.config.provider_for_model(name)
            owners[name] = provider.name if provider else "unknown"
        for provider in self.gw.config.providers.values():
            for glob in provider.models:
                if not any(c in glob for c in "*?["):
                    owners[glob] = provider.name
        data = [{"id": name, "object": "model", "created": 0,
                 "owned_by": owner} for name, owner in sorted(owners.items())
                if key.allows(name)]
        self.send_json(200, {"object": "list", "data": data}, req)


class GatewayServer(ThreadingHTTPServer):
    """A thread per connection, with a cap on how many at once."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address, gateway, ssl_context=None):
        self.gateway = gateway
        self.ssl_context = ssl_context
        self.connections = 0
        self.count_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, Handler)
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(
                self.socket, server_side=True,
                do_handshake_on_connect=False)

    def process_request(self, request, client_address):
        limit = self.gateway.config.limits["max_connections"]
        with self.count_lock:
            full = self.connections >= limit
            if not full:
                self.connections += 1
        if full:
            self.refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            with self.count_lock:
                self.connections -= 1
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.count_lock:
                self.connections -= 1

    def refuse(self, request) -> None:
        """Answer 503 at once when max_connections are open."""
        err = GatewayError(503, "too_many_connections",
                           "the gateway is at its connection limit "
                           "(limits.max_connections); retry shortly",
                           headers=retry_headers(1.0))
        body = error_body(err, False)
        head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                "application/json\r\nRetry-After: 1\r\nContent-Length: "
                "%d\r\nConnection: close\r\n\r\n" % len(body))
        try:
            if not isinstance(request, ssl.SSLSocket):
                request.settimeout(0.5)
                request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        log.exception("unexpected error serving %s", client_address[0])


def sd_notify(message: str) -> None:
    """Tell systemd about our state when it is watching (Type=notify)."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            sock.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", target, e)


class Gateway:
    """Everything a running gateway knows, shared by its handler threads."""

    def __init__(self, config: Config, db_path: str):
        self.config = config
        self.db_path = db_path
        self.store = Store(db_path, config.durability)
        self.usage_log = UsageLog(db_path, config.durability)
        self.keys = KeyCache(self.store)
        self.limiter = Limiter(self.store)
        self.prices = PriceTable(config.prices)
        limits = config.limits
        self.pool = UpstreamPool(limits["upstream_connect_timeout_s"],
                                 limits["upstream_read_timeout_s"])
        self.metrics = Metrics()
        self.auth_throttle = AuthThrottle()
        self.watchdog = Watchdog()
        self.idle_connections = set()
        self.exchanges = set()  # proxied requests in flight
        self.record_lock = threading.Lock()
        self.draining = False
        self.stopping = threading.Event()
        self.server = None
        # Access lines go to the log writer directly, past the logger's
        # level and filters: they are INFO, and serve only ever sets INFO or
        # DEBUG. Without the writer (tests, embedding), through the logger.
        writer = next((h for h in log.handlers
                       if isinstance(h, BackgroundLogHandler)), None)
        self.log_access = writer.access if writer is not None else \
            lambda fields: log.info("request", extra={"access": fields})
        self._id_prefix = secrets.token_hex(3)
        self._ids = iter(range(1, 1 << 62))

    def new_request_id(self) -> str:
        return "req_%s%08x" % (self._id_prefix, next(self._ids))

    def after_request(self, req, status, ex) -> None:
        """The access log line and the request metrics."""
        if ex is not None:
            provider = ex.route.provider.name if ex.route.provider else None
            self.metrics.observe(provider, ex.model, ex.key.project, status,
                                 ex.usage, ex.cost_usd,
                                 (time.monotonic() - req.started) * 1000)
        if not log.isEnabledFor(logging.INFO):
            return
        fields = {
            "request_id": req.id if req else None,
            "client": req.client if req else None,
            "method": req.method if req else None,
            "path": (req.path or req.target.partition("?")[0][:200])
            if req else None,
            "status": status,
        }
        if ex is not None:
            usage = ex.usage
            fields.update(
                key_id=ex.key.id, project=ex.key.project, model=ex.model,
                input_tokens=usage.input, output_tokens=usage.output,
                cached_tokens=usage.cached or None,
                cost_usd=(round(ex.cost_usd, 6) if ex.cost_usd is not None
                          else None),
                error=ex.error)
        if req is not None:
            fields["latency_ms"] = round(
                (time.monotonic() - req.started) * 1000, 1)
        self.log_access(fields)

    # running

    def start(self, host: str, port: int, ssl_context=None) -> None:
        self.server = GatewayServer((host, port), self, ssl_context)
        threading.Thread(target=self.watchdog.run, name="llmgw-watchdog",
                         daemon=True).start()
        threading.Thread(target=self._housekeeping, name="llmgw-keys",
                         daemon=True).start()

    def _housekeeping(self) -> None:
        """Pick up key changes from other processes; keep the WAL small.

        The gateway's own connections never checkpoint (a checkpoint in a
        request thread would stall that request for milliseconds); this
        thread does, on a connection of its own, without blocking writers.
        """
        checkpointer = connect(self.db_path, self.config.durability)
        ticks = 0
        while not self.stopping.wait(0.25):
            ticks += 1
            try:
                self.keys.refresh()
                if self.usage_log.pending:  # refusals queued without a wait
                    self.usage_log.flush(probe=False)
                if ticks % 4 == 0:
                    checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as e:
                log.warning("database housekeeping failed: %s", e)
            if ticks % 240 == 0:
                self.auth_throttle.prune()
        checkpointer.close()

    def serve_forever(self) -> None:
        sd_notify("READY=1")
        try:
            self.server.serve_forever(poll_interval=0.2)
        finally:
            self.drain()

    def request_stop(self) -> None:
        """Stop accepting; serve_forever then drains (signal-safe)."""
        if not self.stopping.is_set():
            self.stopping.set()
            threading.Thread(target=self.server.shutdown,
                             daemon=True).start()

    def drain(self) -> None:
        """Let in-flight requests finish, commit their rows, close."""
        sd_notify("STOPPING=1")
        self.stopping.set()
        self.draining = True
        self.server.socket.close()
        for conn in list(self.idle_connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + self.config.limits["drain_timeout_s"]
        while self.server.connections and time.monotonic() < deadline:
            for conn in list(self.idle_connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            time.sleep(0.05)
        if self.server.connections:
            log.warning("drain timeout: %d connections still open; their "
                        "requests are recorded as cut by shutdown",
                        self.server.connections)
        for ex in list(self.exchanges):
            record_exchange(self, ex, shutdown=True)
        self.usage_log.flush()
        self.watchdog.stopped.set()
        self.pool.close()

    def reload(self, path: str | None) -> None:
        """Re-read the configuration (SIGHUP); keep the old one on error."""
        try:
            config = Config.load(path)
        except ConfigError as e:
            log.error("config not reloaded: %s", e)
            return
        if config.problems:
            log.error("config not reloaded: %s", "; ".join(config.problems))
            return
        self.prices = PriceTable(config.prices)
        self.pool.connect_timeout = config.limits[
            "upstream_connect_timeout_s"]
        self.pool.read_timeout = config.limits["upstream_read_timeout_s"]
        self.config = config
        log.info("configuration reloaded from %s", path or "defaults")


# ===== cli
#
# Noun-verb commands. Results go to stdout (a table for people, --output
# json for scripts); diagnostics to stderr. Mistakes raise UsageError, which
# main() prints as one sentence with exit status 1.

def print_table(rows: list, columns: list, out=None) -> None:
    """Print dicts as an aligned table; columns are (heading, key)."""
    out = out or sys.stdout
    cells = [[heading.upper() for heading, _ in columns]]
    for row in rows:
        cells.append([format_cell(row.get(key)) for _, key in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                  + "\n")


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "%.6f" % value if value < 1 else "%.2f" % value
    if isinstance(value, list):
        return ",".join(value) or "-"
    return escape_control(value)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def print_csv(rows: list, columns: list) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c)
                         for c in columns])


def load_config(args) -> Config:
    config = Config.load(args.config)
    if config.problems:
        raise ConfigError("%s: %s" % (config.path or "configuration",
                                      config.problems[0]))
    return config


def db_path(args, config: Config) -> str:
    """--db, else $LLMGW_DB, else the config's database, else llmgw.db."""
    if args.db:
        return args.db
    if os.environ.get("LLMGW_DB"):
        return os.environ["LLMGW_DB"]
    if config.database:
        if config.path and not os.path.isabs(config.database):
            # relative to the config file, wherever it is run from
            return os.path.join(os.path.dirname(os.path.abspath(
                config.path)), config.database)
        return config.database
    return DEFAULT_DB


def open_store(args) -> Store:
    config = load_config(args)
    return Store(db_path(args, config), config.durability)


def config_target(args) -> str:
    """The file that init and config set-key write."""
    return args.config or os.environ.get("LLMGW_CONFIG") or DEFAULT_CONFIG


KEY_TABLE = [("id", "id"), ("project", "project"), ("name", "name"),
             ("spend", "spend_period_usd"), ("budget", "budget_usd"),
             ("period", "budget_period"), ("rpm", "rpm"), ("tpm", "tpm"),
             ("models", "models"), ("expires", "expires_at"),
             ("status", "status")]


def key_status(key: dict) -> str:
    if key.get("revoked_at"):
        return "revoked"
    if key.get("expires_at") and key["expires_at"] <= iso(utcnow()):
        return "expired"
    return "active"


def show_keys(keys: list, output: str, secret: str | None = None) -> None:
    for key in keys:
        key["status"] = key_status(key)
    if output == "json":
        if secret is not None:
            keys[0]["secret"] = secret
            print_json(keys[0])
        else:
            print_json(keys)
        return
    print_table(keys, KEY_TABLE)
    if secret is not None:
        sys.stdout.write("\nsecret: %s\n" % secret)
        sys.stderr.write("Store this secret now: it is shown only once.\n")


def key_args(args) -> dict:
    """Key fields given on the command line ('none' clears a limit)."""
    data = {}
    for flag, field in (("name", "name"), ("budget", "budget_usd"),
                        ("budget_period", "budget_period"), ("rpm", "rpm"),
                        ("tpm", "tpm"), ("models", "models"),
                        ("expires", "expires_at")):
        value = getattr(args, flag, None)
        if value is not None:
            data[field] = None if value == "none" else value
    return data


def cmd_init(args) -> int:
    path = config_target(args)
    if os.path.exists(path) and not args.force:
        raise UsageError("%s exists already; init --force replaces it (and "
                         "its admin key)" % path)
    admin_key = "sk-admin-" + secrets.token_urlsafe(32)
    data = {
        "_comment": "llmgw configuration; see config.example.json for "
                    "every field",
        "admin_key": admin_key,
    }
    if os.path.exists(path):
        try:
            data = dict(read_json_file(path), admin_key=admin_key)
        except ConfigError:
            pass  # --force over an unreadable file: start afresh
    write_private_file(path, json.dumps(data, indent=2) + "\n")
    config = Config.load(path)
    database = db_path(args, config)
    Store(database).close()
    sys.stderr.write("wrote %s (mode 0600) and the database %s\n"
                     % (path, database))
    sys.stdout.write("admin key: %s\n" % admin_key)
    sys.stderr.write("Store the admin key now: it is not shown again.\n")
    return 0


def cmd_serve(args) -> int:
    config = load_config(args)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    log_format = args.log_format or config.log_format
    setup_logging(log_format, args.verbose, background=True)
    host, _, port = config.listen.rpartition(":")
    host = (args.host or host or "127.0.0.1").strip("[]")
    port = int(args.port if args.port is not None else port)
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise UsageError("cannot load the TLS certificate or key: %s"
                             % e) from None
    database = db_path(args, config)
    gateway = Gateway(config, database)
    try:
        gateway.start(host, port, context)
    except OSError as e:
        raise UsageError("cannot listen on %s:%d: %s" % (
            host, port, e.strerror or e)) from None
    bound = gateway.server.server_address
    shown = "[%s]" % bound[0] if ":" in bound[0] else bound[0]
    signal.signal(signal.SIGTERM, lambda *_: gateway.request_stop())
    signal.signal(signal.SIGINT, lambda *_: gateway.request_stop())
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(
            target=gateway.reload, args=(config.path,), daemon=True).start())
    with_keys = [p.name for p in config.providers.values() if p.keys]
    log.info("llmgw %s listening on %s://%s:%d", __version__,
             "https" if context else "http", shown, bound[1])
    log.info("database %s; config %s; providers with a key: %s",
             os.path.abspath(database), config.path or "built-in defaults",
             ", ".join(with_keys) or "none (set OPENAI_API_KEY, ...)")
    if not config.admin_key:
        log.info("no admin key: the admin API is off (run `llmgw.py init`)")
    gateway.serve_forever()
    gateway.usage_log.close()
    log.info("stopped")
    for handler in log.handlers:
        handler.close()
    return 0


def cmd_keys_create(args) -> int:
    data = key_args(args)
    data["project"] = args.project
    fields = key_fields(data, creating=True)
    store = open_store(args)
    key, secret = store.create_key(fields)
    show_keys([store.with_spend(key)], args.output, secret)
    return 0


def cmd_keys_list(args) -> int:
    store = open_store(args)
    now = utcnow()
    keys = [store.with_spend(k, now)
            for k in store.list_keys(args.project, args.all)]
    show_keys(keys, args.output)
    return 0


def get_key_or_fail(store: Store, key_id: str) -> dict:
    key = store.get_key(key_id)
    if key is None:
        raise UsageError("no key with id %r: `keys list --all` shows them"
                         % key_id)
    return key


def cmd_keys_show(args) -> int:
    store = open_store(args)
    key = store.with_spend(get_key_or_fail(store, args.id))
    key["status"] = key_status(key)
    if args.output == "json":
        print_json(key)
    else:
        width = max(len(k) for k in key)
        for name, value in key.items():
            sys.stdout.write("%s  %s\n" % (name.ljust(width),
                                           format_cell(value)))
    return 0


def cmd_keys_update(args) -> int:
    store = open_store(args)
    get_key_or_fail(store, args.id)
    fields = key_fields(key_args(args), creating=False)
    if not fields:
        raise UsageError("nothing to change: give --name, --budget, "
                         "--budget-period, --rpm, --tpm, --models or "
                         "--expires")
    key = store.update_key(args.id, fields)
    show_keys([store.with_spend(key)], args.output)
    return 0


def cmd_keys_revoke(args) -> int:
    store = open_store(args)
    get_key_or_fail(store, args.id)
    key = store.revoke_key(args.id)
    show_keys([store.with_spend(key)], args.output)
    return 0


def cmd_keys_rotate(args) -> int:
    store = open_store(args)
    get_key_or_fail(store, args.id)
    key, secret = store.rotate_key(args.id)
    show_keys([store.with_spend(key)], args.output, secret)
    return 0


def cmd_config_set_key(args) -> int:
    value = args.key
    if value == "-":
        value = sys.stdin.readline().strip()
    if not value:
        raise UsageError("the key is empty")
    path = config_target(args)
    data = read_json_file(path) if os.path.exists(path) else {}
    providers = data.setdefault("providers", {})
    if not isinstance(providers, dict):
        raise ConfigError("%s: providers must be an object" % path)
    if args.provider not in providers and \
            args.provider not in BUILTIN_PROVIDERS:
        raise UsageError("unknown provider %r: add it under \"providers\" in"
                         " %s first, or use one of %s" % (
                             args.provider, path,
                             ", ".join(BUILTIN_PROVIDERS)))
    entry = providers.setdefault(args.provider, {})
    entry.pop("api_key", None)
    entry["api_keys"] = [value]
    write_private_file(path, json.dumps(data, indent=2) + "\n")
    sys.stderr.write("stored the %s key %s in %s (mode 0600)\n"
                     % (args.provider, mask(value), path))
    return 0


def cmd_config_list_keys(args) -> int:
    config = load_config(args)
    rows = []
    for provider in config.providers.values():
        if not provider.key_sources:
            rows.append({"provider": provider.name, "key": None,
                         "source": None})
        for value, source in provider.key_sources:
            rows.append({"provider": provider.name, "key": mask(value),
                         "source": source})
    if args.output == "json":
        print_json(rows)
    else:
        print_table(rows, [("provider", "provider"), ("key", "key"),
                           ("source", "source")])
    return 0


def cmd_config_show(args) -> int:
    config = load_config(args)
    shown = config.masked()
    shown["database"] = db_path(args, config)
    if args.output == "json":
        print_json(shown)
        return 0
    for name in ("config_file", "database", "listen", "admin_key",
                 "default_provider", "log_format", "durability"):
        sys.stdout.write("%-17s %s\n" % (name, format_cell(shown[name])))
    sys.stdout.write("\n")
    print_table([dict(v, name=k) for k, v in shown["providers"].items()],
                [("provider", "name"), ("type", "type"),
                 ("base_url", "base_url"), ("keys", "api_keys"),
                 ("models", "models")])
    sys.stdout.write("\n")
    print_table([{"limit": k, "value": v} for k, v in
                 shown["limits"].items()],
                [("limit", "limit"), ("value", "value")])
    return 0


def cmd_config_check(args) -> int:
    config = Config.load(args.config)
    for warning in config.warnings:
        sys.stderr.write("llmgw: warning: %s\n" % warning)
    if config.problems:
        for problem in config.problems:
            sys.stderr.write("llmgw: error: %s\n" % problem)
        return 1
    sys.stdout.write("%s is valid\n" % (config.path or "the built-in "
                                        "configuration"))
    return 0


STATS_COLUMNS = ["requests", "errors", "input_tokens", "cached_input_tokens",
                 "cache_write_tokens", "output_tokens", "reasoning_tokens",
                 "cost_usd", "unpriced", "estimated", "avg_latency_ms"]


def cmd_stats(args) -> int:
    store = open_store(args)
    report = stats_report(store, {
        "by": args.by, "since": args.since, "until": args.until,
        "project": args.project, "key": args.key, "model": args.model})
    rows, by = report["data"], report["by"]
    if args.output == "json":
        print_json(report)
    elif args.output == "csv":
        print_csv(rows, [by] + STATS_COLUMNS)
    else:
        shown = rows + [dict(report["total"], **{by: "TOTAL"})]
        print_table(shown, [(by, by), ("requests", "requests"),
                            ("errors", "errors"), ("input", "input_tokens"),
                            ("cached", "cached_input_tokens"),
                            ("cache_write", "cache_write_tokens"),
                            ("output", "output_tokens"),
                            ("cost_usd", "cost_usd"),
                            ("unpriced", "unpriced")])
        if report["total"]["unpriced"]:
            sys.stderr.write("%d requests used models with no price: their "
                             "cost is not in cost_usd (see `prices`)\n"
                             % report["total"]["unpriced"])
    return 0


def cmd_usage(args) -> int:
    store = open_store(args)
    since = iso(parse_time(args.since)) if args.since else None
    rows = store.usage_rows(since, 0, args.limit)
    if args.output == "csv":
        print_csv(rows, ["id"] + list(USAGE_COLUMNS))
    else:
        print_json(rows)
    return 0


def cmd_prices(args) -> int:
    config = load_config(args)
    table = PriceTable(config.prices)
    rows = table.rows(args.model)
    if args.model and not rows:
        raise UsageError("no price for model %r: add one under \"prices\" "
                         "in the config" % args.model)
    if args.output == "json":
        print_json({"checked": PRICES_CHECKED, "unit": "USD per million "
                    "tokens", "data": rows})
        return 0
    print_table(rows, [("model", "model"), ("input", "input"),
                       ("cached_input", "cached_input"),
                       ("output", "output"), ("cache_write", "cache_write"),
                       ("source", "source")])
    sys.stdout.write("\nUSD per million tokens; built-in prices checked %s."
                     "\n" % PRICES_CHECKED)
    return 0


SYSTEMD_UNIT = """\
# llmgw as a systemd service. Install:
#   sudo useradd --system --home /var/lib/llmgw --shell /usr/sbin/nologin llmgw
#   (llmgw.py must be readable by that user at {script})
#   sudo install -d -o llmgw -g llmgw -m 0700 /etc/llmgw /var/lib/llmgw
#   sudo -u llmgw {python} {script} --config {config} --db {db} init
#   {python} llmgw.py systemd-unit | sudo tee /etc/systemd/system/llmgw.service
#   sudo systemctl daemon-reload && sudo systemctl enable --now llmgw
# Manage keys as the service user:
#   sudo -u llmgw {python} {script} --config {config} --db {db} keys list
[Unit]
Description=llmgw LLM API gateway
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
User={user}
Group={user}
# -I -S: ignore PYTHON* variables and site-packages; llmgw needs neither
ExecStart={python} -I -S {script} --config {config} --db {db} serve
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
TimeoutStopSec={stop_timeout}
# fewer glibc heap arenas: a thread per connection need not mean a heap each
Environment=MALLOC_ARENA_MAX=2
StateDirectory=llmgw
StateDirectoryMode=0700
WorkingDirectory=/var/lib/llmgw
UMask=0077
# Provider keys may come from the environment instead of the config:
# EnvironmentFile=-/etc/llmgw/env

NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources

[Install]
WantedBy=multi-user.target
"""


def installed_script() -> str:
    """This file's path, unless the unit's sandbox would hide it."""
    here = os.path.abspath(__file__)
    if here.startswith(("/home/", "/root/", "/tmp/", "/var/tmp/",
                        "/run/user/")):
        return "/opt/llmgw/llmgw.py"  # ProtectHome and PrivateTmp hide it
    return here


def cmd_systemd_unit(args) -> int:
    config_path = os.path.abspath(args.config) if args.config else \
        "/etc/llmgw/llmgw.json"
    drain = DEFAULT_LIMITS["drain_timeout_s"]
    sys.stdout.write(SYSTEMD_UNIT.format(
        python=sys.executable or "/usr/bin/python3",
        script=args.script or installed_script(),
        config=config_path,
        db=os.path.abspath(args.db) if args.db else
        "/var/lib/llmgw/llmgw.db",
        user=args.user, stop_timeout=int(drain) + 10))
    return 0


def add_output(parser, choices=("table", "json"), default="table"):
    parser.add_argument("--output", choices=choices, default=default,
                        help="output format (default: %(default)s)")


def flag_type(check):
    """An argparse type: 'none' (clears a limit) or a value check accepts.

    A bad value is then a usage error (exit 2), like any other bad flag.
    """
    def convert(text):
        if text == "none":
            return text
        try:
            return check(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def add_limit_flags(parser) -> None:
    parser.add_argument("--name", help="a label for the key")
    parser.add_argument("--budget", metavar="USD",
                        type=flag_type(lambda v: _number("budget", v, False)),
                        help="spend limit in USD per budget period")
    parser.add_argument("--budget-period", dest="budget_period",
                        choices=BUDGET_PERIODS,
                        help="UTC calendar period of the budget (default "
                        "for a new budget: month)")
    parser.add_argument("--rpm", help="requests per minute",
                        type=flag_type(lambda v: _number("rpm", v, True)))
    parser.add_argument("--tpm", help="tokens per minute",
                        type=flag_type(lambda v: _number("tpm", v, True)))
    parser.add_argument("--models", metavar="GLOBS",
                        help="comma-separated model globs the key may use, "
                        "e.g. 'gpt-4o*,claude-*'")
    parser.add_argument("--expires", metavar="WHEN", type=flag_type(
                        parse_expiry),
                        help="30d, 12h, 2w, YYYY-MM-DD (through the end of "
                        "that UTC day) or an ISO 8601 time")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmgw.py",
        description="A self-hosted LLM API gateway: virtual keys, budgets, "
        "rate limits and usage accounting in front of OpenAI, Anthropic and "
        "OpenAI-compatible providers.",
        epilog="Start with `python3 llmgw.py serve`, then `python3 llmgw.py "
        "keys create my-project`.")
    parser.add_argument("--version", action="version",
                        version="llmgw " + __version__)
    parser.add_argument("--config", metavar="FILE",
                        help="config file (default: $LLMGW_CONFIG, else "
                        "./llmgw.json when it exists)")
    parser.add_argument("--db", metavar="FILE",
                        help="SQLite database (default: $LLMGW_DB, else the "
                        "config's database, else ./llmgw.db)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(parent, name, func, help, example):
        sub = parent.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + ".",
            epilog="example: " + example,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(func=func)
        return sub

    sub = command(commands, "init", cmd_init,
                  "write llmgw.json with a fresh admin key and create the "
                  "database", "python3 llmgw.py init")
    sub.add_argument("--force", action="store_true",
                     help="replace an existing config file's admin key")

    sub = command(commands, "serve", cmd_serve, "run the gateway",
                  "python3 llmgw.py serve --port 8000")
    sub.add_argument("--host", help="address to listen on (default: the "
                     "config's listen, else 127.0.0.1)")
    sub.add_argument("--port", type=int, help="port to listen on, 0 for "
                     "any free one (default: the config's listen, else "
                     "8000)")
    sub.add_argument("--tls-cert", metavar="FILE",
                     help="serve HTTPS with this PEM certificate chain")
    sub.add_argument("--tls-key", metavar="FILE",
                     help="the private key of --tls-cert")
    sub.add_argument("--log-format", choices=("text", "json"),
                     help="access log format (default: the config's "
                     "log_format, else text)")
    sub.add_argument("-v", "--verbose", action="store_true",
                     help="log debug details too")

    keys = commands.add_parser(
        "keys", help="create, list, change, revoke and rotate virtual keys",
        description="Manage virtual keys.").add_subparsers(
            dest="keys_command", metavar="COMMAND")
    keys.required = True
    sub = command(keys, "create", cmd_keys_create,
                  "create a virtual key and print its secret once",
                  "python3 llmgw.py keys create my-app --budget 50 "
                  "--budget-period month --rpm 60")
    sub.add_argument("project", help="the project the key belongs to")
    add_limit_flags(sub)
    add_output(sub)
    sub = command(keys, "list", cmd_keys_list,
                  "list active keys with their spend this period",
                  "python3 llmgw.py keys list --project my-app")
    sub.add_argument("--project", help="only this project's keys")
    sub.add_argument("--all", action="store_true",
                     help="include revoked and expired keys")
    add_output(sub)
    sub = command(keys, "show", cmd_keys_show, "show one key",
                  "python3 llmgw.py keys show key_1a2b3c4d")
    sub.add_argument("id")
    add_output(sub)
    sub = command(keys, "update", cmd_keys_update,
                  "change a key's name or limits ('none' clears a limit)",
                  "python3 llmgw.py keys update key_1a2b3c4d --rpm none "
                  "--budget 100")
    sub.add_argument("id")
    add_limit_flags(sub)
    add_output(sub)
    sub = command(keys, "revoke", cmd_keys_revoke,
                  "revoke a key; a running gateway refuses it within a "
                  "second", "python3 llmgw.py keys revoke key_1a2b3c4d")
    sub.add_argument("id")
    add_output(sub)
    sub = command(keys, "rotate", cmd_keys_rotate,
                  "give a key a new secret, keeping its id, limits and "
                  "history", "python3 llmgw.py keys rotate key_1a2b3c4d")
    sub.add_argument("id")
    add_output(sub)

    config = commands.add_parser(
        "config", help="provider keys and the effective configuration",
        description="Inspect and change the configuration.").add_subparsers(
            dest="config_command", metavar="COMMAND")
    config.required = True
    sub = command(config, "set-key", cmd_config_set_key,
                  "store a provider's real key in the config file",
                  "echo \"$OPENAI_API_KEY\" | python3 llmgw.py config "
                  "set-key openai -")
    sub.add_argument("provider")
    sub.add_argument("key", help="the key, or - to read it from stdin")
    sub = command(config, "list-keys", cmd_config_list_keys,
                  "list providers and their real keys, masked",
                  "python3 llmgw.py config list-keys")
    add_output(sub)
    sub = command(config, "show", cmd_config_show,
                  "show the effective configuration, secrets masked",
                  "python3 llmgw.py config show --output json")
    add_output(sub)
    command(config, "check", cmd_config_check,
            "validate the configuration file",
            "python3 llmgw.py --config llmgw.json config check")

    sub = command(commands, "stats", cmd_stats, "usage statistics",
                  "python3 llmgw.py stats --by model --since 2026-01-01")
    sub.add_argument("--project")
    sub.add_argument("--key", help="a key id")
    sub.add_argument("--model")
    sub.add_argument("--since", metavar="D",
                     help="YYYY-MM-DD or ISO 8601 time (UTC)")
    sub.add_argument("--until", metavar="D",
                     help="YYYY-MM-DD (through that day) or ISO 8601 time")
    sub.add_argument("--by", choices=tuple(STATS_GROUPS), default="project",
                     help="group by (default: %(default)s)")
    add_output(sub, ("table", "json", "csv"))

    sub = command(commands, "usage", cmd_usage,
                  "raw usage records, oldest first, for export",
                  "python3 llmgw.py usage --since 2026-01-01 --output csv")
    sub.add_argument("--since", metavar="D",
                     help="YYYY-MM-DD or ISO 8601 time (UTC)")
    sub.add_argument("--limit", type=int, default=1000,
                     help="at most this many rows (default: %(default)s)")
    add_output(sub, ("json", "csv"), "json")

    sub = command(commands, "prices", cmd_prices,
                  "the price table in force, USD per million tokens",
                  "python3 llmgw.py prices gpt-4o")
    sub.add_argument("model", nargs="?")
    add_output(sub)

    sub = command(commands, "systemd-unit", cmd_systemd_unit,
                  "print a hardened systemd unit for this install",
                  "python3 llmgw.py systemd-unit > llmgw.service")
    sub.add_argument("--user", default="llmgw",
                     help="the service user (default: %(default)s)")
    sub.add_argument("--script", metavar="PATH",
                     help="where llmgw.py is installed (default: this "
                     "file, or /opt/llmgw/llmgw.py when this file is under "
                     "a home or temporary folder the unit cannot see)")
    return parser


def setup_logging(log_format: str = "text", verbose: bool = False,
                  background: bool = False) -> None:
    if background:
        handler = BackgroundLogHandler(sys.stderr)
        # Records carry only a time, a level and fields: do not look up the
        # caller's frame, thread and process for each (the switches the
        # logging HOWTO gives for this; about 2 us a request).
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = False
        logging.logMultiprocessing = False
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(AccessFormatter(log_format == "json"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


# ===== main

# What the fresh interpreter runs, as `python -c HANDOVER FD SCRIPT ARGS...`:
# the compiled code read from FD, as if SCRIPT had been run with ARGS. A
# script's directory, not the working directory that -c would put first,
# leads sys.path (unless -I or -P left both out).
HANDOVER = (
    "import marshal,os,sys;f=os.fdopen(int(sys.argv.pop(1)),'rb');"
    "code=marshal.load(f);f.close();del sys.argv[0],f;"
    "__file__=os.path.abspath(sys.argv[0]);sys.path[:1]==['']and "
    "sys.path.__setitem__(0,os.path.dirname(os.path.realpath(__file__)));"
    "HANDED_OVER=1;exec(code)")


def interpreter_options():
    """The options on this interpreter's command line, before the script.

    None unless it was started as `python [options] script`: not with -c,
    -m (a profiler or debugger running the script, say) or --.
    """
    argv = getattr(sys, "orig_argv", None)  # Python 3.10 and newer
    if argv is None:
        try:
            with open("/proc/self/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().split(b"\0")[:-1]]
        except OSError:
            return None
    n = len(sys.argv)
    if len(argv) <= n or argv[-n:] != sys.argv:
        return None
    options = argv[1:-n]
    value_next = False  # the previous option takes this one as its value
    for option in options:
        if value_next:
            value_next = False
        elif option == "--check-hash-based-pycs":
            value_next = True
        elif option[:1] != "-" or option[:2] == "--" or option == "-":
            return None
        else:
            for at, letter in enumerate(option[1:], 1):
                if letter in "cm":
                    return None
                if letter in "WX":  # -Wvalue, -W value
                    value_next = at == len(option) - 1
                    break
    return None if value_next else options


def serve_without_parse_tree(module_code) -> None:
    """Exec this interpreter again on this file's compiled code.

    CPython keeps the syntax tree of the script it runs until the script
    returns: about 10 MB for this file (since Python 3.9), held for as long
    as `serve` runs. The same interpreter binary, started again with the
    same options in the same process (systemd sees the same PID), gets the
    code already compiled through an in-memory file, so it neither parses
    nor compiles. Returns, and serving goes on here, where that cannot be
    done.
    """
    options = interpreter_options()
    if options is None or not sys.executable or \
            not hasattr(os, "memfd_create"):
        return
    fd = None
    try:
        fd = os.memfd_create("llmgw-code", 0)
        with open(fd, "wb", closefd=False) as f:
            marshal.dump(module_code, f)
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
        sys.stdout.flush()
        sys.stderr.flush()
        # /proc/self/exe: this very binary, even if sys.executable now
        # names another Python (compiled code is for one version only)
        os.execv("/proc/self/exe", [sys.executable] + options
                 + ["-c", HANDOVER, str(fd)] + sys.argv)
    except (OSError, ValueError):
        if fd is not None:
            os.close(fd)


def main(argv=None, module_code=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not log.handlers:
        setup_logging()
    if getattr(args, "limit", None) is not None and args.limit < 1:
        parser.error("--limit must be 1 or more")
    if bool(getattr(args, "tls_cert", None)) != bool(
            getattr(args, "tls_key", None)):
        parser.error("--tls-cert and --tls-key go together")
    if module_code is not None and args.func is cmd_serve:
        serve_without_parse_tree(module_code)
    try:
        return args.func(args)
    except UsageError as e:
        sys.stderr.write("llmgw: error: %s\n" % e)
        return 1
    except sqlite3.Error as e:
        sys.stderr.write("llmgw: error: the database failed: %s\n" % e)
        return 1
    except OSError as e:
        sys.stderr.write("llmgw: error: %s\n" % e)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as a script: hand `serve` this module's compiled code, unless this
    # interpreter was started by serve_without_parse_tree with it already.
    sys.exit(main(module_code=None if globals().get("HANDED_OVER")
                  else sys._getframe().f_code))
