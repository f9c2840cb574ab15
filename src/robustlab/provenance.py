"""Where a result was measured: the machine and the robustlab commit, as the protocol asks every result to record
(checkpoints, evaluation reports, the result tables of scripts)."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch


def machine() -> str:
    """CPU model, core count, the GPUs torch sees and torch's version, as the protocol asks, e.g. "AMD EPYC 7B13,
    2 cores, torch 2.13.0+cpu" or "..., 16 cores, 1× NVIDIA H200, torch ..."."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:  # not Linux
        pass
    gpus = ""
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpus = "".join(f", {names.count(n)}× {n}" for n in dict.fromkeys(names))
    return f"{cpu}, {os.cpu_count()} cores{gpus}, torch {torch.__version__}"


def commit() -> str:
    """The short git commit of the robustlab source in use, "-dirty" added where the checkout's tracked files have
    uncommitted changes, or "unknown" where the source is not tracked by git (an installed copy inside another
    project's repository would otherwise have named that project's commit)."""
    here = Path(__file__)

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=here.parent)
    try:
        if git("ls-files", "--error-unmatch", here.name).returncode != 0:
            return "unknown"
        head = git("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = git("diff", "--quiet", "HEAD", "--").returncode == 1
    except OSError:  # no git
        return "unknown"
    return f"{head}-dirty" if head and dirty else head or "unknown"


@functools.cache
def record() -> dict:
    """{"machine": ..., "commit": ...}, read once per process (a checkpoint is written every epoch)."""
    return {"machine": machine(), "commit": commit()}
