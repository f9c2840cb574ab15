"""Where a result was measured: the machine and the robustlab commit, for the result tables of scripts."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def machine() -> str:
    """CPU model, core count and torch version, e.g. "AMD EPYC 7B13, 2 cores, torch 2.13.0+cpu"."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:  # not Linux
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def commit() -> str:
    """The short git commit of the robustlab source in use, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"
