"""Progress bars that also work in logs: live on a terminal, a line every 30 s when redirected."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

from robustlab import distributed


def progress(iterable=None, *, show: bool | None = None, **kwargs):
    """tqdm over `iterable`; `show=False` hides it, None shows it (throttled when stderr is not a terminal), on
    rank 0 alone under torchrun."""
    terminal = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if terminal else 30)
    if not terminal:
        # Every step checks the clock (miniters=1), so a line is due 30 s after the last whatever the pace. With
        # tqdm's adaptive miniters its monitor thread redraws instead, with the count of the last line (a bar
        # updates its count only when it prints): logs showed a 20-second-old count beside a fresh clock.
        kwargs.setdefault("miniters", 1)
        # One line for every bar: a nested bar moves the cursor up and down (ESC[A), which a log file keeps as noise.
        kwargs.setdefault("position", 0)
    return tqdm(iterable, disable=show is False or not distributed.is_main(), dynamic_ncols=terminal, **kwargs)
