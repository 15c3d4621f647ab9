"""Per-key limits: budgets, rate limits, model allow-lists, expiry.

Most tests share one gateway (module scope) and create their own keys on
it, so their limits and counters never meet.  Spend is made deterministic
with a price override: "test-model" and "claude-test" cost $1 per input
token and nothing per output token, and the fake upstream reports one
input token, so every successful request costs exactly $1.
"""

import datetime as dt
import fnmatch
import json
import math
import threading
import time

import pytest

from conftest import key_rows, module_gateway, poll
from conftest import chat as chat_request, insert_usage_rows
from conftest import openai_error as check_openai_error
from fakes import Reply


PRICES = {
    "test-model": {"input": 1000000, "output": 0},
    "claude-test": {"input": 1000000, "output": 0},
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gw(upstream_server, tmp_path_factory):
    """One gateway for the module, with the $1-per-request price table."""
    with module_gateway(upstream_server, tmp_path_factory, "limits",
                        {"prices": PRICES}) as gateway:
        yield gateway


def dollar_requests(upstream):
    """Make every answer report 1 input token: $1 on the test prices."""
    upstream.usage.update(prompt_tokens=1, cached_tokens=0,
                          completion_tokens=0, reasoning_tokens=0,
                          input_tokens=1, output_tokens=0,
                          cache_creation_input_tokens=0,
                          cache_read_input_tokens=0)


def chat(gw, key, model="test-model"):
    """POST /v1/chat/completions; return (status, headers, body bytes)."""
    return chat_request(gw, key, model)


def messages(gw, key, model="claude-test"):
    """POST /v1/messages (Anthropic format)."""
    return gw.request("POST", "/v1/messages",
                      {"model": model, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "hi"}]},
                      key=key)


def openai_error(body, code):
    """Check the OpenAI error shape and code; return the error object."""
    return check_openai_error(json.loads(body.decode("utf-8")), code)


def anthropic_error(body, kind, code):
    """Check the Anthropic error shape, type and code; return the error."""
    obj = json.loads(body.decode("utf-8"))
    assert obj.get("type") == "error", obj
    err = obj["error"]
    assert err["type"] == kind, err
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    return err


def assert_refusal_row(row, status, kind):
    """A refusal is recorded with its status, error kind and no tokens."""
    assert row["status"] == status, row
    assert row["error"] == kind, row
    for column in ("input_tokens", "output_tokens", "cached_input_tokens",
                   "cache_write_tokens", "reasoning_tokens"):
        assert row[column] == 0, (column, row)
    assert not row["cost_usd"], row


def show_key(gw, key):
    """`keys show ID --output json` as a dict."""
    code, out, err = gw.cli("keys", "show", key["id"], "--output", "json")
    assert code == 0, err
    return json.loads(out)


def utc_midnight(now=None):
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def ts(when):
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def retry_ms(headers):
    """Check the 429 retry headers; return retry-after-ms as an int."""
    assert headers.get("retry-after", "").isdigit(), headers
    assert headers.get("retry-after-ms", "").isdigit(), headers
    seconds = int(headers["retry-after"])
    millis = int(headers["retry-after-ms"])
    assert 0 < millis <= 60000, headers
    assert 0 < seconds <= 60, headers
    # both name the same moment: whole seconds, rounded up
    assert seconds == math.ceil(millis / 1000.0), headers
    return millis


# ---------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------

def test_daily_budget_refuses_with_402_once_the_days_spend_reaches_it(
        gw, upstream):
    dollar_requests(upstream)
    key = gw.create_key("budget-day", "--budget", "3",
                        "--budget-period", "day")
    before = utc_midnight() + dt.timedelta(days=1)

    for _ in range(3):
        status, _, body = chat(gw, key)
        assert status == 200, body
    status, headers, body = chat(gw, key)
    after = utc_midnight() + dt.timedelta(days=1)

    assert status == 402
    assert headers.get("x-should-retry") == "false"
    err = openai_error(body, "budget_exceeded")
    # the message names the limit, its value and when it resets
    message = err["message"]
    assert "budget" in message and "daily" in message
    assert "$3.00" in message
    assert any(when.strftime("%Y-%m-%dT00:00:00") in message
               for when in (before, after)), message
    # the refused request never reached the provider
    assert len(upstream.requests) == 3

    rows = key_rows(gw, key, 4)
    assert [r["status"] for r in rows] == [200, 200, 200, 402]
    assert sum(r["cost_usd"] for r in rows[:3]) == pytest.approx(3.0)
    assert_refusal_row(rows[3], 402, "budget_exceeded")


def test_total_budget_refusal_on_messages_uses_the_anthropic_error_shape(
        gw, upstream):
    dollar_requests(upstream)
    key = gw.create_key("budget-total", "--budget", "1",
                        "--budget-period", "total")

    status, _, body = messages(gw, key)
    assert status == 200, body
    status, headers, body = messages(gw, key)

    assert status == 402
    assert headers.get("x-should-retry") == "false"
    err = anthropic_error(body, "billing_error", "budget_exceeded")
    assert "total" in err["message"] and "$1.00" in err["message"]
    rows = key_rows(gw, key, 2)
    assert rows[0]["cost_usd"] == pytest.approx(1.0)
    assert_refusal_row(rows[1], 402, "budget_exceeded")


def test_each_budget_period_starts_fresh_while_a_total_budget_counts_all(
        upstream, gateway, tmp_config, tmp_db, run_cli):
    dollar_requests(upstream)
    config = tmp_config({"prices": PRICES})

    def create(*flags):
        code, out, err = run_cli("--config", config, "--db", tmp_db,
                                 "keys", "create", "history", *flags,
                                 "--output", "json")
        assert code == 0, err
        return json.loads(out)

    day = create("--budget", "2", "--budget-period", "day")
    week = create("--budget", "2", "--budget-period", "week")
    month = create("--budget", "2", "--budget-period", "month")
    total = create("--budget", "5", "--budget-period", "total")

    # earlier spend, written before the gateway starts: $5 just before
    # each period began, and $1 at the very start of today
    today = utc_midnight()
    week_start = today - dt.timedelta(days=today.weekday())
    month_start = today.replace(day=1)
    second = dt.timedelta(seconds=1)
    history = [(day, today - second, 5.0), (day, today, 1.0),
               (week, week_start - second, 5.0),
               (month, month_start - second, 5.0),
               (total, today - dt.timedelta(days=3), 5.0)]
    insert_usage_rows(tmp_db, [
        {"ts": ts(when), "request_id": "req_old", "key_id": key["id"],
         "project": "history", "provider": "openai", "model": "test-model",
         "route": "/v1/chat/completions", "status": 200,
         "input_tokens": int(cost), "output_tokens": 0, "cost_usd": cost}
        for key, when, cost in history])

    gw = gateway(config={"prices": PRICES}, db_path=tmp_db)

    # day: yesterday's $5 is forgotten, today's $1 counts: $1 left
    assert [chat(gw, day)[0] for _ in range(2)] == [200, 402]
    # week and month: the whole $2 is there again
    assert [chat(gw, week)[0] for _ in range(3)] == [200, 200, 402]
    assert [chat(gw, month)[0] for _ in range(3)] == [200, 200, 402]
    # total: the old $5 still counts
    status, _, body = chat(gw, total)
    assert status == 402
    openai_error(body, "budget_exceeded")

    shown = show_key(gw, day)
    assert shown["budget_usd"] == 2.0
    assert shown["budget_period"] == "day"
    assert shown["spend_period_usd"] == pytest.approx(2.0)
    assert shown["spend_total_usd"] == pytest.approx(7.0)


def test_concurrent_requests_cannot_spend_past_the_budget(gw, upstream):
    dollar_requests(upstream)
    key = gw.create_key("budget-race", "--budget", "5",
                        "--budget-period", "day")
    # let the gateway learn the new key first (a free request), so this
    # test is about budgets only; see the key-cache test below
    assert gw.request("GET", "/v1/models", key=key)[0] == 200
    release = threading.Event()

    def held(rec):
        # every admitted request waits at the provider until released
        release.wait(10)
        return Reply()

    upstream.set_default(held)
    results = [None] * 20

    def send(index):
        results[index] = chat(gw, key)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    try:
        # wait until every request was refused or reached the provider
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answered = sum(1 for r in results if r is not None)
            if answered + len(upstream.requests) >= 20:
                break
            time.sleep(0.02)
        admitted = len(upstream.requests)
    finally:
        release.set()
        for thread in threads:
            thread.join(20)
    upstream.set_default(None)

    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 402}, [r for r in results
                                         if r[0] not in (200, 402)]
    # nothing was settled while they were held: at most $5 of $1 requests
    # may be in flight, whatever estimate each one reserved
    assert 1 <= admitted <= 5, statuses
    assert statuses.count(200) == admitted
    for status, headers, body in results:
        if status == 402:
            openai_error(body, "budget_exceeded")
            assert headers.get("x-should-retry") == "false"

    # one at a time, the rest of the budget is usable, and no more
    extra = []
    for _ in range(10):
        status = chat(gw, key)[0]
        extra.append(status)
        if status != 200:
            break
    assert extra[-1] == 402, extra
    assert admitted + extra.count(200) == 5, (admitted, extra)

    rows = key_rows(gw, key, 20 + len(extra))
    assert sum(r["cost_usd"] or 0 for r in rows) == pytest.approx(5.0)
    assert sum(1 for r in rows if r["error"] == "budget_exceeded") == \
        statuses.count(402) + 1
    shown = show_key(gw, key)
    assert shown["spend_period_usd"] == pytest.approx(5.0)
    assert shown["budget_remaining_usd"] == pytest.approx(0.0)


def test_a_new_key_works_for_concurrent_first_requests(gw, upstream):
    # keys made by another process (the CLI) while the gateway runs must
    # be known to every request, however many arrive at once
    for attempt in range(8):
        key = gw.create_key("fresh-concurrent")
        results = [None] * 20
        barrier = threading.Barrier(20)

        def send(index):
            barrier.wait(10)
            results[index] = gw.request("GET", "/v1/models", key=key)

        threads = [threading.Thread(target=send, args=(i,))
                   for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        refused = [(r[0], r[2][:120]) for r in results if r[0] != 200]
        assert refused == [], (attempt, refused)


def test_keys_show_and_list_report_spend_against_budget_and_limits(
        gw, upstream):
    dollar_requests(upstream)
    key = gw.create_key("report", "--budget", "5", "--budget-period",
                        "week", "--rpm", "100", "--tpm", "100000",
                        "--models", "test-*,claude-*")
    for _ in range(2):
        assert chat(gw, key)[0] == 200

    shown = show_key(gw, key)
    assert shown["id"] == key["id"]
    assert shown["budget_usd"] == 5.0
    assert shown["budget_period"] == "week"
    assert shown["rpm"] == 100 and shown["tpm"] == 100000
    assert shown["models"] == ["test-*", "claude-*"]
    assert shown["spend_period_usd"] == pytest.approx(2.0)
    assert shown["spend_total_usd"] == pytest.approx(2.0)
    assert shown["budget_remaining_usd"] == pytest.approx(3.0)

    code, out, err = gw.cli("keys", "list", "--project", "report",
                            "--output", "json")
    assert code == 0, err
    listed = json.loads(out)
    assert [k["id"] for k in listed] == [key["id"]]
    assert listed[0]["spend_period_usd"] == pytest.approx(2.0)
    assert listed[0]["budget_usd"] == 5.0
    assert listed[0]["rpm"] == 100 and listed[0]["tpm"] == 100000

    # the table for people shows the same spend and budget
    code, out, err = gw.cli("keys", "list", "--project", "report")
    assert code == 0, err
    line = [l for l in out.splitlines() if key["id"] in l]
    assert len(line) == 1, out
    assert "2.00" in line[0] and "5.00" in line[0] and "week" in line[0]


# ---------------------------------------------------------------------------
# rate limits
# ---------------------------------------------------------------------------

def test_rpm_limit_answers_429_with_retry_headers_for_the_oldest_request(
        gw, upstream):
    key = gw.create_key("rpm", "--rpm", "2")
    other = gw.create_key("rpm")

    started = time.monotonic()
    assert chat(gw, key, "gpt-4o-mini")[0] == 200
    first_done = time.monotonic()
    assert chat(gw, key, "gpt-4o-mini")[0] == 200
    before = time.monotonic()
    status, headers, body = chat(gw, key, "gpt-4o-mini")
    after = time.monotonic()

    assert status == 429
    err = openai_error(body, "rate_limit_exceeded")
    assert "2 requests per minute" in err["message"], err
    millis = retry_ms(headers)
    # the window frees when the first request is a minute old
    assert millis >= 60000 - (after - started) * 1000
    assert millis <= 60000 - (before - first_done) * 1000 + 1
    # a later refusal points at the same moment, so it waits no longer
    status, headers, _ = chat(gw, key, "gpt-4o-mini")
    assert status == 429
    assert retry_ms(headers) <= millis

    # the limit is the key's own: another key is not held back
    assert chat(gw, other, "gpt-4o-mini")[0] == 200
    assert len(upstream.requests) == 3

    rows = key_rows(gw, key, 4)
    assert [r["status"] for r in rows] == [200, 200, 429, 429]
    assert_refusal_row(rows[2], 429, "rate_limit_exceeded")
    assert_refusal_row(rows[3], 429, "rate_limit_exceeded")


def test_tpm_limit_counts_the_tokens_the_provider_reported(gw, upstream):
    # the fake reports 21 prompt + 9 completion = 30 tokens per request
    key = gw.create_key("tpm", "--tpm", "50")
    started = time.monotonic()

    assert chat(gw, key, "gpt-4o-mini")[0] == 200
    assert chat(gw, key, "gpt-4o-mini")[0] == 200   # 30 < 50 when admitted
    status, headers, body = chat(gw, key, "gpt-4o-mini")
    after = time.monotonic()

    assert status == 429
    err = openai_error(body, "rate_limit_exceeded")
    assert "50 tokens per minute" in err["message"], err
    millis = retry_ms(headers)
    # the first request's tokens leave the window a minute after it ended
    assert millis >= 60000 - (after - started) * 1000
    rows = key_rows(gw, key, 3)
    assert [r["input_tokens"] + r["output_tokens"] for r in rows[:2]] == \
        [30, 30]
    assert_refusal_row(rows[2], 429, "rate_limit_exceeded")


def test_rate_limit_on_messages_uses_the_anthropic_error_shape(gw, upstream):
    key = gw.create_key("rpm-anthropic", "--rpm", "1")

    assert messages(gw, key, "claude-3-5-haiku-latest")[0] == 200
    status, headers, body = messages(gw, key, "claude-3-5-haiku-latest")

    assert status == 429
    err = anthropic_error(body, "rate_limit_error", "rate_limit_exceeded")
    assert "1 requests per minute" in err["message"] or \
        "1 request per minute" in err["message"], err
    retry_ms(headers)


# ---------------------------------------------------------------------------
# model allow-lists
# ---------------------------------------------------------------------------

def test_model_allow_list_refuses_other_models_with_403(gw, upstream):
    key = gw.create_key("allow", "--models", "gpt-4o*,claude-*")

    assert chat(gw, key, "gpt-4o-mini")[0] == 200
    assert chat(gw, key, "gpt-4o")[0] == 200
    assert messages(gw, key, "claude-3-5-haiku-latest")[0] == 200

    status, headers, body = chat(gw, key, "gpt-3.5-turbo")
    assert status == 403
    assert headers.get("x-should-retry") == "false"
    err = openai_error(body, "model_not_allowed")
    assert "gpt-3.5-turbo" in err["message"]
    assert "gpt-4o*" in err["message"] and "claude-*" in err["message"]

    # a glob matches the whole name, not a part of it
    status, _, body = chat(gw, key, "my-gpt-4o")
    assert status == 403
    openai_error(body, "model_not_allowed")

    status, headers, body = messages(gw, key, "test-model")
    assert status == 403
    assert headers.get("x-should-retry") == "false"
    anthropic_error(body, "permission_error", "model_not_allowed")

    status, _, body = gw.request("POST", "/v1/embeddings",
                                 {"model": "text-embedding-3-small",
                                  "input": "hi"}, key=key)
    assert status == 403
    openai_error(body, "model_not_allowed")

    # the /{provider}/v1/... routes answer in their provider's format
    status, _, body = gw.request("POST", "/anthropic/v1/messages",
                                 {"model": "test-model", "max_tokens": 16,
                                  "messages": [{"role": "user",
                                                "content": "hi"}]}, key=key)
    assert status == 403
    anthropic_error(body, "permission_error", "model_not_allowed")
    status, _, body = gw.request("POST", "/openai/v1/chat/completions",
                                 {"model": "gpt-3.5-turbo",
                                  "messages": [{"role": "user",
                                                "content": "hi"}]}, key=key)
    assert status == 403
    openai_error(body, "model_not_allowed")

    # no refused request reached the provider
    assert len(upstream.requests) == 3
    rows = key_rows(gw, key, 9)
    assert [r["status"] for r in rows] == [200, 200, 200] + [403] * 6
    for row in rows[3:]:
        assert_refusal_row(row, 403, "model_not_allowed")
    assert rows[3]["model"] == "gpt-3.5-turbo"


def test_models_list_shows_only_the_models_a_key_may_use(gw, upstream):
    restricted = gw.create_key("allow-list", "--models", "gpt-4o*,claude-*")
    free = gw.create_key("allow-list")

    status, _, body = gw.request("GET", "/v1/models", key=restricted)
    assert status == 200
    listing = json.loads(body)
    assert listing["object"] == "list"
    ids = [m["id"] for m in listing["data"]]
    assert all(m["object"] == "model" for m in listing["data"])
    assert "gpt-4o" in ids and "gpt-4o-mini" in ids
    assert any(i.startswith("claude-") for i in ids)
    assert all(fnmatch.fnmatchcase(i, "gpt-4o*") or
               fnmatch.fnmatchcase(i, "claude-*") for i in ids), ids

    status, _, body = gw.request("GET", "/v1/models", key=free)
    assert status == 200
    all_ids = [m["id"] for m in json.loads(body)["data"]]
    # the unrestricted key sees more, e.g. the configured test prices
    assert set(ids) < set(all_ids)
    assert "test-model" in all_ids and "test-model" not in ids


# ---------------------------------------------------------------------------
# expiry and revocation
# ---------------------------------------------------------------------------

def test_key_created_with_an_expiry_in_the_past_is_refused_as_expired(
        gw, upstream):
    status, _, body = gw.admin("POST", "/admin/virtual-keys",
                               {"project": "expired",
                                "expires_at": "2000-01-01T00:00:00Z"})
    assert status == 201, body
    key = json.loads(body)

    status, headers, body = chat(gw, key, "gpt-4o-mini")
    assert status == 401
    assert headers.get("x-should-retry") == "false"
    err = openai_error(body, "key_expired")
    assert "2000-01-01" in err["message"]

    status, headers, body = messages(gw, key, "claude-3-5-haiku-latest")
    assert status == 401
    assert headers.get("x-should-retry") == "false"
    anthropic_error(body, "authentication_error", "key_expired")

    assert upstream.requests == []
    rows = key_rows(gw, key, 2)
    assert len(rows) == 2
    for row in rows:
        assert_refusal_row(row, 401, "key_expired")


def test_expiry_set_with_keys_update_reaches_a_running_gateway(gw, upstream):
    key = gw.create_key("expire-later", "--expires", "30d")
    assert chat(gw, key, "gpt-4o-mini")[0] == 200

    code, _, err = gw.cli("keys", "update", key["id"],
                          "--expires", "2000-01-01")
    assert code == 0, err
    status, headers, body = poll(lambda: chat(gw, key, "gpt-4o-mini"),
                                 lambda r: r[0] != 200)

    assert status == 401
    openai_error(body, "key_expired")
    rows = key_rows(gw, key, 0)
    assert_refusal_row(rows[-1], 401, "key_expired")


def test_revoked_key_is_refused_as_revoked_and_the_refusal_recorded(
        gw, upstream):
    key = gw.create_key("revoke-me")
    assert chat(gw, key, "gpt-4o-mini")[0] == 200

    code, _, err = gw.cli("keys", "revoke", key["id"])
    assert code == 0, err
    status, headers, body = poll(lambda: chat(gw, key, "gpt-4o-mini"),
                                 lambda r: r[0] != 200)

    assert status == 401
    assert headers.get("x-should-retry") == "false"
    openai_error(body, "key_revoked")
    status, _, body = messages(gw, key, "claude-3-5-haiku-latest")
    assert status == 401
    anthropic_error(body, "authentication_error", "key_revoked")
    rows = key_rows(gw, key, 0)
    assert_refusal_row(rows[-1], 401, "key_revoked")
    assert_refusal_row(rows[-2], 401, "key_revoked")


# ---------------------------------------------------------------------------
# refusals in statistics
# ---------------------------------------------------------------------------

def test_refusals_are_counted_as_errors_in_stats_by_key(gw, upstream):
    key = gw.create_key("stats-refusals", "--models", "gpt-4o*",
                        "--rpm", "1")
    assert chat(gw, key, "gpt-4o-mini")[0] == 200
    assert chat(gw, key, "gpt-3.5-turbo")[0] == 403
    assert chat(gw, key, "gpt-4o-mini")[0] == 429

    code, out, err = gw.cli("stats", "--by", "key", "--key", key["id"],
                            "--output", "json")
    assert code == 0, err
    report = json.loads(out)
    assert len(report["data"]) == 1, report
    entry = report["data"][0]
    assert entry["key"] == key["id"]
    assert entry["requests"] == 3
    assert entry["errors"] == 2
    assert entry["input_tokens"] == 21 and entry["output_tokens"] == 9
    kinds = sorted(r["error"] for r in key_rows(gw, key, 0) if r["error"])
    assert kinds == ["model_not_allowed", "rate_limit_exceeded"]


# ---------------------------------------------------------------------------
# changing limits while the gateway runs
# ---------------------------------------------------------------------------

def test_rpm_raised_with_keys_update_applies_to_a_running_gateway(
        gw, upstream):
    key = gw.create_key("raise-rpm", "--rpm", "1")
    assert chat(gw, key, "gpt-4o-mini")[0] == 200
    assert chat(gw, key, "gpt-4o-mini")[0] == 429

    code, out, err = gw.cli("keys", "update", key["id"], "--rpm", "100",
                            "--output", "json")
    assert code == 0, err
    status = poll(lambda: chat(gw, key, "gpt-4o-mini"),
                  lambda r: r[0] == 200)[0]
    assert status == 200
    assert show_key(gw, key)["rpm"] == 100


def test_budget_lowered_with_keys_update_applies_to_a_running_gateway(
        gw, upstream):
    dollar_requests(upstream)
    key = gw.create_key("lower-budget", "--budget", "10",
                        "--budget-period", "day")
    for _ in range(2):
        assert chat(gw, key)[0] == 200

    code, _, err = gw.cli("keys", "update", key["id"], "--budget", "2")
    assert code == 0, err
    status, _, body = poll(lambda: chat(gw, key), lambda r: r[0] != 200)

    assert status == 402
    err = openai_error(body, "budget_exceeded")
    assert "$2.00" in err["message"]


def test_budget_raised_with_admin_patch_applies_at_once(gw, upstream):
    dollar_requests(upstream)
    key = gw.create_key("patch-budget", "--budget", "1",
                        "--budget-period", "total")
    assert chat(gw, key)[0] == 200
    assert chat(gw, key)[0] == 402

    status, _, body = gw.admin("PATCH", "/admin/virtual-keys/" + key["id"],
                               {"budget_usd": 3})
    assert status == 200, body
    assert json.loads(body)["budget_usd"] == 3.0

    status = poll(lambda: chat(gw, key), lambda r: r[0] == 200)[0]
    assert status == 200
    assert chat(gw, key)[0] == 200
    assert chat(gw, key)[0] == 402


def test_allow_list_changed_with_admin_patch_applies_at_once(gw, upstream):
    key = gw.create_key("patch-models", "--models", "gpt-4o*")
    assert chat(gw, key, "gpt-4.1-mini")[0] == 403

    status, _, body = gw.admin("PATCH", "/admin/virtual-keys/" + key["id"],
                               {"models": ["gpt-4.1*"]})
    assert status == 200, body
    assert json.loads(body)["models"] == ["gpt-4.1*"]

    status = poll(lambda: chat(gw, key, "gpt-4.1-mini"),
                  lambda r: r[0] == 200)[0]
    assert status == 200
    assert chat(gw, key, "gpt-4o-mini")[0] == 403
