"""The README documents every command, route and config field there is."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import llmgw  # noqa: E402

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def subcommands(parser, prefix=""):
    """Every command path of an argparse parser, e.g. 'keys create'."""
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):
            for name, sub in choices.items():
                path = (prefix + " " + name).strip()
                nested = list(subcommands(sub, path))
                if nested:
                    yield from nested
                else:
                    yield path


def test_every_command_is_in_the_readme():
    commands = list(subcommands(llmgw.build_parser()))
    assert "keys create" in commands and "systemd-unit" in commands
    missing = [c for c in commands if "`%s" % c not in README]
    assert missing == []


def test_every_admin_route_and_proxy_route_is_in_the_readme():
    routes = ["POST /admin/virtual-keys", "GET /admin/virtual-keys",
              "PATCH /admin/virtual-keys/{id}",
              "DELETE /admin/virtual-keys/{id}",
              "POST /admin/virtual-keys/{id}/rotate",
              "GET /admin/usage-stats", "GET /admin/usage", "GET /health",
              "GET /metrics", "POST /v1/messages", "GET /v1/models",
              "/{provider}/v1/..."]
    assert [r for r in routes if r not in README] == []


def test_every_limit_and_builtin_provider_is_in_the_readme():
    missing = [n for n in llmgw.DEFAULT_LIMITS if "`%s`" % n not in README]
    missing += [n for n in llmgw.BUILTIN_PROVIDERS
                if not re.search(r"^\| %s \|" % n, README, re.M)]
    assert missing == []


def test_quick_start_commands_are_the_ones_ci_runs():
    first_screen = README.split("## Contents")[0]
    assert "python3 llmgw.py serve" in first_screen
    assert "python3 -m pytest -q tests" in first_screen
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "python3 -m pytest -q tests\n" in ci


def test_every_command_has_help():
    for command in subcommands(llmgw.build_parser()):
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "llmgw.py")] +
            command.split() + ["--help"], capture_output=True, text=True,
            timeout=30)
        assert result.returncode == 0, command
        assert "usage:" in result.stdout and "example:" in result.stdout
