"""A valid key refused before routing still leaves its usage row."""

from conftest import key_rows, raw_exchange


def test_a_valid_key_on_an_unknown_provider_prefix_is_recorded(gateway):
    gw = gateway()
    key = gw.create_key("lost")
    status, _, _ = gw.request("POST", "/nosuch/v1/chat/completions",
                              {"model": "gpt-4o-mini", "messages": []},
                              key=key)
    assert status == 404
    rows = key_rows(gw, key)
    assert [(r["status"], r["error"], r["route"]) for r in rows] == [
        (404, "not_found", "/nosuch/v1/chat/completions")]


def test_a_valid_key_on_a_refused_path_is_recorded(gateway):
    gw = gateway()
    key = gw.create_key("lost")
    status, _, _ = raw_exchange(gw.port, (
        "GET /v1/../admin/usage HTTP/1.1\r\nHost: gw\r\n"
        "Authorization: Bearer %s\r\n\r\n" % key["secret"]).encode())
    assert status == 400
    rows = key_rows(gw, key)
    assert [(r["status"], r["error"]) for r in rows] == [
        (400, "invalid_request")]


def test_an_unknown_key_on_an_unknown_route_leaves_no_row(gateway):
    gw = gateway()
    status, _, _ = gw.request("GET", "/nowhere", key="sk-gw-unknown")
    assert status == 404
    assert gw.rows() == []
