"""Running llmgw with no setup, `init`, and the configuration commands.

Covers DESIGN.md "Running it" and "Configuration": zero-configuration
`serve`, `init [--force]`, built-in providers merged with the JSON file,
real keys as literals or env:NAME, `config set-key/list-keys/show/check`
and where the config file and the database are looked for.
"""

import json
import os
import re
import sys

import pytest

from conftest import (Gateway, ServeProcess, assert_one_line_error,
                      base_config, file_mode, merge_config, query_db,
                      write_config)
from fakes import http_request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import llmgw  # noqa: E402  (the module under test, for its version only)

CHAT = {"model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}]}

# distinct tails, so a masked key still tells which one is shown
LITERAL_OPENAI_KEY = "sk-proj-literal0123456789abcdefwxyz"
ENV_ACME_KEY = "sk-acme-fromenv0123456789abcdeflmno"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def providers_of(shown):
    """`config show --output json` providers as {name: entry}."""
    providers = shown["providers"]
    if isinstance(providers, list):
        return {entry["name"]: entry for entry in providers}
    return providers


def rows_of(parsed):
    """A JSON list, or the "data" list of a JSON object."""
    if isinstance(parsed, dict):
        return parsed["data"]
    return parsed


class Served(ServeProcess):
    """`llmgw.py serve --port 0` with no --config/--db, in a chosen folder."""

    def __init__(self, cwd, env=None, args=()):
        ServeProcess.__init__(self, args, cwd, env)

    def get(self, path, headers=None):
        return http_request("127.0.0.1", self.port, "GET", path,
                            headers=headers, timeout=10)


@pytest.fixture
def serve_in():
    """serve_in(cwd, env=None, args=()) -> Served; all stopped at teardown."""
    started = []

    def start(cwd, env=None, args=()):
        served = Served(cwd, env, args)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


# ---------------------------------------------------------------------------
# zero configuration
# ---------------------------------------------------------------------------

def test_serve_in_an_empty_folder_creates_a_private_database_and_answers_health(
        tmp_path, serve_in):
    folder = tmp_path / "empty"
    folder.mkdir()
    db = folder / "llmgw.db"
    assert not db.exists()

    served = serve_in(folder, env={
        "OPENAI_API_KEY": "sk-zero-config-openai-000000001111",
        "MISTRAL_API_KEY": "sk-zero-config-mistral-00000002222"})

    assert db.exists()
    assert file_mode(str(db)) == 0o600
    for extra in ("-wal", "-shm"):
        if os.path.exists(str(db) + extra):
            assert file_mode(str(db) + extra) == 0o600, extra

    status, _headers, body = served.get("/health")
    assert status == 200
    health = json.loads(body.decode("utf-8"))
    assert health["status"] == "ok"
    assert health["version"] == llmgw.__version__

    err = served.stderr_text()
    # says where the database is
    assert (str(db) in err or os.path.realpath(str(db)) in err), err
    # and which providers have a key (and not those without one)
    provider_lines = [line for line in err.splitlines()
                      if "openai" in line and "mistral" in line]
    assert provider_lines, err
    assert not any("anthropic" in line or "groq" in line
                   for line in provider_lines), err
    # the real keys themselves are never logged
    assert "sk-zero-config-openai-000000001111" not in err
    assert "sk-zero-config-mistral-00000002222" not in err


def test_serve_without_an_admin_key_still_serves_health_but_not_the_admin_api(
        tmp_path, serve_in):
    served = serve_in(tmp_path)

    status, _, body = served.get("/health")
    assert status == 200
    assert json.loads(body.decode("utf-8"))["status"] == "ok"

    status, _, body = served.get("/admin/virtual-keys")
    assert status == 403
    assert json.loads(body.decode("utf-8"))["error"]["code"] == "forbidden"


# ---------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------

def test_init_writes_a_private_config_with_a_fresh_admin_key_printed_once(
        tmp_path, run_cli):
    rc, out, err = run_cli("init")
    assert rc == 0, err

    config_path = tmp_path / "llmgw.json"
    assert file_mode(str(config_path)) == 0o600
    admin_key = json.loads(config_path.read_text())["admin_key"]
    assert isinstance(admin_key, str) and len(admin_key) >= 32
    assert (out + err).count(admin_key) == 1

    # init also creates the database, privately
    db = tmp_path / "llmgw.db"
    assert db.exists()
    assert file_mode(str(db)) == 0o600

    # a second install gets a different admin key
    other = tmp_path / "other"
    other.mkdir()
    rc, _out2, err2 = run_cli("init", cwd=str(other))
    assert rc == 0, err2
    other_key = json.loads((other / "llmgw.json").read_text())["admin_key"]
    assert other_key != admin_key


def test_init_refuses_to_overwrite_an_existing_config_without_force(
        tmp_path, run_cli):
    rc, _, err = run_cli("init")
    assert rc == 0, err
    config_path = tmp_path / "llmgw.json"
    before = config_path.read_bytes()

    rc, out, err = run_cli("init")

    assert_one_line_error(rc, err, "--force")
    assert config_path.read_bytes() == before
    old_key = json.loads(before.decode("utf-8"))["admin_key"]
    assert old_key not in out + err


def test_init_force_replaces_the_admin_key_and_keeps_the_file_private(
        tmp_path, run_cli):
    rc, _, err = run_cli("init")
    assert rc == 0, err
    config_path = tmp_path / "llmgw.json"
    old_key = json.loads(config_path.read_text())["admin_key"]
    os.chmod(str(config_path), 0o644)

    rc, out, err = run_cli("init", "--force")

    assert rc == 0, err
    new_key = json.loads(config_path.read_text())["admin_key"]
    assert new_key != old_key
    assert (out + err).count(new_key) == 1
    assert file_mode(str(config_path)) == 0o600


def test_init_writes_the_file_named_by_config(tmp_path, run_cli):
    target = tmp_path / "etc" / "gw.json"
    target.parent.mkdir()

    rc, out, err = run_cli("--config", str(target), "init")

    assert rc == 0, err
    assert file_mode(str(target)) == 0o600
    assert json.loads(target.read_text())["admin_key"] in out + err
    assert not (tmp_path / "llmgw.json").exists()


def test_the_admin_key_written_by_init_opens_the_admin_api(
        tmp_path, run_cli, serve_in):
    rc, _out, err = run_cli("init")
    assert rc == 0, err
    admin_key = json.loads((tmp_path / "llmgw.json").read_text())["admin_key"]

    served = serve_in(tmp_path)

    status, _, _ = served.get("/admin/virtual-keys", headers={
        "Authorization": "Bearer " + admin_key})
    assert status == 200
    status, _, _ = served.get("/admin/virtual-keys", headers={
        "Authorization": "Bearer " + admin_key + "x"})
    assert status == 401


# ---------------------------------------------------------------------------
# providers: built-ins merged with the file, literal and env:NAME keys
# ---------------------------------------------------------------------------

def test_configured_and_built_in_providers_are_merged_and_use_their_keys(
        gateway, upstream):
    gw = gateway(config={"providers": {
        # literal key, base_url overridden
        "openai": {"api_keys": [LITERAL_OPENAI_KEY]},
        # built-in provider: only base_url from the file, key from its
        # built-in environment variable
        "groq": {"base_url": upstream.url + "/groq/v1"},
        # a provider of our own, with an env:NAME key
        "acme": {"type": "openai", "base_url": upstream.url + "/acme/v1",
                 "api_keys": ["env:ACME_UPSTREAM_KEY"]},
    }}, env={"GROQ_API_KEY": "sk-groq-from-env-000000000002",
             "ACME_UPSTREAM_KEY": ENV_ACME_KEY})
    key = gw.create_key("merge")

    status, _, _ = gw.request("POST", "/v1/chat/completions", CHAT, key=key)
    assert status == 200
    assert upstream.last.path == "/v1/chat/completions"
    assert upstream.last.headers["authorization"] == \
        "Bearer " + LITERAL_OPENAI_KEY

    status, _, _ = gw.request("POST", "/groq/v1/chat/completions",
                              dict(CHAT, model="llama-3.1-8b-instant"),
                              key=key)
    assert status == 200
    assert upstream.last.path == "/groq/v1/chat/completions"
    assert upstream.last.headers["authorization"] == \
        "Bearer sk-groq-from-env-000000000002"

    status, _, _ = gw.request("POST", "/acme/v1/chat/completions",
                              dict(CHAT, model="acme-large"), key=key)
    assert status == 200
    assert upstream.last.path == "/acme/v1/chat/completions"
    assert upstream.last.headers["authorization"] == "Bearer " + ENV_ACME_KEY


def test_config_show_lists_every_built_in_provider_next_to_the_configured_ones(
        tmp_path, run_cli):
    config = write_config(str(tmp_path / "c.json"), {"providers": {
        "openai": {"base_url": "http://127.0.0.1:9/v1"},
        "acme": {"type": "anthropic", "base_url": "https://acme.test/v1"},
    }})

    rc, out, err = run_cli("--config", config, "config", "show",
                           "--output", "json")

    assert rc == 0, err
    providers = providers_of(json.loads(out))
    for name in ("openai", "anthropic", "groq", "mistral", "deepseek",
                 "openrouter", "together", "xai", "gemini", "ollama",
                 "acme"):
        assert name in providers, name
    assert providers["openai"]["base_url"].rstrip("/") == \
        "http://127.0.0.1:9/v1"
    assert providers["acme"]["type"] == "anthropic"
    assert providers["anthropic"]["type"] == "anthropic"
    assert providers["anthropic"]["base_url"].startswith(
        "https://api.anthropic.com")
    assert providers["groq"]["type"] == "openai"
    assert providers["ollama"]["base_url"].startswith("http://127.0.0.1:11434")


# ---------------------------------------------------------------------------
# config set-key
# ---------------------------------------------------------------------------

def test_set_key_with_dash_reads_the_key_from_stdin_and_the_gateway_uses_it(
        tmp_path, run_cli, upstream):
    config = merge_config(base_config(upstream),
                          {"providers": {"openai": {"api_keys": None}}})
    config_path = write_config(str(tmp_path / "gw.json"), config)
    secret = "sk-from-stdin-0123456789abcdefghij"

    rc, out, err = run_cli("--config", config_path, "config", "set-key",
                           "openai", "-", input=secret + "\n")

    assert rc == 0, err
    assert secret not in out + err
    assert file_mode(config_path) == 0o600
    with open(config_path) as handle:
        saved = json.load(handle)
    # what was there stays there
    assert saved["admin_key"] == config["admin_key"]
    assert saved["providers"]["openai"]["base_url"] == upstream.base_url
    assert saved["providers"]["anthropic"] == config["providers"]["anthropic"]

    gw = Gateway(config, config_path, str(tmp_path / "gw.db"),
                 str(tmp_path))
    try:
        key = gw.create_key("stdin")
        status, _, _ = gw.request("POST", "/v1/chat/completions", CHAT,
                                  key=key)
        assert status == 200
        assert upstream.last.headers["authorization"] == "Bearer " + secret
    finally:
        gw.stop()


def test_set_key_creates_a_private_llmgw_json_in_the_current_folder(
        tmp_path, run_cli):
    secret = "sk-ant-literal-0123456789abcdefqrst"

    rc, out, err = run_cli("config", "set-key", "anthropic", secret)

    assert rc == 0, err
    path = tmp_path / "llmgw.json"
    assert file_mode(str(path)) == 0o600
    assert secret not in out + err
    rc, out, err = run_cli("config", "list-keys", "--output", "json")
    assert rc == 0, err
    assert secret not in out
    rows = [r for r in rows_of(json.loads(out))
            if r.get("provider") == "anthropic"]
    assert any("sk-...qrst" in json.dumps(r) and "config" in json.dumps(r)
               for r in rows), out


def test_set_key_makes_an_existing_readable_config_private(tmp_path, run_cli):
    path = str(tmp_path / "llmgw.json")
    with open(path, "w") as handle:
        json.dump({"listen": "127.0.0.1:8123"}, handle)
    os.chmod(path, 0o644)

    rc, _, err = run_cli("config", "set-key", "openai", "-",
                         input="sk-readable-0123456789abcdefgh\n")

    assert rc == 0, err
    assert file_mode(path) == 0o600
    with open(path) as handle:
        assert json.load(handle)["listen"] == "127.0.0.1:8123"


def test_set_key_for_an_unknown_provider_fails_with_one_sentence(
        tmp_path, run_cli):
    rc, out, err = run_cli("config", "set-key", "nosuchprovider", "-",
                           input="sk-whatever-0123456789abcdef\n")

    assert_one_line_error(rc, err, "nosuchprovider")
    assert "sk-whatever-0123456789abcdef" not in out + err


def test_set_key_with_an_empty_stdin_stores_nothing(tmp_path, run_cli):
    rc, _, err = run_cli("config", "set-key", "openai", "-", input="\n")

    assert_one_line_error(rc, err)
    assert not (tmp_path / "llmgw.json").exists()


# ---------------------------------------------------------------------------
# config list-keys / show
# ---------------------------------------------------------------------------

@pytest.fixture
def keyed_config(tmp_path):
    """A config with a literal openai key and an env:NAME acme key."""
    return write_config(str(tmp_path / "keys.json"), {
        "admin_key": "admin-literal-0123456789abcdefadmn",
        "providers": {
            "openai": {"api_keys": [LITERAL_OPENAI_KEY]},
            "acme": {"type": "openai", "base_url": "https://acme.test/v1",
                     "api_keys": ["env:ACME_KEY"]},
        }})


def test_list_keys_masks_every_key_and_says_where_it_comes_from(
        keyed_config, run_cli):
    env = {"ACME_KEY": ENV_ACME_KEY,
           "ANTHROPIC_API_KEY": "sk-ant-env-0123456789abcdefabcd"}

    rc, out, err = run_cli("--config", keyed_config, "config", "list-keys",
                           env=env)

    assert rc == 0, err
    for secret in (LITERAL_OPENAI_KEY, ENV_ACME_KEY,
                   "sk-ant-env-0123456789abcdefabcd"):
        assert secret not in out + err
    lines = out.splitlines()
    openai = [line for line in lines if "sk-...wxyz" in line]
    acme = [line for line in lines if "sk-...lmno" in line]
    anthropic = [line for line in lines if "sk-...abcd" in line]
    assert openai and "openai" in openai[0] and "config" in openai[0], out
    assert acme and "acme" in acme[0] and "env" in acme[0], out
    assert anthropic and "anthropic" in anthropic[0] and \
        "env" in anthropic[0], out

    rc, out, err = run_cli("--config", keyed_config, "config", "list-keys",
                           "--output", "json", env=env)

    assert rc == 0, err
    for secret in (LITERAL_OPENAI_KEY, ENV_ACME_KEY):
        assert secret not in out
    rows = rows_of(json.loads(out))
    by_provider = {}
    for row in rows:
        by_provider.setdefault(row["provider"], []).append(json.dumps(row))
    assert any("sk-...wxyz" in r and "config" in r and "env" not in r
               for r in by_provider["openai"]), out
    assert any("sk-...lmno" in r and "ACME_KEY" in r
               for r in by_provider["acme"]), out
    assert any("sk-...abcd" in r and "ANTHROPIC_API_KEY" in r
               for r in by_provider["anthropic"]), out


def test_config_show_masks_the_admin_key_and_provider_keys(
        keyed_config, run_cli):
    env = {"ACME_KEY": ENV_ACME_KEY}

    rc, out, err = run_cli("--config", keyed_config, "config", "show",
                           env=env)

    assert rc == 0, err
    for secret in (LITERAL_OPENAI_KEY, ENV_ACME_KEY,
                   "admin-literal-0123456789abcdefadmn"):
        assert secret not in out + err
    assert "sk-...wxyz" in out
    assert "acme" in out

    rc, out, err = run_cli("--config", keyed_config, "config", "show",
                           "--output", "json", env=env)

    assert rc == 0, err
    for secret in (LITERAL_OPENAI_KEY, ENV_ACME_KEY,
                   "admin-literal-0123456789abcdefadmn"):
        assert secret not in out
    shown = json.loads(out)
    providers = providers_of(shown)
    assert "sk-...wxyz" in json.dumps(providers["openai"])
    assert "sk-...lmno" in json.dumps(providers["acme"])
    assert "admn" in json.dumps(shown["admin_key"])


# ---------------------------------------------------------------------------
# config check
# ---------------------------------------------------------------------------

def test_config_check_accepts_a_valid_file(tmp_path, run_cli):
    path = write_config(str(tmp_path / "ok.json"), {
        "listen": "127.0.0.1:8000",
        "providers": {"acme": {"type": "anthropic",
                               "base_url": "https://acme.test/v1",
                               "api_keys": ["sk-acme-0123456789"]}}})

    rc, _out, err = run_cli("--config", path, "config", "check")

    assert rc == 0, err
    assert "Traceback" not in err


def test_config_check_names_the_line_and_column_of_invalid_json(
        tmp_path, run_cli):
    text = '{\n  "listen": "127.0.0.1:8000",\n  "providers": {,\n}\n'
    path = tmp_path / "bad.json"
    path.write_text(text)
    try:
        json.loads(text)
    except ValueError as e:
        line, column = e.lineno, e.colno

    rc, _out, err = run_cli("--config", str(path), "config", "check")

    assert_one_line_error(rc, err, "line %d" % line)
    assert re.search(r"column %d\b" % column, err), err


@pytest.mark.parametrize("providers, words", [
    ({"acme": {"type": "azure", "base_url": "https://acme.test/v1"}},
     ["acme", "azure"]),
    ({"acme": {"type": "openai", "base_url": "acme.test/v1"}},
     ["acme", "acme.test/v1"]),
    ({"openai": {"base_url": "ftp://files.example.com/v1"}},
     ["openai", "ftp://files.example.com/v1"]),
], ids=["unknown-type", "url-without-scheme", "ftp-url"])
def test_config_check_refuses_a_bad_provider_with_one_sentence(
        tmp_path, run_cli, providers, words):
    path = write_config(str(tmp_path / "bad.json"), {"providers": providers})

    rc, _out, err = run_cli("--config", path, "config", "check")

    assert_one_line_error(rc, err, *words)


def test_other_commands_refuse_an_invalid_config_with_one_sentence(
        tmp_path, run_cli):
    path = tmp_path / "bad.json"
    path.write_text('{"providers": {"openai": {"base_url": "nope"}}')

    rc, _out, err = run_cli("--config", str(path), "--db",
                           str(tmp_path / "x.db"), "keys", "list")

    assert_one_line_error(rc, err, "line 1")


def test_serve_refuses_a_bad_provider_type_with_one_sentence(
        tmp_path, run_cli):
    path = write_config(str(tmp_path / "bad.json"), {"providers": {
        "acme": {"type": "azure", "base_url": "https://acme.test/v1"}}})

    rc, _out, err = run_cli("--config", path, "--db", str(tmp_path / "x.db"),
                           "serve", "--host", "127.0.0.1", "--port", "0",
                           timeout=20)

    assert_one_line_error(rc, err, "azure")


def test_a_config_file_that_does_not_exist_is_an_error_not_the_defaults(
        tmp_path, run_cli):
    rc, _out, err = run_cli("--config", str(tmp_path / "missing.json"),
                           "config", "show")

    assert_one_line_error(rc, err, "missing.json")


# ---------------------------------------------------------------------------
# where the config file and the database are
# ---------------------------------------------------------------------------

def _tagged_config(path, tail, database=None):
    """A config whose openai key ends in `tail` (seen masked as sk-...tail)."""
    data = {"providers": {"openai": {
        "api_keys": ["sk-precedence-0123456789ab" + tail]}}}
    if database:
        data["database"] = database
    return write_config(str(path), data)


def _masked_tail(run_cli, *args, **kwargs):
    rc, out, err = run_cli(*(list(args) + ["config", "list-keys",
                                           "--output", "json"]), **kwargs)
    assert rc == 0, err
    rows = [r for r in rows_of(json.loads(out)) if r["provider"] == "openai"]
    found = re.findall(r"sk-\.\.\.(\w{4})", json.dumps(rows))
    return found[0] if found else None


def test_config_flag_wins_over_env_which_wins_over_the_local_file(
        tmp_path, run_cli):
    flag = _tagged_config(tmp_path / "flag.json", "FLAG")
    envfile = _tagged_config(tmp_path / "env.json", "ENVV")
    _tagged_config(tmp_path / "llmgw.json", "LOCL")

    assert _masked_tail(run_cli, "--config", flag,
                        env={"LLMGW_CONFIG": envfile}) == "FLAG"
    assert _masked_tail(run_cli, env={"LLMGW_CONFIG": envfile}) == "ENVV"
    assert _masked_tail(run_cli) == "LOCL"

    # with no file anywhere, the built-in defaults apply
    bare = tmp_path / "bare"
    bare.mkdir()
    assert _masked_tail(run_cli, cwd=str(bare)) is None
    assert _masked_tail(run_cli, cwd=str(bare), env={
        "OPENAI_API_KEY": "sk-builtin-0123456789abcdefBLTN"}) == "BLTN"


def _key_db(tmp_path, run_cli, *args, **kwargs):
    """Create a key; return the name of the database file that holds it."""
    rc, out, err = run_cli(*(list(args) + ["keys", "create", "where",
                                           "--output", "json"]), **kwargs)
    assert rc == 0, err
    key_id = json.loads(out)["id"]
    holders = []
    for root, _, files in os.walk(str(tmp_path)):
        for name in files:
            if name.endswith(".db"):
                path = os.path.join(root, name)
                rows = query_db(path, "select id from keys where id = ?",
                                (key_id,))
                if rows:
                    holders.append(os.path.relpath(path, str(tmp_path)))
    return holders


def test_db_flag_wins_over_env_which_wins_over_the_config_database(
        tmp_path, run_cli):
    config = _tagged_config(tmp_path / "c.json", "DBDB",
                            database=str(tmp_path / "from-config.db"))
    env = {"LLMGW_DB": str(tmp_path / "from-env.db")}

    assert _key_db(tmp_path, run_cli, "--config", config, "--db",
                   str(tmp_path / "from-flag.db"), env=env) == \
        ["from-flag.db"]
    assert _key_db(tmp_path, run_cli, "--config", config, env=env) == \
        ["from-env.db"]
    assert _key_db(tmp_path, run_cli, "--config", config) == \
        ["from-config.db"]


def test_without_any_setting_the_database_is_llmgw_db_in_the_current_folder(
        tmp_path, run_cli):
    assert _key_db(tmp_path, run_cli) == ["llmgw.db"]
    assert file_mode(str(tmp_path / "llmgw.db")) == 0o600
