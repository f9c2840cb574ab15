"""OOD accuracy of a run per corruption and severity, and the mean, on the first N test images (the suite's seed 0).

    python experiments/ood_per_severity.py runs/s35/fmnist-fast-s0 --n 10000 --threads 1

To compare two versions of the corruption suite, run it with PYTHONPATH pointing at each version's src/ (a git
worktree of the older commit). Test images are read, so this is for reporting, never for choices.
"""
from __future__ import annotations

import sys
import time

import torch

from robustlab import load_model
from robustlab.cli import OneLineParser, positive
from robustlab.errors import run_script
from robustlab.evaluate import corruptions
from robustlab.training.run import run_dataset


def main(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--n", type=positive(int), default=10000, help="first N test images")
    p.add_argument("--threads", type=positive(int), default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.run)
    test = run_dataset(model.checkpoint_meta).test.subset(args.n)
    start = time.perf_counter()
    result = corruptions.ood_accuracy(model, test, seed=0, progress=False)
    print(f"{corruptions.__file__}: clean {100 * result.clean:.2f}, OOD mean {100 * result.mean:.2f} "
          f"({len(test)} images, {time.perf_counter() - start:.0f} s)")
    for name, by_severity in result.accuracy.items():
        print(f"  {name:18s} " + " ".join(f"{100 * by_severity[s]:5.1f}" for s in corruptions.SEVERITIES))


if __name__ == "__main__":
    sys.exit(run_script(main))
