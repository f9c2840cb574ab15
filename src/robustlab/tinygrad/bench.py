"""Seconds per PGD-AT training step, tinygrad against robustlab's PyTorch path, per model and thread count.

    python -m robustlab.tinygrad.bench --models mlp cnn-small --threads 1 0 --iters 5

Each (backend, model, threads) runs in its own process, because tinygrad fixes its CPU thread
count when it compiles kernels and torch's thread pool is best set once. threads 0 means each
framework's default. The tinygrad figure is a step replayed by TinyJit; the first steps, which
lower, compile and capture the kernels, are reported apart as warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np


def _batch(batch_size: int):
    from robustlab.data import load_dataset
    train = load_dataset("fashion-mnist").train
    return train.images[:batch_size].float().div(255).numpy(), train.labels[:batch_size].numpy()


def _method(steps: int):
    from robustlab.training.methods import PGDAT
    return PGDAT(eps=0.1, norm="linf", steps=steps, step_size=0.025)


def time_tinygrad(model: str, batch_size: int, iters: int, steps: int, threads: int) -> dict:
    from robustlab.data import DATASETS
    from robustlab.tinygrad.backend import device, set_threads
    from robustlab.tinygrad.models import build_model
    from robustlab.tinygrad.trainer import TrainStep
    from robustlab.training import TrainConfig

    set_threads(threads or None)
    info = DATASETS["fashion-mnist"]
    step = TrainStep(build_model(model, info.input_shape, info.num_classes, info.mean, info.std),
                     _method(steps), TrainConfig(lr=0.01))
    x, y = _batch(batch_size)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(2):  # the first call compiles the step and captures it, the second replays it
        step(x, y, rng)
    warmup = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step(x, y, rng)
        times.append(time.perf_counter() - start)
    return {"backend": "tinygrad", "device": device(), "warmup_s": round(warmup, 2), "times": times}


def time_torch(model: str, batch_size: int, iters: int, steps: int, threads: int) -> dict:
    import torch
    from robustlab.data import DATASETS
    from robustlab.tinygrad.torch_twins import build_torch_model
    from robustlab.training.methods import StepContext
    from robustlab.training.trainer import TrainConfig, autocast_for, make_optimizer

    if threads:
        torch.set_num_threads(threads)
    info = DATASETS["fashion-mnist"]
    net = build_torch_model(model, info.input_shape, info.num_classes, info.mean, info.std)
    net = net.to(memory_format=torch.channels_last).train()  # as the Trainer runs it
    ctx = StepContext(net, net, make_optimizer(TrainConfig(lr=0.01), net.parameters()),
                      torch.Generator().manual_seed(0), autocast_for("fp32", torch.device("cpu")))
    x, y = _batch(batch_size)
    x, y = torch.from_numpy(x).contiguous(memory_format=torch.channels_last), torch.from_numpy(y)
    method = _method(steps)
    start = time.perf_counter()
    method.train_step(ctx, x, y)
    warmup = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        method.train_step(ctx, x, y)
        times.append(time.perf_counter() - start)
    return {"backend": "torch", "device": "cpu", "warmup_s": round(warmup, 2), "times": times,
            "torch_threads": torch.get_num_threads()}


def run_one(args) -> dict:
    timer = time_tinygrad if args.backend == "tinygrad" else time_torch
    threads = args.threads[0]
    result = timer(args.model, args.batch_size, args.iters, args.steps, threads)
    return {"model": args.model, "threads": threads or "default", "batch_size": args.batch_size,
            "attack_steps": args.steps, **result, "median_s": round(statistics.median(result["times"]), 4)}


def main(argv=None) -> int:
    from robustlab.cli import OneLineParser
    p = OneLineParser(prog="python -m robustlab.tinygrad.bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mlp", "cnn-small"])
    p.add_argument("--backends", nargs="+", default=["tinygrad", "torch"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 0], help="0: the framework's default")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="PGD steps per training step")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one configuration
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    rows = []
    print(f"| model | backend | threads | s / PGD-{args.steps} AT step (median) | warm-up s |\n|---|---|---|---|---|",
          flush=True)
    for model in args.models:
        for threads in args.threads:
            for backend in args.backends:
                cmd = [sys.executable, "-m", "robustlab.tinygrad.bench", "--one", "--backend", backend, "--model", model,
                       "--threads", str(threads), "--batch-size", str(args.batch_size), "--iters", str(args.iters),
                       "--steps", str(args.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"| {model} | {backend} | {threads or 'default'} | failed: {out.stderr.strip().splitlines()[-1:]} | |")
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"| {model} | {backend} ({row['device']}) | {row['threads']} | {row['median_s']:.3f} | {row['warmup_s']} |",
                      flush=True)
    if args.json:
        from robustlab import checkpoint  # here: each timed process imports only its own framework
        checkpoint.write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
