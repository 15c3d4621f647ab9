"""The SQLite database: WAL, busy timeout, schema versions, private files.

Covers DESIGN.md "Storage" and the storage half of "Virtual keys": only a
SHA-256 hash of a secret is kept, and the secret is found nowhere on disk
or in the logs.
"""

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys

from conftest import LLMGW, clean_env, file_mode, query_db, run_llmgw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import llmgw  # noqa: E402  (for its MIGRATIONS, to build an old database)

CHAT = {"model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}]}

# a secret made by hand for a key written straight into an old database
OLD_SECRET = "sk-gw-" + "Old0ldOld0ldOld0ldOld0ldOld0ldOld0ldOld0ld_"


def pragma(path, name):
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA %s" % name).fetchone()[0]
    finally:
        conn.close()


def db_files(path):
    return [p for p in (path, path + "-wal", path + "-shm")
            if os.path.exists(p)]


def json_rows(out):
    parsed = json.loads(out)
    return parsed["data"] if isinstance(parsed, dict) else parsed


# ---------------------------------------------------------------------------
# a new database
# ---------------------------------------------------------------------------

def test_a_command_creates_a_private_wal_database_at_the_current_version(
        tmp_path):
    db = str(tmp_path / "new" / "dir" / "gw.db")

    rc, _out, err = run_llmgw(["--db", db, "keys", "list"],
                             cwd=str(tmp_path))

    assert rc == 0, err
    assert os.path.exists(db)
    for path in db_files(db):
        assert file_mode(path) == 0o600, path
    assert pragma(db, "journal_mode").lower() == "wal"
    assert pragma(db, "user_version") == len(llmgw.MIGRATIONS)
    tables = {r["name"] for r in query_db(
        db, "select name from sqlite_master where type = 'table'")}
    assert {"keys", "usage"} <= tables


def test_a_command_waits_for_a_database_another_process_holds_locked(
        tmp_path):
    db = str(tmp_path / "locked.db")
    rc, _, err = run_llmgw(["--db", db, "keys", "list"], cwd=str(tmp_path))
    assert rc == 0, err

    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock
    proc = subprocess.Popen(
        [sys.executable, LLMGW, "--db", db, "keys", "create", "patient",
         "--output", "json"],
        cwd=str(tmp_path), env=clean_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        # keep the lock for a second, or until the command gave up
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1.0)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    out, err = proc.communicate(timeout=30)

    assert proc.returncode == 0, err.decode()
    key_id = json.loads(out.decode())["id"]
    assert query_db(db, "select id from keys where id = ?", (key_id,))


def test_a_database_from_a_newer_llmgw_is_refused_with_one_sentence(tmp_path):
    db = str(tmp_path / "future.db")
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = %d" % (len(llmgw.MIGRATIONS) + 5))
    conn.commit()
    conn.close()

    rc, _out, err = run_llmgw(["--db", db, "keys", "list"], cwd=str(tmp_path))

    assert rc == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmgw: error:"), err
    assert pragma(db, "user_version") == len(llmgw.MIGRATIONS) + 5


# ---------------------------------------------------------------------------
# migrating an old database in place
# ---------------------------------------------------------------------------

def build_version_1_database(path):
    """A database as the first schema made it, with a key and usage rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in llmgw.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    columns = [r[1] for r in conn.execute("PRAGMA table_info(keys)")]
    key = {"id": "key_0a1b2c3d", "secret_hash": hashlib.sha256(
        OLD_SECRET.encode()).hexdigest(), "project": "legacy",
        "name": "from v1", "budget_usd": None, "budget_period": None,
        "rpm": None, "tpm": None, "models": "[]", "expires_at": None,
        "created_at": "2025-01-02T03:04:05.000000Z", "revoked_at": None}
    if "secret_hint" in columns:
        key["secret_hint"] = OLD_SECRET[-4:]
    conn.execute("INSERT INTO keys (%s) VALUES (%s)" % (
        ", ".join(key), ", ".join("?" * len(key))), list(key.values()))
    conn.execute("INSERT INTO keys (id, secret_hash, %s project, created_at,"
                 " revoked_at, models) VALUES ('key_99999999', 'x', %s "
                 "'legacy', '2025-01-01T00:00:00.000000Z', "
                 "'2025-01-05T00:00:00.000000Z', '[]')" % (
                     "secret_hint," if "secret_hint" in columns else "",
                     "'dead'," if "secret_hint" in columns else ""))
    for day, cost in (("2025-01-03", 0.5), ("2025-01-04", 0.25),
                      ("2025-01-05", None)):
        conn.execute(
            "INSERT INTO usage (ts, request_id, key_id, project, provider, "
            "model, route, status, input_tokens, output_tokens, cost_usd, "
            "latency_ms) VALUES (?, ?, 'key_0a1b2c3d', 'legacy', 'openai', "
            "'gpt-4o-mini', '/v1/chat/completions', 200, 100, 10, ?, 5)",
            (day + "T10:00:00.000000Z", "req-" + day, cost))
    conn.close()


def test_a_version_1_database_is_upgraded_in_place_without_losing_rows(
        tmp_path):
    db = str(tmp_path / "old.db")
    build_version_1_database(db)
    before_usage = query_db(db, "select * from usage order by id")

    rc, out, err = run_llmgw(["--db", db, "keys", "list", "--all",
                              "--output", "json"], cwd=str(tmp_path))

    assert rc == 0, err
    assert pragma(db, "user_version") == len(llmgw.MIGRATIONS)
    ids = {k["id"] for k in json_rows(out)}
    assert ids == {"key_0a1b2c3d", "key_99999999"}
    after_usage = query_db(db, "select * from usage order by id")
    assert after_usage == before_usage

    rc, out, err = run_llmgw(["--db", db, "usage", "--output", "json"],
                             cwd=str(tmp_path))
    assert rc == 0, err
    assert [r["request_id"] for r in json_rows(out)] == \
        ["req-2025-01-03", "req-2025-01-04", "req-2025-01-05"]


def test_stats_read_the_rows_of_an_upgraded_database(tmp_path):
    db = str(tmp_path / "old.db")
    build_version_1_database(db)

    rc, out, err = run_llmgw(["--db", db, "stats", "--by", "project",
                              "--output", "json"], cwd=str(tmp_path))

    assert rc == 0, err
    rows = json_rows(out)
    legacy = [r for r in rows if r.get("project") == "legacy"]
    assert len(legacy) == 1
    assert legacy[0]["requests"] == 3
    assert abs(legacy[0]["cost_usd"] - 0.75) < 1e-9


def test_a_key_from_a_version_1_database_works_on_a_gateway_after_upgrade(
        tmp_path, gateway, upstream):
    db = str(tmp_path / "old.db")
    build_version_1_database(db)

    gw = gateway(db_path=db)
    status, _, body = gw.request("POST", "/v1/chat/completions", CHAT,
                                 key=OLD_SECRET)

    assert status == 200, body
    assert pragma(db, "user_version") == len(llmgw.MIGRATIONS)
    rows = gw.wait_rows(4)
    assert len(rows) == 4
    assert rows[-1]["key_id"] == "key_0a1b2c3d"
    # the revoked key of the old database stays revoked
    assert query_db(db, "select revoked_at from keys where id = "
                    "'key_99999999'")[0]["revoked_at"]


# ---------------------------------------------------------------------------
# secrets on disk and in the logs
# ---------------------------------------------------------------------------

def test_only_the_sha256_of_a_secret_is_stored(gateway):
    gw = gateway()
    key = gw.create_key("hashing")

    rows = gw.rows("select * from keys where id = ?", (key["id"],))

    assert len(rows) == 1
    assert rows[0]["secret_hash"] == hashlib.sha256(
        key["secret"].encode()).hexdigest()
    for name, value in rows[0].items():
        assert key["secret"] not in str(value), name


def test_a_secret_is_found_in_no_database_file_and_no_log(gateway, upstream):
    gw = gateway()
    key = gw.create_key("no-leak")
    secret = key["secret"].encode()

    status, _, body = gw.request("POST", "/v1/chat/completions", CHAT,
                                 key=key)
    assert status == 200, body
    stream = gw.stream("/v1/chat/completions", dict(CHAT, stream=True),
                       key=key)
    assert stream.status == 200
    assert len(gw.wait_rows(2)) == 2
    # a failed attempt with a near miss must not be logged either
    near_miss = key["secret"][:-1] + ("Q" if key["secret"][-1] != "Q"
                                      else "R")
    status, _, _ = gw.request("POST", "/v1/chat/completions", CHAT,
                              key=near_miss)
    assert status == 401

    files = db_files(gw.db_path)
    assert len(files) >= 1
    for path in files:
        assert file_mode(path) == 0o600, path
        with open(path, "rb") as handle:
            assert secret not in handle.read(), path
    assert key["secret"] not in gw.stderr_text()
    assert key["secret"][:-1] not in gw.stderr_text()
    assert key["secret"] not in gw.stdout_text()

    gw.stop()
    for path in db_files(gw.db_path):
        assert file_mode(path) == 0o600, path
        with open(path, "rb") as handle:
            assert secret not in handle.read(), path
    assert key["secret"] not in gw.stderr_text()
