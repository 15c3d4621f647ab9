"""Answers too large to hold are relayed in pieces and still accounted."""

import json

from fakes import Reply


def test_a_large_answer_is_relayed_whole_and_its_usage_read_from_the_tail(
        gateway, upstream):
    gw = gateway()
    key = gw.create_key("big")
    vector = [0.123456789] * 1024
    data = [{"object": "embedding", "index": i, "embedding": vector}
            for i in range(700)]  # about 9 MB: above the 8 MiB buffer
    answer = json.dumps({"object": "list", "data": data,
                         "model": "text-embedding-3-small",
                         "usage": {"prompt_tokens": 4321,
                                   "total_tokens": 4321}}).encode()
    assert len(answer) > 8 * 1024 * 1024
    upstream.queue(Reply(body=answer))
    status, _, body = gw.request("POST", "/v1/embeddings", {
        "model": "text-embedding-3-small", "input": ["x"] * 700}, key=key,
        timeout=60)
    assert status == 200
    assert body == answer
    rows = gw.wait_rows(1)
    assert rows[0]["input_tokens"] == 4321
    assert rows[0]["error"] is None
    assert rows[0]["cost_usd"] > 0
