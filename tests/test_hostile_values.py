"""Values SQLite cannot store never stop usage recording."""

from fakes import Reply

CHAT = "/v1/chat/completions"


def test_a_model_name_with_a_lone_surrogate_is_refused_and_recording_goes_on(
        gateway):
    gw = gateway()
    key = gw.create_key("hostile")
    raw = (b'{"model": "gpt-4o\\ud800", "messages": '
           b'[{"role": "user", "content": "hi"}]}')
    status, _, _ = gw.request("POST", CHAT, raw, key=key,
                              headers={"Content-Type": "application/json"})
    assert status == 400
    status, _, _ = gw.request("POST", CHAT, {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}]}, key=key)
    assert status == 200
    rows = gw.wait_rows(2)
    assert [r["status"] for r in rows] == [400, 200]


def test_an_absurd_token_count_from_the_provider_is_not_stored(
        gateway, upstream):
    gw = gateway()
    key = gw.create_key("hostile")
    upstream.queue(Reply(usage={"prompt_tokens": 2 ** 70,
                                "completion_tokens": 5}))
    status, _, _ = gw.request("POST", CHAT, {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}]}, key=key)
    assert status == 200
    status, _, _ = gw.request("POST", CHAT, {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}]}, key=key)
    assert status == 200
    rows = gw.wait_rows(2)
    assert rows[0]["input_tokens"] == 0
    assert rows[0]["output_tokens"] == 5
