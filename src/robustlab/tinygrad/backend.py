"""Import tinygrad once, on a device that works here, or fail with a one-line RobustlabError.

tinygrad picks its device at first use by probing GPU runtimes in turn. On a machine with no GPU
that probing is wasted work and its failures are noise, so when the user has not chosen a device
(the DEV environment variable, e.g. DEV=CPU, DEV=CUDA, DEV=CPU:LLVM) and no GPU device node exists,
we choose tinygrad's CPU device. That device compiles its kernels with clang (even its LLVM and X86
renderers use clang when the device starts), so clang must be on PATH: Debian's `clang` package.
"""
from __future__ import annotations

import os
import shutil
import sys

from robustlab.errors import RobustlabError

MISSING = "tinygrad is not installed; pip install 'robustlab[tinygrad]'"
GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dri/renderD128")


def gpu_present() -> bool:
    """A cheap look for a GPU: its device node on Linux, Metal on macOS."""
    return sys.platform == "darwin" or any(os.path.exists(p) for p in GPU_NODES)


def require():
    """The tinygrad module, with the device chosen; raises RobustlabError when it cannot work here."""
    if "DEV" not in os.environ and not gpu_present():
        os.environ["DEV"] = "CPU"  # read by tinygrad at import, and inherited by its compile workers
    try:
        import tinygrad
        from tinygrad.helpers import DEV
    except ImportError:
        raise RobustlabError(MISSING) from None
    if not DEV.device and not gpu_present():  # tinygrad was imported before us, without DEV
        DEV.value = "CPU"
    if DEV.device == "CPU" and shutil.which(os.environ.get("CC", "clang")) is None:
        raise RobustlabError("tinygrad's CPU device compiles kernels with clang, which is not on PATH; "
                             "apt-get install -y clang (or set DEV to a GPU device)")
    return tinygrad


def device() -> str:
    """The device tinygrad tensors are created on (e.g. 'CPU', 'CUDA')."""
    return require().Device.DEFAULT


def set_threads(threads: int | None) -> None:
    """CPU threads for kernels compiled from now on (tinygrad's NUM_CPU_THREADS); None leaves the default."""
    if threads:
        require()
        from tinygrad.helpers import NUM_CPU_THREADS
        NUM_CPU_THREADS.value = int(threads)


def capture_first_call(fn, state: list):
    """A TinyJit of `fn` that captures on its first call rather than its second.

    TinyJit runs the first call eagerly so that one-time work (a lazily initialized weight, say)
    is not captured and replayed; that costs a second lowering of every kernel, the larger part
    of tinygrad's warm-up (measured: 12 s instead of 30 s for the MLP's PGD-AT step). When all the
    state `fn` reads is realized first there is no one-time work, and the eager call can go.
    With no state to realize (a bare function, whose weights we cannot see), the usual TinyJit.
    """
    from tinygrad import Tensor, TinyJit

    jit = TinyJit(fn)
    if state and hasattr(jit, "cnt"):
        Tensor.realize(*state)
        jit.cnt = 1
    return jit
