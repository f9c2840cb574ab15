"""Images/s of a PGD-10 adversarial-training step and of AutoAttack-standard, for 1..N torchrun processes.

    python benchmarks/scaling.py --nproc 1 2                      # cnn-small, global batch 128, this machine
    python benchmarks/scaling.py --nproc 1 2 --model runs/fmnist-pgd-at --aa-n 100
    python benchmarks/scaling.py --nproc 1 --device cuda          # a GPU (AMP: --precision bf16)

Each setting is a fresh `torchrun --nproc_per_node P` job; every process gets cores/P torch threads. The
training step is the Trainer's own (DDP forward/backward, PGD against the plain module, global batch
split over the ranks). AutoAttack runs the ensemble's sharded path on the first `--aa-n` test images of a
trained run (`--model RUN`; without one, an untrained network, which every attack breaks at once, so
only the training figure is meaningful). Prints one table and writes `--json` if given.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import torch

from robustlab import checkpoint
from robustlab.cli import OneLineParser, nonnegative, positive


def worker(args) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from robustlab import distributed
    from robustlab.attacks.autoattack import autoattack_accuracy
    from robustlab.data import load_dataset
    from robustlab.models import build_model
    from robustlab.training.methods import PGDAT, StepContext
    from robustlab.training.run import load_model
    from robustlab.training.trainer import autocast_for

    device = distributed.init(args.device)
    data = load_dataset("fashion-mnist")
    info = data.info
    model = build_model("cnn-small", info.input_shape, info.num_classes, info.mean, info.std).to(
        device, memory_format=torch.channels_last)
    train_model = DistributedDataParallel(model) if distributed.active() else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctx = StepContext(train_model, model, optimizer, torch.Generator(device).manual_seed(distributed.rank()),
                      autocast_for(args.precision, device))
    method = PGDAT(steps=10, step_size=0.025)
    x = data.train.images[:args.batch_size].float().div(255).to(device, memory_format=torch.channels_last)
    y = data.train.labels[:args.batch_size].to(device)
    part = distributed.my_slice(args.batch_size)
    x, y = x[part], y[part]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        distributed.barrier()

    for _ in range(args.warmup):
        method.train_step(ctx, x, y)
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        method.train_step(ctx, x, y)
    sync()
    result = {"train_images_per_s": args.batch_size * args.iters / (time.perf_counter() - start)}

    if args.aa_n:
        net = (load_model(args.model) if args.model else model.eval()).to(device)
        sync()
        start = time.perf_counter()
        # The ensemble shards by batch: one batch per rank keeps every process busy.
        batch = -(-args.aa_n // distributed.world_size())
        aa = autoattack_accuracy(net, data.test, eps=0.1, n=args.aa_n, batch_size=batch, device=device, progress=False)
        sync()
        result.update(aa_images_per_s=args.aa_n / (time.perf_counter() - start), aa_accuracy=aa.robust_accuracy)
    if distributed.is_main():
        print("RESULT " + json.dumps(result), flush=True)
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args) -> dict:
    threads = max(1, (os.cpu_count() or 1) // nproc) if args.device == "cpu" else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, "--worker", "--batch-size", str(args.batch_size),
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--aa-n", str(args.aa_n), "--device", args.device,
           "--precision", args.precision, *(["--model", args.model] if args.model else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"scaling: the {nproc}-process job failed:\n{done.stderr[-3000:]}")
    return {"nproc": nproc, "threads_per_process": threads, **json.loads(lines[-1][len("RESULT "):])}


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=positive(int), nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=positive(int), default=128, help="global batch, split over the processes")
    p.add_argument("--iters", type=positive(int), default=20)
    p.add_argument("--warmup", type=nonnegative(int), default=3)
    p.add_argument("--aa-n", type=nonnegative(int), default=0, help="AutoAttack-standard on the first N test images (0: skip)")
    p.add_argument("--model", help="a trained run for the AutoAttack figure")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    rows = [launch(n, args) for n in args.nproc]
    base = rows[0]
    print("| processes | threads each | PGD-10 AT step, images/s | × | " +
          ("AutoAttack-standard, images/s | × |" if args.aa_n else ""))
    print("|---|---|---|---|" + ("---|---|" if args.aa_n else ""))
    for r in rows:
        line = (f"| {r['nproc']} | {r['threads_per_process']} | {r['train_images_per_s']:.0f} | "
                f"{r['train_images_per_s'] / base['train_images_per_s']:.2f} |")
        if args.aa_n:
            line += f" {r['aa_images_per_s']:.3f} | {r['aa_images_per_s'] / base['aa_images_per_s']:.2f} |"
        print(line)
    if args.json:
        checkpoint.write_json(args.json, {"rows": rows, "args": vars(args)})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
