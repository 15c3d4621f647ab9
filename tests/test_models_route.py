"""GET /v1/models authenticates like the proxy routes."""


def test_an_address_spraying_unknown_keys_at_models_is_slowed_down(gateway):
    gw = gateway()
    key = gw.create_key("catalogue")
    statuses = [gw.request("GET", "/v1/models", key="sk-gw-guess%03d" % i)[0]
                for i in range(40)]
    assert statuses[0] == 401
    assert 429 in statuses
    # a valid key keeps working from the same address
    assert gw.request("GET", "/v1/models", key=key)[0] == 200


def test_listing_models_is_not_a_billable_request(gateway):
    gw = gateway()
    key = gw.create_key("catalogue")
    assert gw.request("GET", "/v1/models", key=key)[0] == 200
    assert gw.request("POST", "/v1/chat/completions", {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}]}, key=key)[0] == 200
    rows = gw.wait_rows(1)
    assert [r["route"] for r in rows] == ["/v1/chat/completions"]
