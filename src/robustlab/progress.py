"""Progress bars that also work in logs: live on a terminal, a line every 30 s when redirected."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, *, show: bool | None = None, **kwargs):
    """tqdm over `iterable`; `show=False` hides it, None shows it (throttled when stderr is not a terminal)."""
    terminal = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if terminal else 30)
    return tqdm(iterable, disable=show is False, dynamic_ncols=terminal, **kwargs)
