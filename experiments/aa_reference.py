"""robustlab's AutoAttack against its authors' implementation, on the same model and the same test images.

The authors' code (https://github.com/fra31/auto-attack, MIT licence, pure PyTorch) is not a dependency of
robustlab: clone it anywhere and name the folder with --reference. Both sides run AutoAttack-standard (APGD-CE,
APGD-T, FAB-T, Square; 100 iterations, 9 target classes, 5,000 queries, seed 0) on the first --n test images
of the run's dataset at the protocol's evaluation ε, in the run's threat model or --norm's:

    git clone https://github.com/fra31/auto-attack /tmp/auto-attack
    python experiments/aa_reference.py runs/s36/mnist-new-s4 --reference /tmp/auto-attack --n 1000 \
        --robustlab-state runs/s36/aa-mnist-new-s4/aa-0-1000.safetensors --out runs/s39/aa-ref-mnist-s4

robustlab's side is its own resumable state file: --robustlab-state reuses a finished one (`robustlab eval
--suite standard` and `aa_paired.py run` leave them), checked to be of this model and these images; without
it, robustlab's AutoAttack runs into OUT/robustlab.safetensors. The reference runs stage by stage on the
images every earlier stage left robust, as its own run_standard_evaluation does inside one call, and saves
after each stage which stage broke each image (OUT/reference.json), so a killed run resumes at the stage it
was in. `--only reference` or `--only robustlab` runs one side, for two processes side by side; a call
without it runs what is missing and compares.

The comparison (printed, and OUT/comparison.json): accuracy after each stage on both sides; per image, robust
on both, on robustlab's side only, on the reference's only; an exact sign test on those discordant images.
The two sides draw different random numbers, so images near the boundary can differ; a real difference in
strength shows as many discordant images on one side.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from robustlab import checkpoint, load_model
from robustlab.attacks import attack_mode, within_ball
from robustlab.attacks.autoattack import ROBUST, STAGES, autoattack, check_state_belongs, load_finished_state
from robustlab.cli import OneLineParser, positive
from robustlab.errors import RobustlabError, run_script
from robustlab.evaluate.accuracy import correct_mask
from robustlab.models import fast_memory_format
from robustlab.protocol import threat_defaults
from robustlab.training.run import run_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aa_paired import sign_test  # noqa: E402  (a sibling script, not a package)

REFERENCE_NORMS = {"linf": "Linf", "l2": "L2"}


def reference_verdicts(model, x, y, eps: float, norm: str, reference: Path, path: Path, batch_size: int,
                       windows_everywhere: bool = False) -> dict:
    """Per image, the index in STAGES of the stage of the authors' AutoAttack that broke it (ROBUST if none).

    windows_everywhere: the authors' Square draws its window positions from 0 to h − s inclusive, as robustlab's
    does (their `random_int(0, h − s)` never draws h − s); it tests whether that explains a difference.
    """
    if not (reference / "autoattack" / "autoattack.py").is_file():
        raise RobustlabError(f"--reference {reference} is not a checkout of fra31/auto-attack "
                             f"(no autoattack/autoattack.py in it)")
    sys.path.insert(0, str(reference))
    from autoattack import AutoAttack
    if windows_everywhere:
        from autoattack.square import SquareAttack
        draw = SquareAttack.random_int  # in the standard version it draws window positions only
        SquareAttack.random_int = lambda self, low=0, high=1, shape=[1]: draw(self, low, high + 1, shape)

    setting = {"n": len(x), "eps": eps, "norm": norm, "model": checkpoint.weights_digest(model),
               "data": hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16],
               "windows_everywhere": windows_everywhere}
    done = json.loads(path.read_text()) if path.exists() else None
    if done is not None and {k: done.get(k) for k in setting} != setting:
        raise RobustlabError(f"{path} holds the reference's verdicts for another model, other images or another "
                             f"setting; use another --out")
    if done is None:
        correct = correct_mask(model, x, y, batch_size=batch_size)
        broken_by = torch.where(correct, ROBUST, STAGES.index("clean"))
        done = {**setting, "stages": ["clean"], "seconds": {}, "broken_by": broken_by.tolist()}
    broken_by = torch.tensor(done["broken_by"])
    adversary = AutoAttack(model, norm=REFERENCE_NORMS[norm], eps=eps, version="standard", seed=0,
                           device=str(x.device), verbose=False)
    for stage_index, stage in enumerate(STAGES):
        if stage in done["stages"]:
            continue
        idx = (broken_by == ROBUST).nonzero().squeeze(1)
        start = time.perf_counter()
        if len(idx):
            adversary.attacks_to_run = [stage]  # the standard version's settings, this member only
            with attack_mode(model):
                x_adv = adversary.run_standard_evaluation(x[idx], y[idx], bs=batch_size)
            if not within_ball(x_adv, x[idx], norm, eps):
                raise RobustlabError(f"the reference's {stage} returned points outside the {norm} ball of ε={eps}")
            broken_by[idx[~correct_mask(model, x_adv, y[idx], batch_size=batch_size)]] = stage_index
        done["stages"].append(stage)
        done["seconds"][stage] = time.perf_counter() - start
        done["broken_by"] = broken_by.tolist()
        checkpoint.write_json(path, done, default=float)
        print(f"reference {stage}: {stage_accuracy(broken_by)[stage]:.2%} "
              f"({done['seconds'][stage]:.0f} s)", flush=True)
    return done


def stage_accuracy(broken_by: torch.Tensor) -> dict[str, float]:
    """Accuracy after each stage, from per-image verdicts."""
    return {stage: ((broken_by == ROBUST) | (broken_by > i)).float().mean().item() for i, stage in enumerate(STAGES)}


def each_stage_alone(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Per attack, on the images that both sides left robust before it: how many each side's attack broke. The
    accuracies after each stage mix a stage's own strength with what the earlier stages left; this does not."""
    result = {}
    for i, stage in enumerate(STAGES[1:], 1):
        reached = ((ours == ROBUST) | (ours >= i)) & ((theirs == ROBUST) | (theirs >= i))
        result[stage] = {"images": int(reached.sum()), "robustlab": int((reached & (ours == i)).sum()),
                         "reference": int((reached & (theirs == i)).sum())}
    return result


def robustlab_verdicts(model, x, y, eps: float, norm: str, state: Path | None, out: Path, batch_size: int):
    """Per image, the index in STAGES of the stage of robustlab's AutoAttack that broke it (ROBUST if none), and
    the seconds each stage took. Every image it counts as broken by an attack is checked here to have a stored
    adversarial example inside the ball that the model misclassifies."""
    if state is None:
        state = out / "robustlab.safetensors"
        autoattack(model, x, y, eps=eps, norm=norm, seed=0, batch_size=batch_size, state_path=state)
    tensors, meta = load_finished_state(state)
    config = meta["config"]
    if config["n"] != len(x) or (config["eps"], config["norm"]) != (eps, norm):
        raise RobustlabError(f"{state} evaluated {config['n']} images at {config['norm']} ε={config['eps']}, "
                             f"not {len(x)} at {norm} ε={eps}")
    if (config.get("steps", 100), config.get("queries", 5000), config["seed"]) != (100, 5000, 0):
        raise RobustlabError(f"{state} ran an off-protocol budget (steps {config.get('steps')}, queries "
                             f"{config.get('queries')}, seed {config['seed']}); the comparison needs 100, 5000 and 0")
    check_state_belongs(state, meta, model, x, y)
    broken_by = tensors["broken_by"].long()
    x_adv = x.clone()
    x_adv[tensors["adv_index"].long()] = tensors["adv_rows"].to(x.dtype)
    attacked = broken_by > STAGES.index("clean")
    fooled = ~correct_mask(model, x_adv[attacked], y[attacked], batch_size=batch_size)
    if not (fooled.all() and within_ball(x_adv[attacked], x[attacked], norm, eps)):
        raise RobustlabError(f"{state}: {int((~fooled).sum())} of the images it counts as broken have no stored "
                             f"adversarial example that fools the model inside the ball")
    return broken_by, meta["seconds"]


def main():
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="run directory or checkpoint file")
    p.add_argument("--reference", required=True, type=Path, help="a checkout of github.com/fra31/auto-attack")
    p.add_argument("--n", type=positive(int), default=1000, help="the first N test images")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--robustlab-state", type=Path, help="a finished robustlab AutoAttack state of these images")
    p.add_argument("--norm", choices=tuple(REFERENCE_NORMS), help="threat model (default: the run's own), at the "
                   "protocol's evaluation ε for it")
    p.add_argument("--only", choices=("reference", "robustlab"), help="run one side and stop")
    p.add_argument("--reference-windows-everywhere", action="store_true",
                   help="let the authors' Square place windows at the last row and column too, as robustlab's does")
    p.add_argument("--batch-size", type=positive(int), default=250)
    p.add_argument("--threads", type=positive(int), default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.run)
    model = model.to(memory_format=fast_memory_format(model))
    meta = model.checkpoint_meta
    test = run_dataset(meta).test
    if args.n > len(test.labels):
        raise RobustlabError(f"--n must be at most the test set's {len(test.labels)} images, got {args.n}")
    test = test.subset(args.n)
    x, y = test.images.float().div(255), test.labels
    norm = args.norm or meta.get("method", {}).get("norm", "linf")
    eps = threat_defaults(meta["dataset"]["name"], norm).eval.eps
    args.out.mkdir(parents=True, exist_ok=True)

    if args.only != "robustlab":
        reference = reference_verdicts(model, x, y, eps, norm, args.reference, args.out / "reference.json",
                                       args.batch_size, args.reference_windows_everywhere)
    if args.only != "reference":
        ours, our_seconds = robustlab_verdicts(model, x, y, eps, norm, args.robustlab_state, args.out,
                                               args.batch_size)
    if args.only:
        return

    theirs = torch.tensor(reference["broken_by"])
    robust_ours, robust_theirs = ours == ROBUST, theirs == ROBUST
    only_ours = int((robust_ours & ~robust_theirs).sum())
    only_theirs = int((robust_theirs & ~robust_ours).sum())
    result = {"run": str(args.run), "n": args.n, "eps": eps, "norm": norm,
              "robustlab": stage_accuracy(ours), "reference": stage_accuracy(theirs),
              "each_stage_alone": each_stage_alone(ours, theirs),
              "robustlab_seconds": our_seconds, "reference_seconds": reference["seconds"],
              "robust_both": int((robust_ours & robust_theirs).sum()),
              "robust_only_robustlab": only_ours, "robust_only_reference": only_theirs,
              "sign_test_p": sign_test(only_ours, only_theirs)}
    checkpoint.write_json(args.out / "comparison.json", result, default=float)
    print(f"AutoAttack-standard, {norm} ε={eps}, first {args.n} test images of {args.run}")
    print(f"{'stage':8s} {'robustlab':>10s} {'reference':>10s}   the stage alone, on the images both sides "
          "brought to it: broken by robustlab / by the reference")
    for stage in STAGES:
        alone = result["each_stage_alone"].get(stage)
        print(f"{stage:8s} {result['robustlab'][stage]:10.2%} {result['reference'][stage]:10.2%}" +
              (f"   {alone['robustlab']} / {alone['reference']} of {alone['images']}" if alone else ""))
    print(f"robust on both sides {result['robust_both']}, on robustlab's only {only_ours}, on the reference's "
          f"only {only_theirs} (sign test p = {result['sign_test_p']:.3f})")


if __name__ == "__main__":
    sys.exit(run_script(main))
