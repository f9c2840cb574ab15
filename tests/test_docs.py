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


def documented_commands():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            match, first = COMMAND.match(lines[i]), i
            i += 1
            if not match:
                continue
            command = match.group(1)
            while command.rstrip().endswith("\\") and i < len(lines):  # continued on the next line
                command, i = command.rstrip()[:-1] + " " + lines[i].strip(), i + 1
            command = re.split(r"\s#", command)[0].strip()  # a trailing comment
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
