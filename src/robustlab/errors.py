"""The one exception type that the CLI turns into a one-line message and exit status 2."""
from __future__ import annotations

import numbers
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


def is_integer(value) -> bool:
    """An int or a numpy integer; not a bool, nor a float that equals an integer (3.0 == 3 is no count, no level)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer(name: str, value, minimum: int = 1, below: int | None = None):
    """`value` is an integer >= minimum (and < below)."""
    if not (is_integer(value) and value >= minimum and (below is None or value < below)):
        bound = f"from {minimum} to {below - 1}" if below is not None else f">= {minimum}"
        raise RobustlabError(f"{name} must be an integer {bound}, got {value!r}")


def check_at_most(flag: str, value, available: int, what: str, all_by_default: bool = True):
    """A count given with `flag` that is more than there is ("--n 100000" of 10,000 test images) is refused, not cut
    down to what there is without a word; `what` names what is counted. `all_by_default`: leaving the option out
    takes all of them (else its default is a number of its own)."""
    if value is not None and value > available == 0:  # "give at most 0" to an option that takes 1 or more
        raise RobustlabError(f"{flag} {value}: there are no {what.split(' (')[0]}; leave out {flag}")
    if value is not None and value > available:
        raise RobustlabError(f"{flag} {value} is more than the {available} {what}; give at most {available}"
                             + (f", or leave out {flag} for all of them" if all_by_default else ""))


def they_apply(names) -> str:
    """"--aa-n applies" or "--aa-n, --no-ood apply": the start of a message about options given where they do not
    apply."""
    return f"{', '.join(names)} appl{'ies' if len(names) == 1 else 'y'}"


def output_dir(path, flag: str = "--out") -> Path:
    """Make the folder `path` (given with `flag`) now, so that an unusable one fails in one line before the work,
    not after it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a file on the path, no permission
        raise RobustlabError(f"{flag} {path}: cannot make a folder there ({exc.strerror})") from None
    return path


def one_line(exc: RobustlabError) -> str:
    """The error's message; one raised in a DataLoader worker comes back wrapped in the worker's whole traceback
    ("Caught RobustlabError in DataLoader worker process 0. Original Traceback ..."), whose last line is it."""
    message = str(exc)
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith(f"{RobustlabError.__module__}.RobustlabError: ") else last


def run_script(main) -> int:
    """Run an experiment script's `main()` the way the CLI runs a command: a RobustlabError becomes one
    line on stderr and exit status 2 instead of a traceback."""
    try:
        return main() or 0
    except RobustlabError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {one_line(exc)}", file=sys.stderr)
        return 2
