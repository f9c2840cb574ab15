"""Would a cheap check on VALIDATION data have seen a Fast-AT model's masked gradients? (issue 5, MNIST)

For each run: clean accuracy and four attacks at the run's ε on the first `--n` validation images: PGD-10 with
the Trainer's validation step (2.5·ε/10, the per-epoch check Fast-AT's overfitting test reads), the same PGD on
the DLR margin loss, APGD-CE with 20 steps and Square with 300 queries. A masked model shows an APGD-CE or Square
accuracy well below PGD-10's; a healthy one does not.

    python experiments/masking_probe_mnist.py runs/s35/mnist-new-s0 runs/s36/mnist-new-s4 --threads 1
    python experiments/masking_probe_mnist.py runs/published/fgsm --eps 0.3     # an imported model

Validation images only: nothing here reads the test set.
"""
from __future__ import annotations

import sys
import time
from functools import partial

import torch

from robustlab import load_model
from robustlab.attacks import dlr_loss, pgd
from robustlab.attacks.apgd import apgd
from robustlab.attacks.square import square
from robustlab.cli import OneLineParser, positive
from robustlab.errors import RobustlabError, run_script
from robustlab.evaluate import accuracy
from robustlab.training.run import run_dataset


def probe(run: str, n: int, args_eps: float | None) -> dict:
    model = load_model(run)
    meta = model.checkpoint_meta
    eps = args_eps if args_eps is not None else meta["method"].get("eps")
    if eps is None:  # e.g. a model imported from elsewhere
        raise RobustlabError(f"{run} records no training ε; give --eps")
    val = run_dataset(meta, None).val.subset(n)
    step = 2.5 * eps / 10
    attacks = {"PGD-10": partial(pgd, eps=eps, steps=10, step_size=step),
               "PGD-10 DLR": partial(pgd, eps=eps, steps=10, step_size=step, loss_fn=dlr_loss),
               "APGD-CE-20": partial(apgd, eps=eps, steps=20),
               "Square-300": partial(square, eps=eps, queries=300)}
    row = {"run": run, "clean": accuracy(model, val)}
    for name, attack in attacks.items():
        start = time.perf_counter()
        row[name] = accuracy(model, val, attack=attack, seed=0)
        row[f"{name} s"] = round(time.perf_counter() - start, 1)
    return row


def main(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--n", type=positive(int), default=1000, help="validation images")
    p.add_argument("--threads", type=positive(int), default=1)
    p.add_argument("--eps", type=positive(float), help="the threat's ε (default: the run's training ε)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| run | clean | PGD-10 | PGD-10 DLR | APGD-CE-20 | Square-300 | PGD-10 − APGD-CE-20 |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        r = probe(run, args.n, args.eps)
        print(f"| {run} | {r['clean']:.1%} | {r['PGD-10']:.1%} | {r['PGD-10 DLR']:.1%} | {r['APGD-CE-20']:.1%} | "
              f"{r['Square-300']:.1%} | {100 * (r['PGD-10'] - r['APGD-CE-20']):.1f} |", flush=True)


if __name__ == "__main__":
    sys.exit(run_script(main))
