"""AutoAttack on a slice of the test set, and a paired comparison of two models built from such slices.

AutoAttack-standard takes 20 to 30 minutes per 1,000 test images of the residual network on one CPU thread,
so a comparison on more images than one session's first 1,000 is put together from slices, each run (and
resumable) on its own, then merged image by image:

    python experiments/aa_paired.py run runs/s20/trades-joint --checkpoint last --start 1000 --stop 3000 \
        --out runs/s22/aa-trades
    python experiments/aa_paired.py compare \
        --before runs/s21/cpu/trades/autoattack_state.safetensors runs/s22/aa-trades/aa-1000-3000.safetensors \
        --after runs/s21/cpu/rift-trades/autoattack_state.safetensors runs/s22/aa-rift/aa-1000-3000.safetensors

`run` writes AutoAttack's own resumable state (robustlab.attacks.autoattack), the same file `robustlab eval
--suite standard` leaves in its output folder, so an earlier evaluation's state is a slice too. `compare` reads
the per-image verdicts of the listed states in order, checks that the two sides cover the same images (AutoAttack
records a fingerprint of each slice's images and labels), and reports both robust accuracies, the images on which
exactly one model is robust, and an exact two-sided sign test on those.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from robustlab import load_model
from robustlab.attacks.autoattack import ROBUST, autoattack_accuracy, load_finished_state
from robustlab.cli import OneLineParser, nonnegative, positive
from robustlab.data import ImageSet
from robustlab.errors import RobustlabError, run_script
from robustlab.models import fast_memory_format
from robustlab.protocol import threat_defaults
from robustlab.training.run import run_dataset


def run(args):
    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.checkpoint)
    model = model.to(memory_format=fast_memory_format(model))
    meta = model.checkpoint_meta
    test = run_dataset(meta).test
    if not 0 <= args.start < args.stop <= len(test.labels):
        raise RobustlabError(f"--start/--stop must satisfy 0 <= start < stop <= {len(test.labels)}, "
                             f"got {args.start} and {args.stop}")
    norm = meta.get("method", {}).get("norm", "linf")
    eps = threat_defaults(meta["dataset"]["name"], norm).eval.eps
    images = ImageSet(test.images[args.start:args.stop], test.labels[args.start:args.stop])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = autoattack_accuracy(model, images, eps, norm, state_path=out / f"aa-{args.start}-{args.stop}.safetensors")
    print(result.summary())


def _verdicts(paths) -> tuple[torch.Tensor, list[str]]:
    """Per image, whether it stayed robust through every stage, over the listed states in order."""
    robust, prints = [], []
    for path in paths:
        tensors, meta = load_finished_state(path)
        robust.append(tensors["broken_by"] == ROBUST)
        prints.append(meta["config"]["data"])
    return torch.cat(robust), prints


def sign_test(b: int, c: int) -> float:
    """Exact two-sided p-value that b and c discordant pairs came from a fair coin."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(args):
    before, prints_before = _verdicts(args.before)
    after, prints_after = _verdicts(args.after)
    if prints_before != prints_after:
        raise RobustlabError("--before and --after do not cover the same images slice by slice "
                             "(their AutoAttack states record different data)")
    only_before = int((before & ~after).sum())
    only_after = int((after & ~before).sum())
    n = len(before)
    result = {"n": n, "before": before.float().mean().item(), "after": after.float().mean().item(),
              "only_before": only_before, "only_after": only_after, "sign_test_p": sign_test(only_before, only_after)}
    result["difference"] = result["after"] - result["before"]
    print(json.dumps(result) if args.json else
          f"AutoAttack on {n} images: before {result['before']:.2%}, after {result['after']:.2%} "
          f"({100 * result['difference']:+.2f} points); robust only before: {only_before}, only after: "
          f"{only_after} (sign test p {_p_value(result['sign_test_p'])})")


def _p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def main():
    p = OneLineParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="AutoAttack-standard on test images [start, stop) of a run's dataset")
    r.add_argument("model", help="run directory or checkpoint file")
    r.add_argument("--checkpoint", help="best (default) or last, when the model is a run directory")
    r.add_argument("--start", type=nonnegative(int), required=True)
    r.add_argument("--stop", type=nonnegative(int), required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--threads", type=positive(int), default=1)
    c = sub.add_parser("compare", help="paired comparison of two models' AutoAttack states, slice by slice")
    c.add_argument("--before", nargs="+", required=True, help="state files of the original model, in image order")
    c.add_argument("--after", nargs="+", required=True, help="state files of the other model, the same slices")
    c.add_argument("--json", action="store_true")
    args = p.parse_args()
    run(args) if args.command == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(run_script(main))
