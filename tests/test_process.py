"""The serve process: run as a script, it starts its interpreter again.

CPython keeps the syntax tree of the script it runs until the script
returns. `serve` therefore execs the same interpreter, with the same options
and in the same process, on llmgw.py's compiled code. These tests check what
an operator sees: the PID, the command line, the answers, the exit status and
the memory. They only signal processes they started, by PID.
"""

import http.client
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import LLMGW, clean_env

pytestmark = pytest.mark.skipif(
    not (hasattr(os, "memfd_create") and os.path.exists("/proc/self/status")),
    reason="the interpreter is started again only on Linux")

LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


class Serve(object):
    """`python [options] SCRIPT --db DB serve`, its log kept in a file."""

    def __init__(self, tmp_path, python_options=(), script=LLMGW, command=None):
        self.log_path = tmp_path / "serve.log"
        self.tail = ["--db", str(tmp_path / "llmgw.db"), "serve",
                     "--host", "127.0.0.1", "--port", "0"]
        cmd = command or [sys.executable] + list(python_options) + [script]
        self.log = open(str(self.log_path), "wb")
        self.proc = subprocess.Popen(
            cmd + self.tail, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, env=clean_env(), cwd=str(tmp_path))
        self.port = None
        deadline = time.monotonic() + 10
        while self.port is None and time.monotonic() < deadline:
            found = LISTENING.search(self.text())
            if found:
                self.port = int(found.group(1))
            elif self.proc.poll() is not None:
                break
            else:
                time.sleep(0.02)
        if self.port is None:
            self.stop()
            raise AssertionError("serve did not start:\n" + self.text())

    def text(self):
        return self.log_path.read_text(errors="replace")

    def health(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def status(self, field):
        """A /proc/PID/status field of the server, in kB."""
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError("no %s in /proc/PID/status" % field)

    def cmdline(self):
        with open("/proc/%d/cmdline" % self.proc.pid, "rb") as f:
            return [os.fsdecode(a) for a in f.read().split(b"\0")[:-1]]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


@pytest.mark.parametrize("options", [["-I", "-S"], ["-X", "dev", "-W", "error"]])
def test_serve_keeps_its_pid_options_and_arguments_and_stops_cleanly(
        tmp_path, options):
    server = Serve(tmp_path, options)
    try:
        cmdline = server.cmdline()
        # the same process, started again with the interpreter's own options
        assert cmdline[1:len(options) + 1] == options, cmdline
        assert cmdline[len(options) + 1] == "-c"
        # ps and pgrep -f still show the script and its arguments
        assert cmdline[-len(server.tail) - 1:] == [LLMGW] + server.tail
        assert server.health()[0] == 200
    finally:
        rc = server.stop()
    assert rc == 0
    log = server.text()
    assert "stopped" in log
    assert "Traceback" not in log
    assert "Warning" not in log  # -X dev and -W error: nothing left open


def test_serve_imports_from_its_own_folder_not_the_working_directory(
        tmp_path):
    # a script's folder leads sys.path, the working directory does not
    for name in ("json", "hmac", "sqlite3"):
        (tmp_path / (name + ".py")).write_text(
            'raise SystemExit("imported %s.py from the working directory")'
            % name)
    server = Serve(tmp_path)
    try:
        assert "-c" in server.cmdline()
        assert server.health()[0] == 200
    finally:
        rc = server.stop()
    assert rc == 0
    assert "working directory" not in server.text()


@pytest.mark.parametrize("runner", [["--"], ["-m", "cProfile", "-o", "prof"]])
def test_serve_run_by_a_profiler_or_after_double_dash_serves_in_place(
        tmp_path, runner):
    server = Serve(tmp_path, runner)
    try:
        assert server.cmdline()[1:len(runner) + 1] == runner
        assert server.health()[0] == 200
    finally:
        rc = server.stop()
    assert rc == 0
    assert "stopped" in server.text()


def test_serve_run_another_way_serves_in_its_own_interpreter(tmp_path):
    # started with -c, there is no script syntax tree to drop: no new start
    code = ("import runpy, sys; sys.argv[0] = %r; "
            "runpy.run_path(%r, run_name='__main__')" % (LLMGW, LLMGW))
    server = Serve(tmp_path, command=[sys.executable, "-c", code])
    try:
        assert server.cmdline()[1:3] == ["-c", code]
        assert server.health()[0] == 200
    finally:
        rc = server.stop()
    assert rc == 0
    assert "stopped" in server.text()


def test_serve_does_not_keep_the_syntax_tree_of_llmgw_py(tmp_path):
    # The same file with the hand-over switched off is the comparison: it
    # keeps the tree of the whole file, about 10 MB since CPython 3.9's
    # parser and about 1.3 MB with 3.8's.
    source = open(LLMGW).read()
    kept = source.replace('globals().get("HANDED_OVER")', "True", 1)
    assert kept != source
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    copy = tmp_path / "b" / "llmgw.py"
    copy.write_text(kept)
    lean = Serve(tmp_path / "a")
    try:
        heavy = Serve(tmp_path / "b", script=str(copy))
        try:
            assert "-c" not in heavy.cmdline()
            assert lean.health()[0] == heavy.health()[0] == 200
            saved = heavy.status("RssAnon") - lean.status("RssAnon")
        finally:
            heavy.stop()
    finally:
        lean.stop()
    expected = 4096 if sys.version_info >= (3, 9) else 512
    assert saved >= expected, "only %d kB less memory" % saved
