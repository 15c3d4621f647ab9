"""The command line: virtual keys, stats, usage, help and errors.

Covers DESIGN.md "Running it" (commands, --output, exit statuses) and
"Virtual keys": `keys create/list/show/update/revoke/rotate` with every
flag, secrets shown once, and changes made by the CLI reaching a running
gateway within a second.  `stats` and `usage` run on rows this module
writes straight into the `usage` table.
"""

import csv
import datetime as dt
import io
import json
import re
import sqlite3

import pytest

from conftest import (assert_one_line_error, insert_usage_rows,
                      module_gateway, poll, query_db, run_llmgw)
from conftest import chat as chat_request

SECRET_RE = re.compile(r"^sk-gw-[A-Za-z0-9_-]{32,}$")
ID_RE = re.compile(r"^key_[0-9a-f]{8}$")


# ---------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_gw(upstream_server, tmp_path_factory):
    """One running gateway for the key tests of this module."""
    with module_gateway(upstream_server, tmp_path_factory, "cli-gw") as gw:
        yield gw


@pytest.fixture
def gw(shared_gw, upstream):
    """The shared gateway, with the fake upstream reset for this test."""
    assert shared_gw.proc.poll() is None, shared_gw.stderr_text()
    return shared_gw


def cli_json(gw, *args):
    """Run a command with --output json on the gateway's files; parse it."""
    rc, out, err = gw.cli(*(list(args) + ["--output", "json"]))
    assert rc == 0, "%s failed (%d): %s" % (args, rc, err)
    return json.loads(out)


def rows_of(parsed):
    """A JSON list, or the "data" list of a JSON list object."""
    if isinstance(parsed, dict) and "data" in parsed:
        return parsed["data"]
    return parsed


def one_key(parsed):
    """The key a one-key command printed (an object, or a list of one)."""
    parsed = rows_of(parsed)
    if isinstance(parsed, list):
        assert len(parsed) == 1, parsed
        return parsed[0]
    return parsed


def chat(gw, secret):
    status, _, body = chat_request(gw, secret)
    return status, body


def error_code(body):
    try:
        return json.loads(body.decode("utf-8"))["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def wait_for_status(gw, secret, want):
    """Send requests (bounded) until one gets `want`; return the last."""
    return poll(lambda: chat(gw, secret), lambda answer: answer[0] == want)


def parse_ts(text):
    text = text.replace("Z", "+00:00")
    return dt.datetime.fromisoformat(text)


# ---------------------------------------------------------------------------
# keys create
# ---------------------------------------------------------------------------

def test_keys_create_prints_an_id_and_a_secret_of_the_documented_shape(gw):
    key = gw.create_key("shape")

    assert ID_RE.match(key["id"]), key["id"]
    assert SECRET_RE.match(key["secret"]), key["secret"]
    assert key["project"] == "shape"
    for field in ("name", "budget_usd", "budget_period", "rpm", "tpm",
                  "models", "expires_at", "created_at", "revoked_at"):
        assert field in key, field
    assert key["revoked_at"] is None

    other = gw.create_key("shape")
    assert other["id"] != key["id"]
    assert other["secret"] != key["secret"]


def test_a_new_key_works_at_once_on_the_running_gateway(gw):
    key = gw.create_key("at-once")

    status, body = chat(gw, key["secret"])

    assert status == 200, body
    rows = gw.wait_rows(1, "select * from usage where key_id = ?",
                        (key["id"],))
    assert rows and rows[0]["project"] == "at-once"


def test_keys_create_stores_every_limit_flag(gw):
    key = gw.create_key("limits", "--name", "nightly batch",
                        "--budget", "12.5", "--budget-period", "week",
                        "--rpm", "7", "--tpm", "1000",
                        "--models", "gpt-4o*, claude-*",
                        "--expires", "2031-06-15")

    assert key["name"] == "nightly batch"
    assert key["budget_usd"] == 12.5
    assert key["budget_period"] == "week"
    assert key["rpm"] == 7
    assert key["tpm"] == 1000
    assert key["models"] == ["gpt-4o*", "claude-*"]
    # a date means valid through the end of that UTC day
    expires = parse_ts(key["expires_at"])
    utc = dt.timezone.utc
    assert dt.datetime(2031, 6, 15, 23, 59, 59, tzinfo=utc) <= expires <= \
        dt.datetime(2031, 6, 16, 0, 0, 0, tzinfo=utc)

    shown = cli_json(gw, "keys", "show", key["id"])
    for field in ("name", "budget_usd", "budget_period", "rpm", "tpm",
                  "models"):
        assert shown[field] == key[field], field
    assert parse_ts(shown["expires_at"]) == expires


def test_expires_in_days_counts_from_now(gw):
    before = dt.datetime.now(dt.timezone.utc)
    key = gw.create_key("thirty-days", "--expires", "30d")
    after = dt.datetime.now(dt.timezone.utc)

    expires = parse_ts(key["expires_at"])
    assert before + dt.timedelta(days=30) - dt.timedelta(minutes=1) <= \
        expires <= after + dt.timedelta(days=30) + dt.timedelta(minutes=1)


def test_keys_create_as_a_table_shows_the_secret_exactly_once(gw):
    rc, out, err = gw.cli("keys", "create", "table-secret", "--name", "t")

    assert rc == 0, err
    secrets_seen = re.findall(r"sk-gw-[A-Za-z0-9_-]{32,}", out + err)
    assert len(secrets_seen) == 1, out + err
    assert "table-secret" in out
    key_id = re.findall(r"key_[0-9a-f]{8}", out)
    assert key_id, out
    status, body = chat(gw, secrets_seen[0])
    assert status == 200, body


@pytest.mark.parametrize("flags, words", [
    (["--budget", "-5"], ["budget"]),
    (["--budget", "lots"], ["budget"]),
    (["--rpm", "abc"], ["rpm"]),
    (["--rpm", "-3"], ["rpm"]),
    (["--tpm", "1.5"], ["tpm"]),
    (["--expires", "tomorrow"], ["tomorrow"]),
    (["--expires", "2031-13-45"], ["2031-13-45"]),
    (["--budget-period", "year"], ["year"]),
], ids=["negative-budget", "word-budget", "rpm-abc", "negative-rpm",
        "fractional-tpm", "expires-word", "expires-bad-date",
        "period-year"])
def test_keys_create_refuses_a_bad_flag_value_clearly(gw, flags, words):
    before = len(query_db(gw.db_path, "select id from keys"))

    rc, out, err = gw.cli("keys", "create", "bad-flags", *flags)

    assert rc in (1, 2), (rc, err)
    assert "Traceback" not in err
    assert err.strip(), "no message"
    last = err.strip().splitlines()[-1]
    assert "error" in last
    for word in words:
        assert word in last, (word, err)
    assert "sk-gw-" not in out
    assert len(query_db(gw.db_path, "select id from keys")) == before


# ---------------------------------------------------------------------------
# keys list / show: never the secret
# ---------------------------------------------------------------------------

def test_keys_list_and_show_never_print_the_secret(gw):
    key = gw.create_key("quiet", "--budget", "3")
    secret = key["secret"]

    for args in (["keys", "list"], ["keys", "list", "--output", "json"],
                 ["keys", "list", "--all", "--output", "json"],
                 ["keys", "list", "--project", "quiet"],
                 ["keys", "show", key["id"]],
                 ["keys", "show", key["id"], "--output", "json"],
                 ["keys", "update", key["id"], "--rpm", "9"],
                 ["keys", "update", key["id"], "--rpm", "8",
                  "--output", "json"]):
        rc, out, err = gw.cli(*args)
        assert rc == 0, (args, err)
        assert secret not in out + err, args
        assert secret[6:] not in out + err, args


def test_keys_list_filters_by_project_and_shows_spend(gw):
    first = gw.create_key("list-proj-a")
    second = gw.create_key("list-proj-a", "--name", "second")
    other = gw.create_key("list-proj-b")
    assert chat(gw, first["secret"])[0] == 200
    gw.wait_rows(1, "select * from usage where key_id = ?", (first["id"],))

    listed = rows_of(cli_json(gw, "keys", "list", "--project",
                              "list-proj-a"))

    assert {k["id"] for k in listed} == {first["id"], second["id"]}
    assert other["id"] not in {k["id"] for k in listed}
    spent = [k for k in listed if k["id"] == first["id"]][0]
    spend_fields = [v for name, v in spent.items() if "spend" in name
                    and isinstance(v, (int, float))]
    assert spend_fields and max(spend_fields) > 0, spent

    rc, out, err = gw.cli("keys", "list", "--project", "list-proj-a")
    assert rc == 0, err
    assert first["id"] in out and second["id"] in out
    assert other["id"] not in out


def test_keys_show_of_an_unknown_id_says_there_is_no_such_key(gw):
    for verb in ("show", "revoke", "rotate"):
        rc, out, err = gw.cli("keys", verb, "key_00000000")
        assert_one_line_error(rc, err, "no key")
        assert out == "", verb
    rc, out, err = gw.cli("keys", "update", "key_00000000", "--rpm", "5")
    assert_one_line_error(rc, err, "no key")
    assert out == ""


# ---------------------------------------------------------------------------
# keys update
# ---------------------------------------------------------------------------

def test_keys_update_changes_each_limit_and_keeps_the_rest(gw):
    key = gw.create_key("updating", "--name", "before", "--budget", "5",
                        "--rpm", "10")

    updated = cli_json(gw, "keys", "update", key["id"], "--name", "after",
                       "--budget", "20", "--budget-period", "day",
                       "--tpm", "500", "--models", "gpt-4o-mini",
                       "--expires", "2032-01-31")

    updated = one_key(updated)
    assert updated["id"] == key["id"]
    shown = cli_json(gw, "keys", "show", key["id"])
    assert shown["name"] == "after"
    assert shown["budget_usd"] == 20
    assert shown["budget_period"] == "day"
    assert shown["tpm"] == 500
    assert shown["rpm"] == 10  # not named, so unchanged
    assert shown["models"] == ["gpt-4o-mini"]
    assert shown["expires_at"].startswith("2032-01-31T23:59:59")
    assert shown["project"] == "updating"


def test_keys_update_refuses_bad_values_and_changes_nothing(gw):
    key = gw.create_key("update-bad", "--rpm", "10")

    for flags in (["--rpm", "abc"], ["--budget", "-1"],
                  ["--expires", "soon"], ["--budget-period", "decade"]):
        rc, _out, err = gw.cli("keys", "update", key["id"], *flags)
        assert rc in (1, 2), (flags, err)
        assert "Traceback" not in err
        assert "error" in err.strip().splitlines()[-1], err

    shown = cli_json(gw, "keys", "show", key["id"])
    assert shown["rpm"] == 10
    assert shown["budget_usd"] is None
    assert shown["expires_at"] is None


def test_a_model_allow_list_set_by_the_cli_reaches_the_running_gateway(gw):
    key = gw.create_key("allow-list")
    assert chat(gw, key["secret"])[0] == 200

    rc, _, err = gw.cli("keys", "update", key["id"], "--models",
                        "claude-*")
    assert rc == 0, err

    status, body = wait_for_status(gw, key["secret"], 403)
    assert status == 403, body
    assert error_code(body) == "model_not_allowed"


# ---------------------------------------------------------------------------
# keys revoke / rotate on a running gateway
# ---------------------------------------------------------------------------

def test_a_revoked_key_is_refused_by_the_running_gateway_within_a_second(gw):
    key = gw.create_key("revoking")
    assert chat(gw, key["secret"])[0] == 200

    revoked = cli_json(gw, "keys", "revoke", key["id"])

    revoked = one_key(revoked)
    assert revoked["id"] == key["id"]
    assert revoked["revoked_at"]
    status, body = wait_for_status(gw, key["secret"], 401)
    assert status == 401, body
    assert error_code(body) == "key_revoked"


def test_keys_list_hides_revoked_and_expired_keys_unless_all(gw):
    active = gw.create_key("lifecycle")
    revoked = gw.create_key("lifecycle")
    expired = gw.create_key("lifecycle", "--expires", "30d")
    rc, _, err = gw.cli("keys", "revoke", revoked["id"])
    assert rc == 0, err
    conn = sqlite3.connect(gw.db_path, timeout=5)
    with conn:
        conn.execute("update keys set expires_at = ? where id = ?",
                     ("2020-01-01T00:00:00.000000Z", expired["id"]))
    conn.close()

    listed = rows_of(cli_json(gw, "keys", "list", "--project", "lifecycle"))
    assert {k["id"] for k in listed} == {active["id"]}

    everything = rows_of(cli_json(gw, "keys", "list", "--project",
                                  "lifecycle", "--all"))
    assert {k["id"] for k in everything} == {
        active["id"], revoked["id"], expired["id"]}
    by_id = {k["id"]: k for k in everything}
    assert by_id[revoked["id"]]["revoked_at"]
    assert by_id[active["id"]]["revoked_at"] is None

    rc, out, err = gw.cli("keys", "list", "--project", "lifecycle", "--all")
    assert rc == 0, err
    lines = {k: [line for line in out.splitlines() if k in line]
             for k in by_id}
    assert "revoked" in lines[revoked["id"]][0]
    assert "expired" in lines[expired["id"]][0]
    rc, out, err = gw.cli("keys", "list", "--project", "lifecycle")
    assert revoked["id"] not in out and expired["id"] not in out


def test_rotate_gives_a_new_secret_and_keeps_id_limits_and_history(gw):
    key = gw.create_key("rotating", "--name", "r", "--budget", "40",
                        "--rpm", "50", "--models", "gpt-4o*")
    assert chat(gw, key["secret"])[0] == 200
    gw.wait_rows(1, "select * from usage where key_id = ?", (key["id"],))

    rotated = one_key(cli_json(gw, "keys", "rotate", key["id"]))

    assert rotated["id"] == key["id"]
    assert SECRET_RE.match(rotated["secret"])
    assert rotated["secret"] != key["secret"]
    for field in ("project", "name", "budget_usd", "budget_period", "rpm",
                  "models", "created_at"):
        assert rotated[field] == key[field], field

    # the old secret stops working, the new one works, on the running server
    status, body = wait_for_status(gw, key["secret"], 401)
    assert status == 401, body
    sql = "select * from usage where key_id = ?"
    before = len(gw.rows(sql, (key["id"],)))
    assert before >= 1
    assert chat(gw, rotated["secret"])[0] == 200

    # history: the requests before and after rotation count for one key
    rows = gw.wait_rows(before + 1, sql, (key["id"],))
    assert len(rows) == before + 1
    assert {r["project"] for r in rows} == {"rotating"}
    stats = cli_json(gw, "stats", "--key", key["id"], "--by", "key")
    assert sum(r["requests"] for r in rows_of(stats)) == before + 1
    shown = cli_json(gw, "keys", "show", key["id"])
    assert rotated["secret"] not in json.dumps(shown)


def test_rotate_as_a_table_prints_the_new_secret_once(gw):
    key = gw.create_key("rotate-table")

    rc, out, err = gw.cli("keys", "rotate", key["id"])

    assert rc == 0, err
    found = re.findall(r"sk-gw-[A-Za-z0-9_-]{32,}", out + err)
    assert len(found) == 1, out + err
    assert found[0] != key["secret"]
    assert chat(gw, found[0])[0] == 200


def test_revoke_and_rotate_take_json_output(gw):
    key = gw.create_key("json-verbs")
    for verb in ("show", "rotate", "revoke"):
        item = one_key(cli_json(gw, "keys", verb, key["id"]))
        assert item["id"] == key["id"], verb
        # only rotate hands out a secret
        assert ("secret" in item) == (verb == "rotate"), verb
    assert isinstance(rows_of(cli_json(gw, "keys", "list", "--all")), list)


# ---------------------------------------------------------------------------
# stats and usage on rows written by the test
# ---------------------------------------------------------------------------

# ts, key_id, project, provider, model, status, input, output, cached,
# cache_write, reasoning, cost_usd, error
USAGE_ROWS = [
    ("2025-03-01T10:00:00.000000Z", "key_aaaaaaaa", "alpha", "openai",
     "gpt-4o-mini", 200, 100, 50, 0, 0, 0, 0.001, None),
    ("2025-03-01T23:59:59.500000Z", "key_aaaaaaaa", "alpha", "openai",
     "gpt-4o", 200, 200, 20, 10, 0, 5, 0.01, None),
    ("2025-03-02T00:00:00.000000Z", "key_bbbbbbbb", "beta", "anthropic",
     "claude-sonnet-4", 200, 300, 30, 40, 5, 0, 0.02, None),
    ("2025-03-02T12:00:00.000000Z", "key_bbbbbbbb", "beta", "ollama",
     "llama3", 200, 400, 40, 0, 0, 0, None, None),
    ("2025-03-03T08:00:00.000000Z", "key_cccccccc", "alpha", "ollama",
     "llama3", 200, 10, 5, 0, 0, 0, None, None),
    # refused for a limit: no tokens, no cost, not "unpriced"
    ("2025-03-03T09:00:00.000000Z", "key_aaaaaaaa", "alpha", "openai",
     "gpt-4o-mini", 429, 0, 0, 0, 0, 0, None, "rate_limit_exceeded"),
]


@pytest.fixture(scope="module")
def stats_db(tmp_path_factory):
    """A database holding exactly USAGE_ROWS."""
    folder = tmp_path_factory.mktemp("stats")
    db = str(folder / "stats.db")
    rc, _, err = run_llmgw(["--db", db, "keys", "list"], cwd=str(folder))
    assert rc == 0, err
    rows = []
    for n, row in enumerate(USAGE_ROWS):
        (ts, key_id, project, provider, model, status, inp, out, cached,
         cache_write, reasoning, cost, error) = row
        rows.append({
            "ts": ts, "request_id": "req_%d" % n, "key_id": key_id,
            "project": project, "provider": provider, "model": model,
            "route": "/v1/chat/completions", "status": status,
            "input_tokens": inp, "output_tokens": out,
            "cached_input_tokens": cached, "cache_write_tokens": cache_write,
            "reasoning_tokens": reasoning, "cost_usd": cost,
            "ttfb_ms": 10.0, "latency_ms": 20.0, "streamed": 0,
            "estimated": 0, "upstream_request_id": "up_%d" % n,
            "error": error})
    insert_usage_rows(db, rows)
    return db


def stats(db, *args):
    rc, out, err = run_llmgw(["--db", db, "stats"] + list(args) +
                             ["--output", "json"])
    assert rc == 0, err
    return out


def groups(out, by):
    """`stats --output json` as {group value: row}."""
    result = {}
    for row in rows_of(json.loads(out)):
        value = row.get(by)
        if value is None and by == "key":
            value = row.get("key_id")
        result[value] = row
    return result


@pytest.mark.parametrize("by, expected", [
    ("project", {"alpha": 4, "beta": 2}),
    ("key", {"key_aaaaaaaa": 3, "key_bbbbbbbb": 2, "key_cccccccc": 1}),
    ("model", {"gpt-4o-mini": 2, "gpt-4o": 1, "claude-sonnet-4": 1,
               "llama3": 2}),
    ("provider", {"openai": 3, "anthropic": 1, "ollama": 2}),
    ("day", {"2025-03-01": 2, "2025-03-02": 2, "2025-03-03": 2}),
])
def test_stats_groups_requests_by_each_dimension(stats_db, by, expected):
    found = groups(stats(stats_db, "--by", by), by)

    assert {k: v["requests"] for k, v in found.items()} == expected


def test_stats_sums_tokens_and_cost_per_project(stats_db):
    found = groups(stats(stats_db, "--by", "project"), "project")

    alpha, beta = found["alpha"], found["beta"]
    assert alpha["input_tokens"] == 310
    assert alpha["output_tokens"] == 75
    assert alpha["cached_input_tokens"] == 10
    assert beta["input_tokens"] == 700
    assert beta["cache_write_tokens"] == 5
    assert abs(alpha["cost_usd"] - 0.011) < 1e-9
    assert abs(beta["cost_usd"] - 0.02) < 1e-9


def test_stats_report_unpriced_rows_as_unpriced_not_as_free(stats_db):
    by_model = groups(stats(stats_db, "--by", "model"), "model")

    assert by_model["llama3"]["unpriced"] == 2
    # nothing but unpriced requests: no cost can be given, and 0 would lie
    assert by_model["llama3"]["cost_usd"] is None
    # the refused request used no tokens: it is not unpriced
    assert by_model["gpt-4o-mini"]["unpriced"] == 0
    assert abs(by_model["gpt-4o-mini"]["cost_usd"] - 0.001) < 1e-9

    by_project = groups(stats(stats_db, "--by", "project"), "project")
    assert by_project["alpha"]["unpriced"] == 1
    assert by_project["beta"]["unpriced"] == 1
    # priced rows are still summed next to the unpriced ones
    assert abs(by_project["beta"]["cost_usd"] - 0.02) < 1e-9


@pytest.mark.parametrize("window, expected", [
    (["--since", "2025-03-02"], {"2025-03-02": 2, "2025-03-03": 2}),
    (["--until", "2025-03-01"], {"2025-03-01": 2}),
    (["--since", "2025-03-02", "--until", "2025-03-02"], {"2025-03-02": 2}),
    (["--since", "2025-03-01T12:00:00Z", "--until", "2025-03-02T06:00:00Z"],
     {"2025-03-01": 1, "2025-03-02": 1}),
    (["--since", "2025-03-02T11:00:00", "--until",
      "2025-03-03T08:30:00+00:00"],
     {"2025-03-02": 1, "2025-03-03": 1}),
], ids=["since-date", "until-date-whole-day", "one-day", "iso-z",
        "iso-naive-and-offset"])
def test_stats_since_and_until_take_dates_and_iso_times(
        stats_db, window, expected):
    found = groups(stats(stats_db, "--by", "day", *window), "day")

    assert {k: v["requests"] for k, v in found.items()} == expected


@pytest.mark.parametrize("filters, expected", [
    (["--project", "beta"], {"beta": 2}),
    (["--key", "key_aaaaaaaa"], {"alpha": 3}),
    (["--model", "llama3"], {"alpha": 1, "beta": 1}),
    (["--project", "alpha", "--model", "llama3"], {"alpha": 1}),
    (["--project", "nobody"], {}),
])
def test_stats_filters_by_project_key_and_model(stats_db, filters, expected):
    found = groups(stats(stats_db, "--by", "project", *filters), "project")

    assert {k: v["requests"] for k, v in found.items()} == expected


def test_stats_as_a_table_shows_each_group_and_the_unpriced_count(stats_db):
    rc, out, err = run_llmgw(["--db", stats_db, "stats", "--by", "model"])

    assert rc == 0, err
    lines = out.splitlines()
    assert "unpriced" in (out + err).lower()
    for model, requests in (("gpt-4o-mini", 2), ("llama3", 2),
                            ("claude-sonnet-4", 1)):
        line = [text for text in lines
                if re.search(r"(^|\s)%s\s" % re.escape(model), text)]
        assert line, out
        assert re.search(r"\s%d(\s|$)" % requests, line[0]), line[0]
    header = lines[0]
    llama = next(text for text in lines if text.startswith("llama3"))
    # aligned: the requests column starts at the same place in every row
    col = header.lower().index("requests")
    assert llama[col - 1] == " " and llama[col] != " ", (header, llama)


def test_stats_as_csv_has_a_header_and_one_row_per_group(stats_db):
    rc, out, err = run_llmgw(["--db", stats_db, "stats", "--by", "provider",
                              "--output", "csv"])

    assert rc == 0, err
    reader = csv.DictReader(io.StringIO(out))
    rows = list(reader)
    assert "requests" in reader.fieldnames
    assert "cost_usd" in reader.fieldnames
    group_col = reader.fieldnames[0]
    by_group = {r[group_col]: r for r in rows if r[group_col] != "TOTAL"}
    assert {k: int(v["requests"]) for k, v in by_group.items()} == \
        {"openai": 3, "anthropic": 1, "ollama": 2}
    assert abs(float(by_group["openai"]["cost_usd"]) - 0.011) < 1e-9
    # only unpriced requests: an empty cell, not a zero
    assert by_group["ollama"]["cost_usd"] == ""


def test_stats_with_a_bad_date_fails_with_one_sentence(stats_db):
    rc, _out, err = run_llmgw(["--db", stats_db, "stats", "--since",
                              "last tuesday"])

    assert_one_line_error(rc, err, "last tuesday")


def test_usage_exports_every_row_as_json_oldest_first(stats_db):
    rc, out, err = run_llmgw(["--db", stats_db, "usage", "--output",
                              "json"])

    assert rc == 0, err
    rows = rows_of(json.loads(out))
    assert [r["request_id"] for r in rows] == \
        ["req_%d" % n for n in range(len(USAGE_ROWS))]
    first = rows[0]
    assert first["ts"] == USAGE_ROWS[0][0]
    assert first["key_id"] == "key_aaaaaaaa"
    assert first["input_tokens"] == 100
    assert first["output_tokens"] == 50
    assert first["cost_usd"] == 0.001
    assert rows[3]["cost_usd"] is None
    assert rows[5]["error"] == "rate_limit_exceeded"
    assert rows[5]["status"] == 429


def test_usage_since_and_limit_select_rows(stats_db):
    rc, out, err = run_llmgw(["--db", stats_db, "usage", "--since",
                              "2025-03-02", "--output", "json"])
    assert rc == 0, err
    assert [r["request_id"] for r in rows_of(json.loads(out))] == \
        ["req_2", "req_3", "req_4", "req_5"]

    rc, out, err = run_llmgw(["--db", stats_db, "usage", "--since",
                              "2025-03-02T12:00:00Z", "--output", "json"])
    assert rc == 0, err
    assert [r["request_id"] for r in rows_of(json.loads(out))] == \
        ["req_3", "req_4", "req_5"]

    rc, out, err = run_llmgw(["--db", stats_db, "usage", "--limit", "2",
                              "--output", "json"])
    assert rc == 0, err
    assert [r["request_id"] for r in rows_of(json.loads(out))] == \
        ["req_0", "req_1"]


def test_usage_as_csv_leaves_an_unpriced_cost_empty(stats_db):
    rc, out, err = run_llmgw(["--db", stats_db, "usage", "--output", "csv",
                              "--since", "2025-03-02"])

    assert rc == 0, err
    reader = csv.DictReader(io.StringIO(out))
    rows = list(reader)
    for column in ("ts", "key_id", "project", "model", "input_tokens",
                   "output_tokens", "cost_usd"):
        assert column in reader.fieldnames, column
    assert [r["request_id"] for r in rows] == \
        ["req_2", "req_3", "req_4", "req_5"]
    assert float(rows[0]["cost_usd"]) == 0.02
    assert rows[1]["cost_usd"] == ""
    assert rows[1]["input_tokens"] == "400"


# ---------------------------------------------------------------------------
# help, usage errors, runtime errors
# ---------------------------------------------------------------------------

COMMANDS = [
    [], ["init"], ["serve"], ["keys"], ["keys", "create"], ["keys", "list"],
    ["keys", "show"], ["keys", "update"], ["keys", "revoke"],
    ["keys", "rotate"], ["config"], ["config", "set-key"],
    ["config", "list-keys"], ["config", "show"], ["config", "check"],
    ["stats"], ["usage"], ["prices"], ["systemd-unit"],
]


@pytest.mark.parametrize("command", COMMANDS,
                         ids=[" ".join(c) or "top" for c in COMMANDS])
def test_every_command_has_help(tmp_path, command):
    rc, out, err = run_llmgw(command + ["--help"], cwd=str(tmp_path))

    assert rc == 0, err
    assert out.lower().startswith("usage:"), out
    if command:
        assert command[-1] in out
    # asking for help creates nothing
    assert not (tmp_path / "llmgw.db").exists()
    assert not (tmp_path / "llmgw.json").exists()


def test_help_lists_the_key_flags_of_keys_create(tmp_path):
    rc, out, err = run_llmgw(["keys", "create", "--help"], cwd=str(tmp_path))

    assert rc == 0, err
    for flag in ("--name", "--budget", "--budget-period", "--rpm", "--tpm",
                 "--models", "--expires", "--output"):
        assert flag in out, flag


@pytest.mark.parametrize("args", [
    [],
    ["frobnicate"],
    ["keys"],
    ["keys", "create"],
    ["keys", "create", "p", "--colour", "blue"],
    ["keys", "list", "--output", "xml"],
    ["stats", "--by", "week"],
    ["stats", "--output", "yaml"],
    ["usage", "--limit", "many"],
    ["usage", "--output", "table"],
    ["config", "set-key", "openai"],
], ids=lambda a: " ".join(a) or "nothing")
def test_usage_errors_exit_2(tmp_path, args):
    rc, out, err = run_llmgw(["--db", str(tmp_path / "u.db")] + args,
                             cwd=str(tmp_path))

    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    assert "usage:" in err.lower() or "error" in err.lower()


@pytest.mark.parametrize("args, words", [
    (["keys", "show", "key_deadbeef"], ["no key"]),
    (["keys", "revoke", "key_deadbeef"], ["no key"]),
    (["stats", "--until", "2025-02-30"], ["2025-02-30"]),
    (["usage", "--since", "not-a-date"], ["not-a-date"]),
    (["prices", "no-such-model-xyz"], ["no-such-model-xyz"]),
], ids=["show-unknown", "revoke-unknown", "stats-bad-until",
        "usage-bad-since", "prices-unknown"])
def test_runtime_errors_print_one_line_and_exit_1(tmp_path, args, words):
    rc, _out, err = run_llmgw(["--db", str(tmp_path / "r.db")] + args,
                             cwd=str(tmp_path))

    assert_one_line_error(rc, err, *words)
