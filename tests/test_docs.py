"""The commands the README and docs/ tell users to run still parse: an option renamed or removed in the code fails
here, not in a user's terminal. Commands with shell variables or elisions are skipped."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from robustlab.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"^\s*(robustlab (?:train|eval|rift|mrc|demo|summary|compare)\b.*)")


def documented_commands(pattern=COMMAND, ends=r"\s#"):
    """(file:line, command) for each line of README and docs/ that `pattern` matches, continued over backslashed
    lines and cut at `ends` (a trailing comment); commands with shell variables or elisions are skipped."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            match, first = pattern.match(lines[i]), i
            i += 1
            if not match:
                continue
            command = match.group(1)
            while command.rstrip().endswith("\\") and i < len(lines):  # continued on the next line
                command, i = command.rstrip()[:-1] + " " + lines[i].strip(), i + 1
            command = re.split(ends, command)[0].strip()
            if not re.search(r"[$|…]|\.\.\.", command):
                yield f"{path.relative_to(ROOT)}:{first + 1}", command


COMMANDS = list(documented_commands())


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 50  # 118 when written


@pytest.mark.parametrize("where, command", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, command):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as exit_:
        assert not exit_.code, f"{where}: {command}\n{stderr.getvalue()}"


SCRIPT = re.compile(r"^\s*(?:python3? )((?:experiments|benchmarks)/\w+\.py\b.*)")
SCRIPT_COMMANDS = list(documented_commands(SCRIPT, r"\s#|;|&"))  # also "; wait", a background "&"


class _Parsed(Exception):
    """Raised once a script's options have parsed: nothing of the script runs."""


def test_the_docs_have_script_commands_to_check():
    assert len(SCRIPT_COMMANDS) > 30  # 61 when written


@pytest.mark.parametrize("where, command", SCRIPT_COMMANDS, ids=[where for where, _ in SCRIPT_COMMANDS])
def test_documented_script_command_parses(where, command, monkeypatch):
    import argparse
    import importlib.util
    import sys

    argv = shlex.split(command)
    spec = importlib.util.spec_from_file_location(Path(argv[0]).stem, ROOT / argv[0])
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    parse = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", argv)
    main = getattr(script, "main", None) or sys.modules["robustlab.bench"].main  # benchmarks/bench.py re-exports
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises((_Parsed, SystemExit)) as outcome:
        main()
    assert outcome.type is _Parsed, f"{where}: {command}\n{stderr.getvalue()}"
