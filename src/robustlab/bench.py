"""Throughput of robustlab against a textbook PyTorch loop, same model and batch.

The textbook loop is what most papers' code does: model in train mode, `loss.backward()` into both
parameters and input for every attack step, default memory format, fp32.

    robustlab bench --model cnn-small --batch-size 128   (or python benchmarks/bench.py)
"""
from __future__ import annotations

import json
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from robustlab.attacks import LinfBall, attack_mode, perturb
from robustlab.models import build_model
from robustlab.training.methods import PGDAT, Standard, StepContext
from robustlab.training.trainer import autocast_for, fast_bf16


def textbook_pgd(model, x, y, eps, alpha, steps):
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()  # also fills parameter .grad, as textbook loops do
        delta = (delta + alpha * delta.grad.sign()).clamp(-eps, eps)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    return x + delta


def textbook_at_step(model, opt, x, y, eps, alpha, steps):
    x_adv = textbook_pgd(model, x, y, eps, alpha, steps)
    opt.zero_grad()
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    opt.step()


def median_seconds(fns: dict, iters: int = 10, warmup: int = 2) -> dict:
    """Median seconds per call of each function, the functions taking turns one call each per round.

    On a shared or virtual machine, slow spells come and go; timing each function alone in a block lets
    one of them land in a spell and the next not (we saw 1.5× between two blocks of the same step).
    Interleaving spreads the spells over all functions alike, and the median drops the worst calls.
    """
    from robustlab.progress import progress
    seconds = {name: [] for name in fns}
    for round_ in progress(range(warmup + iters), desc=f"timing {len(fns)} steps", unit="round", leave=False):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def add_options(p) -> None:
    """The options of `robustlab bench` and `python benchmarks/bench.py`, one set for both."""
    import argparse

    from robustlab.cli import nonnegative, positive
    p.add_argument("--model", default="cnn-small", help="default cnn-small")
    p.add_argument("--batch-size", type=positive(int), default=128, help="default 128")
    p.add_argument("--iters", type=positive(int), default=10,
                   help="timed rounds of each measured step, after 2 warm-up rounds (default 10)")
    p.add_argument("--eps", type=nonnegative(float), default=0.1, help="L∞ radius of the PGD-10 steps (default 0.1)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="also time bf16 autocast (default: only where the CPU has bf16 units)")
    p.add_argument("--json", action="store_true", help="also print the images/s as JSON")
    p.add_argument("--threads", type=positive(int), help="torch CPU threads (default: torch's)")


def main(argv=None, prog: str | None = None) -> int:
    from robustlab.cli import OneLineParser
    p = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    add_options(p)
    run(p.parse_args(argv))
    return 0


def run(args) -> dict:
    """Times the steps and prints the table; returns images/s per loop and step."""
    from robustlab.protocol import check_eps
    check_eps(args.eps, "linf", "--eps")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (1, 28, 28)
    x = torch.rand(args.batch_size, *shape)
    y = torch.randint(0, 10, (args.batch_size,))
    eps, alpha, steps = args.eps, args.eps / 4, 10

    def fresh():
        return build_model(args.model, shape, 10, [0.286], [0.353])

    measures = ("clean_step", "pgd10_attack", "pgd10_at_step")
    loops = {}  # loop name → {measure: a call doing one step on the batch}

    # Textbook loop.
    model = fresh().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def clean_step(model=model, opt=opt):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    loops["textbook"] = dict(zip(measures, (clean_step, partial(textbook_pgd, model, x, y, eps, alpha, steps),
                                            partial(textbook_at_step, model, opt, x, y, eps, alpha, steps))))
    # robustlab, in each precision / memory-format combination.
    with_bf16 = args.bf16 if args.bf16 is not None else fast_bf16(torch.device("cpu"))
    for precision in ("fp32", "bf16") if with_bf16 else ("fp32",):
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = fresh().to(memory_format=fmt).train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            ctx = StepContext(model, model, opt, torch.Generator().manual_seed(0), autocast_for(precision, torch.device("cpu")))
            xf = x.to(memory_format=fmt)
            pgd_at, standard, threat = PGDAT(eps=eps, steps=steps, step_size=alpha), Standard(), LinfBall(eps, alpha)

            def attack(ctx=ctx, model=model, xf=xf, threat=threat):
                with ctx.autocast(), attack_mode(model):
                    perturb(model, xf, y, threat, steps, generator=ctx.generator)
            loops[f"robustlab-{precision}{'-cl' if channels_last else ''}"] = dict(zip(measures, (
                partial(standard.train_step, ctx, xf, y), attack, partial(pgd_at.train_step, ctx, xf, y))))
    seconds = median_seconds({(loop, m): fn for loop, fns in loops.items() for m, fn in fns.items()}, iters=args.iters)
    results = {loop: {m: args.batch_size / seconds[loop, m] for m in measures} for loop in loops}
    base = results["textbook"]
    print(f"{args.model} on {'×'.join(map(str, shape))} inputs (Fashion-MNIST's), 10 classes, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads (images/s; ratio to textbook)")
    print(f"{'loop':24s} {'clean step':>18s} {'PGD-10 attack':>18s} {'PGD-10 AT step':>18s}")
    for name, r in results.items():
        cells = [f"{r[k]:8.0f} ({r[k] / base[k]:4.2f}x)" for k in measures]
        print(f"{name:24s} " + " ".join(f"{c:>18s}" for c in cells))
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m robustlab.bench"))
