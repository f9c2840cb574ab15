"""Throughput of robustlab against a textbook PyTorch loop, same model and batch.

The textbook loop is what most papers' code does: model in train mode, `loss.backward()` into both
parameters and input for every attack step, default memory format, fp32.

    robustlab bench --model cnn-small --batch-size 128   (or python benchmarks/bench.py)
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from robustlab.attacks import LinfBall, attack_mode, perturb
from robustlab.models import build_model
from robustlab.training.methods import PGDAT, Standard, StepContext
from robustlab.training.trainer import autocast_for


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


def images_per_s(fn, batch, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return batch * iters / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn-small")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", default=None,
                   help="also time bf16 autocast (default: only where the CPU has bf16 units)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    shape = (1, 28, 28)
    x = torch.rand(args.batch_size, *shape)
    y = torch.randint(0, 10, (args.batch_size,))
    eps, alpha, steps = args.eps, args.eps / 4, 10
    results = {}

    def fresh():
        return build_model(args.model, shape, 10, [0.286], [0.353])

    # Textbook loop.
    model = fresh().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def clean_step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    results["textbook"] = {
        "clean_step": images_per_s(clean_step, args.batch_size, iters=args.iters),
        "pgd10_attack": images_per_s(lambda: textbook_pgd(model, x, y, eps, alpha, steps), args.batch_size, iters=args.iters),
        "pgd10_at_step": images_per_s(lambda: textbook_at_step(model, opt, x, y, eps, alpha, steps), args.batch_size, iters=args.iters),
    }
    # robustlab, in each precision / memory-format combination.
    with_bf16 = args.bf16 if args.bf16 is not None else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for precision in ("fp32", "bf16") if with_bf16 else ("fp32",):
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = fresh().to(memory_format=fmt)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            ctx = StepContext(model, model, opt, torch.Generator().manual_seed(0), autocast_for(precision, torch.device("cpu")))
            xf = x.to(memory_format=fmt)
            pgd_at, standard, threat = PGDAT(eps=eps, steps=steps, step_size=alpha), Standard(), LinfBall(eps, alpha)

            def attack():
                with ctx.autocast(), attack_mode(model):
                    perturb(model, xf, y, threat, steps, generator=ctx.generator)
            model.train()
            name = f"robustlab-{precision}{'-cl' if channels_last else ''}"
            results[name] = {
                "clean_step": images_per_s(lambda: standard.train_step(ctx, xf, y), args.batch_size, iters=args.iters),
                "pgd10_attack": images_per_s(attack, args.batch_size, iters=args.iters),
                "pgd10_at_step": images_per_s(lambda: pgd_at.train_step(ctx, xf, y), args.batch_size, iters=args.iters),
            }
    base = results["textbook"]
    print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads (images/s; ratio to textbook)")
    print(f"{'loop':24s} {'clean step':>18s} {'PGD-10 attack':>18s} {'PGD-10 AT step':>18s}")
    for name, r in results.items():
        cells = [f"{r[k]:8.0f} ({r[k] / base[k]:4.2f}x)" for k in ("clean_step", "pgd10_attack", "pgd10_at_step")]
        print(f"{name:24s} " + " ".join(f"{c:>18s}" for c in cells))
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
