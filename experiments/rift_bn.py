"""How much of a robust model's robustness lives in its BatchNorm statistics (issue 6).

RiFT fine-tunes in train mode, so every BatchNorm layer's running mean and variance are re-estimated on clean
images. This script isolates that effect: it leaves every weight alone and only re-estimates the statistics,
once on clean training images and once on adversarial ones (PGD-10 against the model: the kind of input the
model was trained on), then measures validation clean and fixed-seed PGD-10 accuracy. Validation only.

    python experiments/rift_bn.py runs/fmnist-resnet-pgd-at --n 10000 --val-n 5000

With `--tuned FINETUNED` (a RiFT fine-tuning run's best.safetensors) it asks the same question along RiFT's
interpolation instead: for each α, θ(α) with the statistics interpolated like the weights (what RiFT measures)
beside θ(α) with statistics re-estimated on PGD-10 training images attacked against θ(α) itself.

    python experiments/rift_bn.py runs/fmnist-resnet-pgd-at --tuned RIFT_OUT/finetune/CANDIDATE/best.safetensors

`robustlab rift --bn recalibrate` makes the second of these RiFT's own mode. (Until that mode landed, this script
attacked each batch against the statistics estimated so far rather than against the model as given.)
"""
from __future__ import annotations

import copy
import json
import sys
from functools import partial

import torch

from robustlab import load_model
from robustlab.attacks import pgd
from robustlab.cli import OneLineParser, nonnegative, positive
from robustlab.errors import RobustlabError, run_script
from robustlab.evaluate import accuracy
from robustlab.models import batch_norms
from robustlab.protocol import threat_defaults
from robustlab.rift.finetune import interpolate, recalibrate_bn
from robustlab.training.run import run_dataset


def with_bn_statistics_of(model, data, attack=None):
    """A copy of `model` whose BatchNorm statistics are re-estimated on `data` (attacked, when given, against
    the model as it is): `robustlab.rift.recalibrate_bn`, as `robustlab rift --bn recalibrate` uses it."""
    return recalibrate_bn(copy.deepcopy(model), data, attack).eval()


def main():
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--n", type=positive(int), default=10000, help="training images for the statistics")
    p.add_argument("--val-n", type=positive(int), default=5000)
    p.add_argument("--threads", type=positive(int), default=2)
    p.add_argument("--tuned", help="a RiFT fine-tuned checkpoint: compare the two kinds of statistics along α")
    p.add_argument("--alphas", type=nonnegative(float), nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.run)
    if not batch_norms(model):
        raise RobustlabError(f"{args.run} has no BatchNorm layer: there are no statistics to re-estimate")
    meta = model.checkpoint_meta
    data = run_dataset(meta)  # the run's own data and split, as RiFT reads them
    norm = meta.get("method", {}).get("norm", "linf")
    b = threat_defaults(meta["dataset"]["name"], norm).train
    attack = partial(pgd, eps=b.eps, norm=norm, steps=b.steps, step_size=b.step_size)
    train, val = data.train.subset(args.n), data.val.subset(args.val_n)
    if args.tuned:
        robust, tuned = model.state_dict(), load_model(args.tuned).state_dict()
        candidates = []
        for alpha in args.alphas:
            interpolated = copy.deepcopy(model)
            interpolated.load_state_dict(interpolate(robust, tuned, alpha))
            candidates += [(f"α = {alpha:.1f}, statistics interpolated", interpolated),
                           (f"α = {alpha:.1f}, statistics of PGD-10 training images", with_bn_statistics_of(interpolated, train, attack))]
    else:
        candidates = [("BN statistics of clean training images", with_bn_statistics_of(model, train)),
                      ("BN statistics of PGD-10 training images", with_bn_statistics_of(model, train, attack))]
    results = {}
    for name, m in [("original", model), *candidates]:
        results[name] = {"val_clean": accuracy(m, val), "val_pgd10": accuracy(m, val, attack=attack, seed=0)}
        print(f"{name:56s} clean {results[name]['val_clean']:.2%}  PGD-10 {results[name]['val_pgd10']:.2%}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(run_script(main))
