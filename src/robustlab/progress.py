"""Progress bars that also work in logs: live on a terminal, a line every 30 s when redirected."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, *, show: bool | None = None, **kwargs):
    """tqdm over `iterable`; `show=False` hides it, None shows it (throttled when stderr is not a terminal)."""
    terminal = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if terminal else 30)
    if not terminal:
        # tqdm's monitor thread redraws a bar idle for `maxinterval` with the count of its last line, which an
        # iterated bar only updates when it prints: in a log that showed a 20-second-old count beside a fresh clock.
        kwargs.setdefault("maxinterval", float("inf"))
    return tqdm(iterable, disable=show is False, dynamic_ncols=terminal, **kwargs)
