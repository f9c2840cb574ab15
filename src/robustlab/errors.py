"""The one exception type that the CLI turns into a one-line message and exit status 2."""
from __future__ import annotations

import sys
from pathlib import Path


class RobustlabError(ValueError):
    """A user-facing error: bad input, missing files, a foreign checkpoint.

    The message is a single line that says what was wrong and what is allowed.
    """


def check_choice(kind: str, value: str, allowed) -> str:
    """Return `value` if it is one of `allowed`, else raise a one-line error listing them."""
    allowed = sorted(allowed)
    if value not in allowed:
        raise RobustlabError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")
    return value


def output_dir(path) -> Path:
    """Make the folder `path` now, so that an unusable --out fails in one line before the work, not after it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a file on the path, no permission
        raise RobustlabError(f"--out {path}: cannot make a folder there ({exc.strerror})") from None
    return path


def run_script(main) -> int:
    """Run an experiment script's `main()` the way the CLI runs a command: a RobustlabError becomes one
    line on stderr and exit status 2 instead of a traceback."""
    try:
        return main() or 0
    except RobustlabError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        return 2
