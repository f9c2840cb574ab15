"""Progress bars in logs (stderr not a terminal): a line every `mininterval`, with the count of that moment."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_a_bar_that_slows_down_keeps_printing_fresh_counts():
    """Fast steps, then slow ones. With tqdm's adaptive miniters the bar either waited as many slow steps as it had
    seen fast ones before printing again (silent for minutes at the 30 s interval), or its monitor thread redrew
    it with the count of the previous line."""
    code = ("import time\nfrom robustlab.progress import progress\n"
            "for i in progress(range(2020), mininterval=0.3):\n"
            "    time.sleep(0.0005 if i < 2000 else 0.1)\n")
    env = {**os.environ, "PYTHONPATH": SRC}
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stderr
    counts = [int(m) for m in re.findall(r"\| *(\d+)/2020 ", err.replace("\r", "\n"))]
    slow = [c for c in counts if 2000 < c < 2020]
    assert len(slow) >= 3, err  # the 2 s of slow steps print about every 0.3 s
    assert counts == sorted(counts)


def test_nested_bars_in_a_log_move_no_cursor():
    """RiFT's α search and AutoAttack's stages run bars inside bars; in a log file each one wrote ESC[A codes."""
    code = ("from robustlab.progress import progress\n"
            "for i in progress(range(2), desc='outer', mininterval=0):\n"
            "    for j in progress(range(3), desc='inner', leave=False, mininterval=0):\n"
            "        pass\n")
    env = {**os.environ, "PYTHONPATH": SRC}
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stderr
    assert "inner:" in err and "outer: 100%" in err and "\x1b" not in err, repr(err)


def test_a_bar_in_a_log_is_due_every_30_seconds_and_hidden_only_when_asked_or_off_rank_0(monkeypatch):
    """The docstring's contract: shown by default (show=None), throttled to a line every 30 s when stderr is no
    terminal, hidden by show=False and on the ranks other than 0 under torchrun."""
    import io

    from robustlab import distributed
    from robustlab.progress import progress
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file
    bar = progress(range(3))
    assert (bar.mininterval, bar.disable) == (30, False)
    bar.close()
    assert progress(range(3), show=False).disable
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert progress(range(3)).disable
