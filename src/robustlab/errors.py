"""The one exception type that the CLI turns into a one-line message and exit status 2."""


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
