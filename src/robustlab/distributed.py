"""PyTorch's own distributed engine, as robustlab uses it: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK,
`init()` joins the process group (gloo on CPU, NCCL on CUDA), and everything else asks `rank()` and
`world_size()`, which are 0 and 1 when no group exists, so single-process code needs no special case.

Work is split by whole batches: rank r takes batches r, r + W, r + 2W, … of the global order. A batch is
seeded from its global index, so a sharded run computes exactly what one process computes.
"""
from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist

from robustlab.errors import RobustlabError, check_choice


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str = "cpu") -> torch.device:
    """Join the process group torchrun set up (no-op without torchrun); returns this rank's device."""
    dev = resolve_device(device)
    if not launched_by_torchrun() or dist.is_initialized():
        return dev
    backend = "nccl" if dev.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    except (RuntimeError, ValueError) as exc:
        raise RobustlabError(f"could not join the torchrun process group ({backend}): {str(exc).splitlines()[0]}") from None
    # A group still alive when the interpreter exits is torn down with its gloo threads running, and a rank can
    # die in "terminate called without an active exception" (SIGABRT) after its work is done, which fails the
    # whole torchrun job: seen under load with the Python API, which, unlike the CLI, may never call shutdown().
    atexit.register(shutdown)
    return dev


def resolve_device(device: str) -> torch.device:
    """The torch device that `--device` names (under torchrun: cuda is the GPU of this LOCAL_RANK)."""
    check_choice("device", str(device).split(":")[0], ("cpu", "cuda"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RobustlabError("--device cuda was asked for but torch sees no CUDA GPU")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        # fp32 means fp32: cuDNN would otherwise round convolution inputs to TF32 (10-bit mantissa), and robust
        # accuracy would depend on the GPU. Speed comes from --precision bf16, which says what it does.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return dev


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def planned_world_size() -> int:
    """The number of processes: the group's, or before `init` joins it, torchrun's WORLD_SIZE."""
    return world_size() if active() else int(os.environ.get("WORLD_SIZE", 1)) if launched_by_torchrun() else 1


def is_main() -> bool:
    """Rank 0, or a process outside torchrun; before `init` joins the group, torchrun's RANK says (a download's
    progress bar shows once)."""
    return rank() == 0 if active() else os.environ.get("RANK", "0") == "0"


def barrier():
    if active():
        dist.barrier()


def my_batches(num_batches: int) -> range:
    """The global batch indices this rank handles."""
    return range(rank(), num_batches, world_size())


def my_slice(n: int) -> slice:
    """This rank's contiguous part of a global batch of n examples (sizes differ by at most one)."""
    w, r = world_size(), rank()
    return slice(r * n // w, (r + 1) * n // w)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not active():
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":  # NCCL reduces GPU tensors only
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=op)
        return t.copy_(on_gpu)
    dist.all_reduce(t, op=op)
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (in place, also returned), whichever device `t` is on."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def broadcast_buffers(*modules):
    """Rank 0's buffers (BatchNorm statistics) on every rank, for each module given (None is skipped)."""
    if not active():
        return
    for module in modules:
        for b in (module.buffers() if module is not None else ()):
            dist.broadcast(b, src=0)


class BatchShare:
    """This rank's weight in the mean gradient of a global batch: n_rank · W / n. Shares differ by an image when
    W does not divide n, and a plain mean over ranks of per-rank means would count those images unequally."""

    def __init__(self):
        self.weight = 1.0

    def set(self, n_rank: int, n: int):
        self.weight = n_rank * world_size() / n


def weighted_mean_hook(share: BatchShare, bucket):
    """A DDP communication hook: every rank's gradients weighted by its share, so that DDP's result is the mean
    over the global batch's examples (DDP's own hook averages the ranks' means)."""
    buffer = bucket.buffer().mul_(share.weight / world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda done: done.value()[0])


def average_gradients(params, share: BatchShare | None = None):
    """Mean of .grad over the global batch, for gradients DDP does not see (a method's auxiliary model, e.g. AWP's
    proxy); `share` weights this rank's as weighted_mean_hook does."""
    if not active():
        return
    scale = (share.weight if share is not None else 1.0) / world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad.mul_(scale), op=dist.ReduceOp.SUM)
