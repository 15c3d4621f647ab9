"""A stream still running when the drain timeout ends is recorded, not lost."""

import signal
import sqlite3
import subprocess
import threading

from fakes import Reply

CHAT = "/v1/chat/completions"


def test_a_stream_cut_by_the_drain_timeout_still_leaves_its_row(
        gateway, upstream):
    gw = gateway(config={"limits": {"drain_timeout_s": 1}})
    key = gw.create_key("cut-by-shutdown")
    # the fake streams for ~10 s: longer than the 1 s drain allows
    upstream.queue(Reply(event_delay=1.0))
    result = {}

    def client():
        result["events"] = gw.stream(CHAT, {
            "model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "tell me a story"}]},
            key=key, timeout=30)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        assert upstream.wait_for_requests(1, timeout=5)
        gw.signal(signal.SIGTERM)
        code = gw.proc.wait(15)
    except subprocess.TimeoutExpired:
        raise AssertionError("the gateway did not exit after its drain "
                             "timeout") from None
    finally:
        thread.join(30)
    assert code == 0, gw.stderr_text()
    events = result["events"]
    assert events.status == 200
    assert "[DONE]" not in events.data()  # the client saw a cut stream

    db = sqlite3.connect(gw.db_path)
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("select * from usage")]
    db.close()
    assert len(rows) == 1
    assert rows[0]["error"] == "shutdown"
    assert rows[0]["streamed"] == 1
    assert rows[0]["estimated"] == 1
    assert rows[0]["input_tokens"] > 0
