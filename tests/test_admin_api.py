"""The admin API (/admin/...) and /metrics.

Most tests share one gateway (module scope); each makes its own keys, under
its own project name, so listings and statistics can be told apart.
"""

import datetime as dt
import json
import re

import pytest

from conftest import chat, insert_usage_rows, module_gateway, openai_error


PRICES = {"test-model": {"input": 1000000, "output": 0}}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gw(upstream_server, tmp_path_factory):
    """One gateway for the module; "test-model" costs $1 per input token."""
    with module_gateway(upstream_server, tmp_path_factory, "admin",
                        {"prices": PRICES}) as gateway:
        yield gateway


def admin_json(gw, method, path, body=None):
    """Call the admin API; return (status, headers, parsed JSON)."""
    status, headers, content = gw.admin(method, path, body)
    return status, headers, json.loads(content.decode("utf-8"))


def create(gw, **fields):
    """POST /admin/virtual-keys; assert 201 and return the key."""
    status, _, key = admin_json(gw, "POST", "/admin/virtual-keys", fields)
    assert status == 201, key
    return key


def insert_usage(db_path, key, when, cost, model="test-model", count=1):
    """Write usage rows for key straight into the database."""
    row = {"ts": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
           "request_id": "req_inserted", "key_id": key["id"],
           "project": key["project"], "provider": "openai", "model": model,
           "route": "/v1/chat/completions", "status": 200,
           "input_tokens": 1, "output_tokens": 0, "cost_usd": cost}
    insert_usage_rows(db_path, [row] * count)


def at(*fields):
    """A UTC datetime."""
    return dt.datetime(*fields, tzinfo=dt.timezone.utc)


def utc_midnight():
    return dt.datetime.now(dt.timezone.utc).replace(
        hour=0, minute=0, second=0, microsecond=0)


# ---------------------------------------------------------------------------
# authentication
# ---------------------------------------------------------------------------

def test_admin_api_needs_the_admin_key(gw, upstream):
    status, headers, body = gw.request("GET", "/admin/virtual-keys")
    assert status == 401
    openai_error(json.loads(body), "invalid_api_key")

    status, headers, body = gw.request(
        "GET", "/admin/virtual-keys",
        headers={"Authorization": "Bearer not-the-admin-key"})
    assert status == 401
    assert headers.get("x-should-retry") == "false"
    err = openai_error(json.loads(body), "invalid_api_key")
    assert "admin" in err["message"]

    # a virtual key is not an admin key
    key = create(gw, project="auth")
    status, _, body = gw.request("GET", "/admin/virtual-keys", key=key)
    assert status == 401

    status, _, body = gw.request(
        "GET", "/admin/virtual-keys",
        headers={"Authorization": "Bearer " + gw.admin_key})
    assert status == 200, body


def test_without_an_admin_key_configured_the_admin_api_says_how_to_set_one(
        gateway, upstream):
    gw = gateway(config={"admin_key": None})

    for method, path in (("GET", "/admin/virtual-keys"),
                         ("POST", "/admin/virtual-keys"),
                         ("GET", "/admin/usage"),
                         ("GET", "/metrics")):
        status, headers, body = gw.request(
            method, path, {"project": "x"} if method == "POST" else None,
            headers={"Authorization": "Bearer anything"})
        assert status == 403, (path, body)
        err = openai_error(json.loads(body), "forbidden")
        assert "admin_key" in err["message"] or "init" in err["message"], \
            err
        assert headers.get("x-should-retry") == "false"


def test_unknown_admin_route_is_404(gw, upstream):
    status, _, obj = admin_json(gw, "GET", "/admin/nothing-here")
    assert status == 404
    openai_error(obj, "not_found")


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------

def test_create_returns_201_with_the_secret_once_and_the_key_works(
        gw, upstream):
    key = create(gw, project="create", name="ci", budget_usd=12.5,
                 budget_period="week", rpm=60, tpm=50000,
                 models=["gpt-4o*", "claude-*"],
                 expires_at="2099-01-01T00:00:00Z")

    assert re.fullmatch(r"key_[0-9a-f]{8}", key["id"]), key
    assert re.fullmatch(r"sk-gw-[A-Za-z0-9_-]{32,}", key["secret"]), key
    assert key["project"] == "create" and key["name"] == "ci"
    assert key["budget_usd"] == 12.5 and key["budget_period"] == "week"
    assert key["rpm"] == 60 and key["tpm"] == 50000
    assert key["models"] == ["gpt-4o*", "claude-*"]
    assert key["expires_at"].startswith("2099-01-01T00:00:00")
    assert key["revoked_at"] is None
    assert "secret_hash" not in key

    assert chat(gw, key)[0] == 200

    # the secret is never shown again
    status, _, shown = admin_json(gw, "GET",
                                  "/admin/virtual-keys/" + key["id"])
    assert status == 200
    status, _, listed = admin_json(gw, "GET",
                                   "/admin/virtual-keys?project=create")
    assert status == 200
    for text in (json.dumps(shown), json.dumps(listed)):
        assert key["secret"] not in text
        assert "secret_hash" not in text
    assert shown["id"] == key["id"] and shown["rpm"] == 60


@pytest.mark.parametrize("body", [
    {},
    {"project": ""},
    {"project": 7},
    {"project": "bad", "budget_usd": "lots"},
    {"project": "bad", "budget_usd": -1},
    {"project": "bad", "budget_usd": 5, "budget_period": "year"},
    {"project": "bad", "rpm": 0},
    {"project": "bad", "rpm": -5},
    {"project": "bad", "tpm": 1.5},
    {"project": "bad", "models": [1, 2]},
    {"project": "bad", "expires_at": "next tuesday"},
    {"project": "bad", "colour": "blue"},
    ["project", "bad"],
], ids=["empty", "blank-project", "number-project", "budget-text",
        "budget-negative", "period-unknown", "rpm-zero", "rpm-negative",
        "tpm-fraction", "models-numbers", "expires-garbage",
        "unknown-field", "not-an-object"])
def test_create_refuses_invalid_fields_with_400(gw, upstream, body):
    status, _, obj = admin_json(gw, "POST", "/admin/virtual-keys", body)
    assert status == 400, obj
    openai_error(obj, "invalid_request")


def test_create_refuses_a_body_that_is_not_json(gw, upstream):
    status, _, content = gw.request(
        "POST", "/admin/virtual-keys", "{not json",
        headers={"Authorization": "Bearer " + gw.admin_key,
                 "Content-Type": "application/json"})
    assert status == 400
    openai_error(json.loads(content), "invalid_request")


def test_list_filters_by_project_and_hides_revoked_keys_unless_asked(
        gw, upstream):
    first = create(gw, project="listing")
    second = create(gw, project="listing", name="second")
    create(gw, project="listing-other")
    expired = create(gw, project="listing", expires_at="2000-01-01")
    status, _, _ = admin_json(gw, "DELETE",
                              "/admin/virtual-keys/" + second["id"])
    assert status == 200

    status, _, obj = admin_json(gw, "GET",
                                "/admin/virtual-keys?project=listing")
    assert status == 200
    assert obj["object"] == "list"
    assert [k["id"] for k in obj["data"]] == [first["id"]]
    assert "spend_period_usd" in obj["data"][0]
    assert obj["data"][0]["spend_total_usd"] == 0

    status, _, obj = admin_json(gw, "GET",
                                "/admin/virtual-keys?project=listing&all=1")
    assert status == 200
    assert sorted(k["id"] for k in obj["data"]) == sorted(
        [first["id"], second["id"], expired["id"]])
    revoked = [k for k in obj["data"] if k["id"] == second["id"]][0]
    assert revoked["revoked_at"] is not None

    status, _, obj = admin_json(gw, "GET", "/admin/virtual-keys")
    assert status == 200
    ids = [k["id"] for k in obj["data"]]
    assert first["id"] in ids and second["id"] not in ids
    assert all("secret" not in k for k in obj["data"])


def test_show_reports_spend_this_period_and_in_total(gw, upstream):
    upstream.usage.update(prompt_tokens=1, completion_tokens=0)
    key = create(gw, project="spend", budget_usd=10, budget_period="day")
    # $5 two days ago, and two $1 requests now
    insert_usage(gw.db_path, key, utc_midnight() - dt.timedelta(days=2), 5.0)
    for _ in range(2):
        assert chat(gw, key, "test-model")[0] == 200

    status, _, shown = admin_json(gw, "GET",
                                  "/admin/virtual-keys/" + key["id"])
    assert status == 200
    assert shown["budget_usd"] == 10.0 and shown["budget_period"] == "day"
    assert shown["spend_period_usd"] == pytest.approx(2.0)
    assert shown["spend_total_usd"] == pytest.approx(7.0)
    assert shown["budget_remaining_usd"] == pytest.approx(8.0)

    status, _, listed = admin_json(gw, "GET",
                                   "/admin/virtual-keys?project=spend")
    assert listed["data"][0]["spend_period_usd"] == pytest.approx(2.0)
    assert listed["data"][0]["spend_total_usd"] == pytest.approx(7.0)


def test_patch_changes_limits_and_name_and_keeps_the_rest(gw, upstream):
    key = create(gw, project="patch", name="old", rpm=5, tpm=1000,
                 models=["gpt-4o*"])

    status, _, changed = admin_json(gw, "PATCH",
                                    "/admin/virtual-keys/" + key["id"],
                                    {"name": "new", "rpm": 50,
                                     "budget_usd": 3.5,
                                     "budget_period": "month"})
    assert status == 200, changed
    assert changed["name"] == "new" and changed["rpm"] == 50
    assert changed["budget_usd"] == 3.5
    assert changed["budget_period"] == "month"
    assert changed["tpm"] == 1000 and changed["models"] == ["gpt-4o*"]
    assert "secret" not in changed

    # null clears a limit
    status, _, changed = admin_json(gw, "PATCH",
                                    "/admin/virtual-keys/" + key["id"],
                                    {"tpm": None})
    assert status == 200
    assert changed["tpm"] is None and changed["rpm"] == 50

    status, _, shown = admin_json(gw, "GET",
                                  "/admin/virtual-keys/" + key["id"])
    assert (shown["name"], shown["rpm"], shown["tpm"]) == ("new", 50, None)
    # the CLI sees the same key
    code, out, err = gw.cli("keys", "show", key["id"], "--output", "json")
    assert code == 0, err
    assert json.loads(out)["name"] == "new"
    assert chat(gw, key)[0] == 200


def test_patch_refuses_invalid_limits_with_400_and_changes_nothing(
        gw, upstream):
    key = create(gw, project="patch-bad", rpm=5)
    for body in ({"rpm": "fast"}, {"budget_period": "fortnight"},
                 {"secret_hash": "0" * 64}, {"project": ""}):
        status, _, obj = admin_json(gw, "PATCH",
                                    "/admin/virtual-keys/" + key["id"],
                                    body)
        assert status == 400, (body, obj)
        openai_error(obj, "invalid_request")
    status, _, shown = admin_json(gw, "GET",
                                  "/admin/virtual-keys/" + key["id"])
    assert shown["rpm"] == 5 and shown["project"] == "patch-bad"
    assert chat(gw, key)[0] == 200


def test_delete_revokes_the_key_on_the_proxy(gw, upstream):
    key = create(gw, project="revoke")
    assert chat(gw, key)[0] == 200

    status, _, revoked = admin_json(gw, "DELETE",
                                    "/admin/virtual-keys/" + key["id"])
    assert status == 200
    assert revoked["id"] == key["id"] and revoked["revoked_at"]

    status, headers, body = chat(gw, key)
    assert status == 401
    assert headers.get("x-should-retry") == "false"
    openai_error(json.loads(body), "key_revoked")
    status, _, shown = admin_json(gw, "GET",
                                  "/admin/virtual-keys/" + key["id"])
    assert status == 200 and shown["revoked_at"] == revoked["revoked_at"]


def test_rotate_returns_a_new_secret_once_and_the_old_one_stops_working(
        gw, upstream):
    key = create(gw, project="rotate", rpm=77, models=["gpt-4o*"])
    assert chat(gw, key)[0] == 200

    status, _, rotated = admin_json(
        gw, "POST", "/admin/virtual-keys/%s/rotate" % key["id"])
    assert status == 200, rotated
    assert rotated["id"] == key["id"]
    assert re.fullmatch(r"sk-gw-[A-Za-z0-9_-]{32,}", rotated["secret"])
    assert rotated["secret"] != key["secret"]
    # limits and history stay with the id
    assert rotated["rpm"] == 77 and rotated["models"] == ["gpt-4o*"]

    status, _, body = chat(gw, key)
    assert status == 401
    openai_error(json.loads(body), "invalid_api_key")
    assert chat(gw, rotated["secret"])[0] == 200

    status, _, shown = admin_json(gw, "GET",
                                  "/admin/virtual-keys/" + key["id"])
    assert rotated["secret"] not in json.dumps(shown)
    rows = gw.rows("select * from usage where key_id = ? order by id",
                   (key["id"],))
    assert [r["status"] for r in rows] == [200, 200]


@pytest.mark.parametrize("method,suffix,body", [
    ("GET", "", None),
    ("PATCH", "", {"rpm": 5}),
    ("DELETE", "", None),
    ("POST", "/rotate", None),
], ids=["get", "patch", "delete", "rotate"])
def test_unknown_key_id_is_404(gw, upstream, method, suffix, body):
    status, _, obj = admin_json(gw, method,
                                "/admin/virtual-keys/key_00000000" + suffix,
                                body)
    assert status == 404
    err = openai_error(obj, "not_found")
    assert "key_00000000" in err["message"]


# ---------------------------------------------------------------------------
# usage statistics and raw usage
# ---------------------------------------------------------------------------

def test_usage_stats_match_stats_output_json(gw, upstream):
    a = create(gw, project="stats-a")
    b = create(gw, project="stats-b")
    for key, model in ((a, "gpt-4o-mini"), (a, "gpt-4o"), (b, "gpt-4o")):
        assert chat(gw, key, model)[0] == 200
    insert_usage(gw.db_path, a, at(2020, 3, 4, 12), 2.0, model="gpt-4o")

    queries = [
        ("by=key&project=stats-a", ["--by", "key", "--project", "stats-a"]),
        ("by=model&key=%s" % a["id"], ["--by", "model", "--key", a["id"]]),
        ("by=project&model=gpt-4o", ["--by", "project", "--model",
                                      "gpt-4o"]),
        ("by=day&project=stats-a&since=2020-03-04&until=2020-03-04",
         ["--by", "day", "--project", "stats-a", "--since", "2020-03-04",
          "--until", "2020-03-04"]),
        ("project=stats-b", ["--project", "stats-b"]),
    ]
    for query, flags in queries:
        status, _, api = admin_json(gw, "GET", "/admin/usage-stats?" + query)
        assert status == 200, (query, api)
        code, out, err = gw.cli("stats", *(flags + ["--output", "json"]))
        assert code == 0, err
        assert api == json.loads(out), query

    status, _, report = admin_json(gw, "GET",
                                   "/admin/usage-stats?by=model&key=" +
                                   a["id"])
    by_model = {row["model"]: row for row in report["data"]}
    assert by_model["gpt-4o"]["requests"] == 2
    assert by_model["gpt-4o-mini"]["requests"] == 1
    status, _, report = admin_json(
        gw, "GET", "/admin/usage-stats?by=day&project=stats-a"
        "&since=2020-03-04&until=2020-03-04")
    assert [row["day"] for row in report["data"]] == ["2020-03-04"]
    assert report["data"][0]["cost_usd"] == pytest.approx(2.0)


def test_usage_stats_refuse_an_unknown_grouping(gw, upstream):
    status, _, obj = admin_json(gw, "GET", "/admin/usage-stats?by=colour")
    assert status == 400
    openai_error(obj, "invalid_request")


def test_usage_pages_through_every_row_once_in_order(gw, upstream):
    key = create(gw, project="paging")
    insert_usage(gw.db_path, key, at(2021, 1, 1), 0.5, count=7)
    for _ in range(3):
        assert chat(gw, key)[0] == 200
    expected = [r["id"] for r in gw.rows("select id from usage order by id")]
    assert len(expected) >= 10

    seen, after, pages = [], 0, 0
    while pages < 100:
        status, _, page = admin_json(
            gw, "GET", "/admin/usage?limit=4&after_id=%d" % after)
        assert status == 200, page
        pages += 1
        assert len(page["data"]) <= 4
        seen += [row["id"] for row in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_after_id"]
    assert seen == expected
    # the rows carry the documented columns
    status, _, page = admin_json(gw, "GET", "/admin/usage?limit=1000")
    last = page["data"][-1]
    assert last["key_id"] == key["id"] and last["status"] == 200
    for column in ("ts", "project", "model", "input_tokens", "cost_usd",
                   "latency_ms", "error"):
        assert column in last


def test_usage_since_returns_only_rows_from_that_time_on(gw, upstream):
    key = create(gw, project="since")
    insert_usage(gw.db_path, key, at(2019, 6, 1), 1.0, count=2)
    insert_usage(gw.db_path, key, at(2019, 6, 3), 1.0, count=3)

    status, _, page = admin_json(
        gw, "GET", "/admin/usage?since=2019-06-02&limit=1000")
    assert status == 200
    mine = [r for r in page["data"] if r["key_id"] == key["id"]]
    assert len(mine) == 3
    assert all(r["ts"] >= "2019-06-02" for r in page["data"])


def test_usage_refuses_a_bad_limit_or_since(gw, upstream):
    for query in ("limit=zero", "limit=-1", "since=yesterday-ish",
                  "after_id=abc"):
        status, _, obj = admin_json(gw, "GET", "/admin/usage?" + query)
        assert status == 400, (query, obj)
        openai_error(obj, "invalid_request")


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------

def test_metrics_need_the_admin_key_and_count_proxied_requests(gw, upstream):
    key = create(gw, project="metrics-project")
    assert chat(gw, key)[0] == 200

    status, _, body = gw.request("GET", "/metrics")
    assert status == 401
    openai_error(json.loads(body), "invalid_api_key")
    status, _, body = gw.request("GET", "/metrics", key=key)
    assert status == 401

    status, headers, body = gw.admin("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode("utf-8")
    assert "# TYPE llmgw_requests_total counter" in text
    samples = [line for line in text.splitlines()
               if line.startswith("llmgw_requests_total{")
               and 'project="metrics-project"' in line]
    assert len(samples) == 1, text
    assert 'status="200"' in samples[0]
    assert samples[0].rsplit(" ", 1)[1] == "1"
    # every sample line is "name{labels} value" or "name value"
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z_]+(\{[^}]*\})? -?[0-9.e+Inf-]+",
                                line), line
