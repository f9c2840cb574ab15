"""Auto-PGD (APGD) of Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks" (ICML 2020), Algorithm 1, for the L∞ and L2 threat models.

APGD is PGD with momentum whose step size needs no tuning: it starts at 2ε and is halved at fixed
checkpoints when progress stalls, restarting from the best point seen so far. It runs on the
cross-entropy, the DLR loss or the targeted DLR loss (Sec. 4); APGD-T is the targeted version
run against the top-k wrong classes, one after another.

Every attack here returns, per example, a misclassified iterate when it found one, and the
highest-loss iterate otherwise. Each iteration costs one forward and one backward pass; the logits of
that forward pass are also the success check. Examples that are broken leave the batch at once.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from robustlab.attacks.pgd import attack_mode
from robustlab.attacks.threat import NORMS, check_batch, check_budget, check_labels, lp_norm, per_example, project
from robustlab.errors import RobustlabError, check_choice
from robustlab.protocol import check_eps

LOSSES = ("ce", "dlr", "dlr-targeted")
MOMENTUM = 0.75  # α of the gradient step (Sec. 3.1)


# ---- shared with fab.py and square.py ----

def random_direction(x: torch.Tensor, norm: str, generator=None) -> torch.Tensor:
    """A random perturbation of unit norm: uniform noise rescaled to L∞ norm 1, or a Gaussian direction."""
    if norm == "linf":
        t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return t / per_example(lp_norm(t, norm).clamp_min(1e-12), t)


def check_attack_args(eps: float, norm: str, steps: int, restarts: int = 1) -> None:
    check_choice("norm", norm, NORMS)
    check_budget(eps, steps, restarts, eps_positive=True)
    check_eps(float(eps), norm, "eps")  # float: a 0-d tensor


def check_targets(n_target_classes: int, num_classes: int, attack: str) -> int:
    """The number of target classes actually used: at most num_classes − 1."""
    if n_target_classes < 1:
        raise RobustlabError(f"n_target_classes must be >= 1, got {n_target_classes}")
    if num_classes < 2:
        raise RobustlabError(f"{attack} needs a model with at least 2 classes, got {num_classes}")
    return min(n_target_classes, num_classes - 1)


def clean_logits(model, x: torch.Tensor, y: torch.Tensor):
    """The minimal-attack preamble shared by APGD and FAB: detached inputs, the starting adversarial copy,
    and the clean logits (None for an empty batch, which the caller returns at once)."""
    x, y = x.detach(), y.detach()
    if len(x) == 0:
        return x, y, x.clone(), None
    with torch.no_grad():
        logits = model(x)
    check_labels(logits, y)
    return x, y, x.clone(), logits


# ---- losses ----

def _other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.scatter(1, y[:, None], float("-inf")).amax(1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Sec. 4): −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3), π sorting the logits.

    Invariant to shifting and rescaling the logits, so a saturated softmax cannot hide the gradient.
    Needs at least 3 classes. At least float32: the 1e-12 that keeps a tie of the top logits finite is 0 in
    float16.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    top = logits.topk(3, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return -(z_y - _other_max(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Sec. 4): −(z_y − z_t) / (z_π1 − (z_π3 + z_π4) / 2). Needs at least 4 classes; float32 as
    `dlr_loss`."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _loss_fn(name: str) -> Callable:
    """(logits, y, target) -> per-example loss to maximize."""
    if name == "ce":
        return lambda logits, y, t: F.cross_entropy(logits, y, reduction="none")
    if name == "dlr":
        return lambda logits, y, t: dlr_loss(logits, y)
    return dlr_targeted_loss


def min_classes(loss: str) -> int:
    return {"ce": 2, "dlr": 3, "dlr-targeted": 4}[loss]


# ---- the step-size schedule ----

def step_size_checkpoints(steps: int) -> list[int]:
    """The iterations w_j = ⌈p_j · N_iter⌉ at which APGD may halve its step (Sec. 3.2).

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06): the first phase is long,
    later ones shrink to 6% of the budget. Exact fractions, so that 0.41 · 100 gives 41 rather than
    float's 41.000000000000004 → 42. Checkpoints that round to the same iteration count once.
    """
    p_prev, p = Fraction(0), Fraction(22, 100)
    out: list[int] = []
    while (w := math.ceil(p * steps)) <= steps:
        if not out or w > out[-1]:
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - Fraction(3, 100), Fraction(6, 100))
    return out


# ---- one run of Algorithm 1 ----

class Run(NamedTuple):
    x_adv: torch.Tensor   # misclassified iterate where fooled, else the highest-loss iterate
    fooled: torch.Tensor  # bool per example
    loss: torch.Tensor    # best loss reached (meaningful where not fooled)


def _loss_and_grad(model, x_adv, y, target, loss_fn):
    """One forward and one backward pass: logits (for the success check), loss and input gradient."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv)
        loss = loss_fn(logits, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return logits.detach(), loss.detach(), grad.detach()


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / per_example(lp_norm(grad, "l2") + 1e-12, grad)


def apgd_run(model, x, y, target, *, loss: str, eps: float, norm: str, steps: int, rho: float = 0.75,
             generator=None, x_init: torch.Tensor | None = None) -> Run:
    """Algorithm 1 on a batch, from a random point of the ε-sphere (or `x_init`).

    The model must already be in attack mode. `target` is ignored unless loss is "dlr-targeted".
    Success is misclassification (argmax ≠ y), also for the targeted loss, as in AutoAttack.
    At checkpoint w_j the conditions are checked once x^(w_j) is evaluated, as in the authors' code
    (the paper's listing checks one iterate later). Three details follow the paper where the authors'
    code differs; comparing a line-for-line port of that code on the same starting points changed no
    example's verdict, only the best loss of a few unbroken ones:
    - Condition 1 halves when the loss rose in fewer than ρ·k of the k steps since the last checkpoint
      (the code: at most ρ·k; they differ only where ρ·k is whole, the 16-step window of a 100-step run).
    - At w_1 the first comparison is f(x^(1)) > f(x^(0)) (the code compares with 0), and Condition 2 may
      halve there (the code never halves by it at w_1).
    - After a restart from x_max the next comparison is against f_max (the code keeps the loss of the
      iterate before the restart).
    """
    loss_fn = _loss_fn(loss)
    n = len(x)
    out, fooled = x.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
    best_loss = torch.full((n,), float("-inf"), device=x.device, dtype=torch.float32)

    x0 = project(x + eps * random_direction(x, norm, generator), x, eps, norm) if x_init is None \
        else project(x_init, x, eps, norm)
    logits, f0, grad = _loss_and_grad(model, x0, y, target, loss_fn)
    # Per-example state; rows leave it as soon as their example is misclassified.
    s = dict(idx=torch.arange(n, device=x.device), x=x, y=y, t=target, x_cur=x0, x_prev=x0, grad=grad,
             loss=f0, x_max=x0, f_max=f0, grad_max=grad,
             eta=torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype),  # η^(0) = 2ε
             n_up=torch.zeros(n, device=x.device), f_ckpt=f0, halved=torch.zeros(n, dtype=torch.bool, device=x.device))
    s = _retire_fooled(s, logits, out, fooled)

    checkpoints, last = set(step_size_checkpoints(steps)), 0
    for i in range(1, steps + 1):
        if len(s["idx"]) == 0:
            break
        x_cur, xc = s["x_cur"], s["x"]
        # Sec. 3.1: z = P(x + η·step), then x_new = P(x + α(z − x) + (1 − α)(x − x_prev)); α = 1 on the first step.
        alpha = 1.0 if i == 1 else MOMENTUM
        z = project(x_cur + per_example(s["eta"], x_cur) * _ascent_direction(s["grad"], norm), xc, eps, norm)
        x_new = project(x_cur + alpha * (z - x_cur) + (1 - alpha) * (x_cur - s["x_prev"]), xc, eps, norm)
        logits, f_new, grad = _loss_and_grad(model, x_new, s["y"], s["t"], loss_fn)

        s["n_up"] += (f_new > s["loss"]).float()  # counts f(x^(k+1)) > f(x^(k)) for Condition 1
        s.update(x_prev=x_cur, x_cur=x_new, loss=f_new, grad=grad)
        better = f_new > s["f_max"]
        for key, val in (("x_max", x_new), ("f_max", f_new), ("grad_max", grad)):
            s[key] = torch.where(per_example(better, val), val, s[key])
        s = _retire_fooled(s, logits, out, fooled)

        if i in checkpoints:
            # Condition 1: the loss went up in fewer than a fraction ρ of the steps since the last checkpoint.
            cond1 = s["n_up"] < rho * (i - last)
            # Condition 2: the step was not halved at the last checkpoint and f_max has not improved since.
            cond2 = ~s["halved"] & (s["f_max"] <= s["f_ckpt"])
            halve = cond1 | cond2
            s["eta"] = torch.where(halve, s["eta"] / 2, s["eta"])
            # Restart from the best point: x^(w_j) ← x_max (its gradient and loss go with it).
            for key, src in (("x_cur", "x_max"), ("grad", "grad_max"), ("loss", "f_max")):
                s[key] = torch.where(per_example(halve, s[src]), s[src], s[key])
            s.update(halved=halve, f_ckpt=s["f_max"].clone(), n_up=torch.zeros_like(s["n_up"]))
            last = i

    out[s["idx"]] = s["x_max"]
    best_loss[s["idx"]] = s["f_max"].float()
    return Run(out, fooled, best_loss)


def _retire_fooled(s: dict, logits: torch.Tensor, out: torch.Tensor, fooled: torch.Tensor) -> dict:
    """Write out the examples whose current iterate is misclassified and drop them from the state."""
    hit = logits.argmax(1) != s["y"]
    if not hit.any():
        return s
    out[s["idx"][hit]] = s["x_cur"][hit]
    fooled[s["idx"][hit]] = True
    keep = ~hit
    return {k: v[keep] for k, v in s.items()}


# ---- public attacks ----

def apgd_attack(model, x, y, *, eps: float, norm: str = "linf", steps: int = 100, loss: str = "ce",
                target_class_rank: int | None = None, n_target_classes: int | None = None, restarts: int = 1,
                rho: float = 0.75, generator=None):
    """APGD over target ranks and restarts, each run only on the examples still classified correctly.

    Targets (loss "dlr-targeted") come from the clean logits: rank k is the class with the k-th largest
    logit. `n_target_classes` runs ranks 2 .. n+1 (n capped at num_classes − 1, APGD-T), else the
    single `target_class_rank`. Returns (x_adv, fooled); the model must already be in attack mode.
    Among unbroken examples the highest-loss point over all runs is kept.
    """
    check_attack_args(eps, norm, steps, restarts)
    x, y, x_adv, logits = clean_logits(model, x, y)
    if logits is None:
        return x_adv, torch.zeros(0, dtype=torch.bool, device=x.device)
    if logits.shape[1] < min_classes(loss):
        raise RobustlabError(f"loss {loss!r} needs at least {min_classes(loss)} classes, the model has {logits.shape[1]}")
    if n_target_classes is not None:
        ranks = range(2, check_targets(n_target_classes, logits.shape[1], "APGD-T") + 2)
    else:
        if loss == "dlr-targeted" and target_class_rank is None:
            target_class_rank = 2
        ranks = (target_class_rank,)
        if target_class_rank is not None and target_class_rank > logits.shape[1]:
            raise RobustlabError(f"target_class_rank {target_class_rank} exceeds the {logits.shape[1]} classes")
    fooled = logits.argmax(1) != y
    best = torch.full((len(x),), float("-inf"), device=x.device)
    ranked = logits.argsort(1, descending=True)
    for rank in ranks:
        for _ in range(restarts):
            idx = (~fooled).nonzero().squeeze(1)
            if len(idx) == 0:
                return x_adv, fooled
            target = ranked[idx, rank - 1] if rank is not None else y[idx]
            run = apgd_run(model, x[idx], y[idx], target, loss=loss, eps=eps, norm=norm, steps=steps,
                           rho=rho, generator=generator)
            take = run.fooled | (run.loss > best[idx])
            x_adv[idx[take]] = run.x_adv[take]
            best[idx] = torch.maximum(best[idx], run.loss)
            fooled[idx] = run.fooled
    return x_adv, fooled


def apgd(model, x, y, *, eps: float, norm: str = "linf", steps: int = 100, loss: str = "ce",
         target_class_rank: int | None = None, restarts: int = 1, rho: float = 0.75,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD on the cross-entropy ("ce", APGD-CE), DLR ("dlr") or targeted DLR ("dlr-targeted") loss.

    target_class_rank (targeted loss only, default 2): the target is the class with the k-th largest
    clean logit, so 2 is the most likely wrong class of a correctly classified input, as in APGD-T.
    Restarts (from new random points) run only on examples not yet broken.
    """
    check_choice("loss", loss, LOSSES)
    if loss == "dlr-targeted":
        rank = 2 if target_class_rank is None else target_class_rank
        if rank < 2:
            raise RobustlabError(f"target_class_rank must be >= 2 (rank 1 is the predicted class), got {rank}")
    elif target_class_rank is not None:
        raise RobustlabError("target_class_rank applies only to loss='dlr-targeted'")
    else:
        rank = None
    y = check_batch(x, y, model=model)
    with attack_mode(model):
        x_adv, _ = apgd_attack(model, x, y, eps=eps, norm=norm, steps=steps, loss=loss, target_class_rank=rank,
                               restarts=restarts, rho=rho, generator=generator)
    return x_adv


def apgd_targeted(model, x, y, *, eps: float, norm: str = "linf", steps: int = 100, n_target_classes: int = 9,
                  restarts: int = 1, rho: float = 0.75, generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD-T: APGD on the targeted DLR loss against the 2nd, 3rd, ... most likely classes in turn.

    Each target rank runs only on the examples that the previous ranks did not break;
    n_target_classes is capped at num_classes − 1.
    """
    y = check_batch(x, y, model=model)
    with attack_mode(model):
        x_adv, _ = apgd_attack(model, x, y, eps=eps, norm=norm, steps=steps, loss="dlr-targeted",
                               n_target_classes=n_target_classes, restarts=restarts, rho=rho, generator=generator)
    return x_adv
