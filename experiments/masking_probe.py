"""Why does a gradient-free attack break images that every white-box attack left alone? (evaluation check)

Reads a finished AutoAttack-standard evaluation (`robustlab eval RUN --suite standard --out DIR` leaves
DIR/autoattack_state.safetensors) and looks at the images that only Square broke, beside those that stayed
robust. For each group it measures:

- the input gradient at the clean image (L1 norm of the cross-entropy gradient, the quantity an L∞ step
  follows, and the fraction of exactly-zero entries): vanishing gradients are the classic masking symptom;
- the margin z_y − max_{j≠y} z_j along the straight line from the clean image to Square's point, as a
  fraction of the clean margin: a loss that stays flat and then drops is a landscape a gradient cannot see;
- how many a stronger white-box attack breaks: PGD on the margin loss with many steps and restarts, once with
  the model's own gradients and once with ReLU's gradient replaced by a sigmoid (BPDA-style: the forward pass
  stays exact, so every point counted is a real adversarial example; only the direction of each step changes).
  If the smooth-gradient attack breaks what the exact one cannot, ReLU units switched off near the data are
  hiding the loss from the attack.

    python experiments/masking_probe.py runs/s15/pgd-at-s1 runs/s17/aa-pgd-at-s1/autoattack_state.safetensors

Test images only, and only to judge an evaluation: nothing here chooses a model or a hyper-parameter.
"""
from __future__ import annotations

import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from robustlab import checkpoint, load_model
from robustlab.attacks import attack_mode, negative_margin, pgd, pgd_smooth, within_ball
from robustlab.attacks.autoattack import ROBUST, STAGES, check_state_belongs, load_finished_state
from robustlab.attacks.square import margin
from robustlab.cli import OneLineParser, positive
from robustlab.errors import run_script
from robustlab.training.run import run_dataset


def main():
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("state", help="autoattack_state.safetensors of a finished evaluation of RUN")
    p.add_argument("--robust-n", type=positive(int), default=200, help="robust images to compare with (the first ones)")
    p.add_argument("--steps", type=positive(int), default=100)
    p.add_argument("--restarts", type=positive(int), default=5)
    p.add_argument("--tau", type=positive(float), nargs="+", default=[0.1, 0.5], help="temperatures of the smooth ReLU gradient")
    p.add_argument("--threads", type=positive(int), default=1)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    tensors, meta = load_finished_state(args.state)
    config = meta["config"]
    model = load_model(args.run)  # a run folder (its best checkpoint) or a checkpoint file
    test = run_dataset(model.checkpoint_meta).test.subset(config["n"])
    x, y = test.images.float().div(255), test.labels
    check_state_belongs(args.state, meta, model, x, y)  # once refused nothing: any state ran against any model
    broken_by = tensors["broken_by"]
    x_adv = x.clone()
    x_adv[tensors["adv_index"]] = tensors["adv_rows"]
    eps = config["eps"]
    square_only = (broken_by == STAGES.index("square")).nonzero().squeeze(1)
    robust = (broken_by == ROBUST).nonzero().squeeze(1)[:args.robust_n]
    print(f"{len(x)} images; AutoAttack stages: {meta['stage_accuracy']}")
    print(f"broken by Square only: {len(square_only)}; robust (first {len(robust)} compared)")

    results = {"square_only": len(square_only), "robust_compared": len(robust), "stage_accuracy": meta["stage_accuracy"]}
    with attack_mode(model):
        for group, idx in (("square-only", square_only), ("robust", robust)):
            xi = x[idx].clone().requires_grad_(True)
            logits = model(xi)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y[idx], reduction="sum"), xi)
            l1 = grad.flatten(1).abs().sum(1)
            zero = (grad == 0).float().flatten(1).mean(1)
            m0 = margin(logits.detach(), y[idx])
            results[group] = {"grad_l1_median": l1.median().item(), "grad_zero_fraction": zero.mean().item(),
                              "clean_margin_median": m0.median().item()}
            print(f"{group:12s} clean margin median {m0.median():.3f}, |∇CE|₁ median {l1.median():.3e}, "
                  f"zero entries {zero.mean():.1%}")

        # The margin along the segment toward Square's point, relative to the clean margin.
        with torch.no_grad():
            xs, xq, ys = x[square_only], x_adv[square_only], y[square_only]
            m0 = margin(model(xs), ys)
            curve = []
            for t in torch.linspace(0, 1, 11):
                curve.append((margin(model(xs + t * (xq - xs)), ys) / m0).median().item())
        results["margin_along_square_segment"] = curve
        print("margin / clean margin along clean → Square point (t = 0, 0.1, …, 1), median:",
              " ".join(f"{v:.2f}" for v in curve))

        both = torch.cat([square_only, robust])
        xb, yb = x[both], y[both]
        rows = [("exact gradients", None)] + [(f"smooth ReLU gradients, τ = {t}", t) for t in args.tau]
        results["strong_pgd"] = {}
        for label, tau in rows:
            start = time.perf_counter()
            # L∞ PGD on the margin loss, step ε/10; each restart only on the images still unbroken.
            attack = partial(pgd, loss_fn=negative_margin) if tau is None else partial(pgd_smooth, tau=tau)
            point = attack(model, xb, yb, eps=eps, norm="linf", steps=args.steps, step_size=eps / 10,
                           restarts=args.restarts, generator=torch.Generator().manual_seed(0))
            # The verdict comes from the model's own forward pass, outside the swap, inside the ε-ball.
            if not within_ball(point, xb, "linf", eps):
                raise RuntimeError("PGD left the ε-ball")
            with torch.no_grad():
                broken = model(point).argmax(1) != yb
            k = len(square_only)
            results["strong_pgd"][label] = {"square_only_broken": int(broken[:k].sum()),
                                            "robust_broken": int(broken[k:].sum()),
                                            "seconds": round(time.perf_counter() - start, 1)}
            print(f"PGD-{args.steps} margin ×{args.restarts}, {label}: breaks {int(broken[:k].sum())}/{k} square-only, "
                  f"{int(broken[k:].sum())}/{len(robust)} robust ({time.perf_counter() - start:.0f} s)")
    if args.json:
        checkpoint.write_json(args.json, results)


if __name__ == "__main__":
    sys.exit(run_script(main))
