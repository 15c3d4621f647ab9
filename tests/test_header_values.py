"""Header values reach a provider only when they are clean."""

import json

from conftest import raw_exchange, write_config


def test_a_header_value_with_a_control_character_is_refused(gateway,
                                                            upstream):
    gw = gateway()
    key = gw.create_key("strict")
    body = json.dumps({"model": "gpt-4o-mini",
                       "messages": [{"role": "user", "content": "hi"}]})
    request = ("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
               "Authorization: Bearer %s\r\nContent-Type: application/json"
               "\r\nX-Stainless-Lang: py\x00thon\r\nContent-Length: %d\r\n"
               "\r\n%s" % (key["secret"], len(body), body))
    status, _, answer = raw_exchange(gw.port, request.encode("latin-1"))
    assert status == 400
    assert json.loads(answer)["error"]["code"] == "invalid_request"
    assert upstream.requests == []


def test_a_provider_key_with_a_space_is_a_config_error(tmp_path, run_cli):
    path = str(tmp_path / "bad.json")
    write_config(path, {"providers": {"openai": {
        "api_keys": ["sk-abc def"]}}})
    rc, out, err = run_cli("--config", path, "config", "check")
    assert rc == 1
    assert "spaces or characters a header cannot carry" in err
    assert "sk-abc def" not in err + out
