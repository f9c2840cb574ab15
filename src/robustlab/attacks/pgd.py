"""Projected gradient descent (Madry et al. 2018) and its one-step cases FGSM and FGM.

`perturb` is the one loop; it neither switches the model's mode nor touches parameter gradients
(gradients are taken for the input only). The public attacks wrap it in `attack_mode`, which runs
the model in eval mode and restores the caller's mode afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks.threat import check_batch, check_budget, check_labels, make_threat
from robustlab.models.registry import eval_mode
from robustlab.protocol import check_eps

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> per-example loss


def cross_entropy(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


@contextmanager
def frozen_params(model: nn.Module):
    """Parameters stop requiring grad for the duration, so attack backward passes skip weight gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def attack_mode(model: nn.Module):
    """Eval mode and frozen parameters; the caller's mode (per module) is restored afterwards."""
    with eval_mode(model), frozen_params(model):
        yield model


def perturb(model, x, y, threat, steps: int, *, random_start: bool = True, targeted: bool = False,
            loss_fn: LossFn = cross_entropy, keep_best: bool = False, generator=None,
            x_init: torch.Tensor | None = None, check_labels_fit: bool = False) -> torch.Tensor:
    """Run `steps` projected ascent steps on `loss_fn` (descent toward `y` if `targeted`).

    keep_best: return, per example, the first iterate that the model misclassified (or classified
    as the target), else the last one: any iterate inside the ball is a valid adversarial example.
    Evaluation uses this; training uses the last iterate.
    check_labels_fit: the first pass checks that `y` indexes the model's outputs (`pgd` asks for it; a training
    step would pay a host sync for it).
    """
    x = x.detach()
    if x_init is not None:
        x_adv = threat.project(x_init.detach(), x)
    elif random_start:
        x_adv = threat.random_start(x, generator)
    else:
        x_adv = x.clone()
    best = x_adv.clone() if keep_best else None
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device) if keep_best else None
    sign = -1.0 if targeted else 1.0
    for step in range(steps):
        with torch.enable_grad():  # a caller may hold torch.no_grad(), as APGD and FAB allow too
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            if check_labels_fit and step == 0:
                check_labels(logits, y)
            loss = loss_fn(logits, y).sum()
            (grad,) = torch.autograd.grad(sign * loss, x_adv)
        x_adv = x_adv.detach()
        if keep_best:
            _record_success(logits.detach(), y, targeted, x_adv, best, done)
        x_adv = threat.project(threat.step(x_adv, grad), x)
    if keep_best:  # an example no iterate broke gets the last one, which may: no forward pass needed to know
        return torch.where(done.view(-1, *([1] * (x.dim() - 1))), best, x_adv)
    return x_adv.detach()


def _fooled(logits, y, targeted):
    """Per example: the attack's goal is met (the target class, or any class but y)."""
    pred = logits.argmax(1)
    return (pred == y) if targeted else (pred != y)


def _record_success(logits, y, targeted, x_adv, best, done):
    new = _fooled(logits, y, targeted) & ~done
    best[new] = x_adv[new]
    done |= new


def pgd(model, x, y, *, eps: float, norm: str = "linf", steps: int = 10, step_size: float | None = None,
        random_start: bool = True, restarts: int = 1, targeted: bool = False,
        loss_fn: LossFn = cross_entropy, generator: torch.Generator | None = None,
        keep_best: bool = True) -> torch.Tensor:
    """Evaluation PGD: worst case per example over `restarts` runs, model in eval mode.

    step_size defaults to 2.5·ε/steps (Madry et al.), so the iterate can cross the ball.
    A restart only runs on examples that earlier restarts did not break.
    Per example the first iterate that breaks the model is kept (`keep_best`), the clean input counting as the
    first: an example the model already gets wrong is returned as it is (the random start never evaluates x, so
    without this it could come back classified right). With keep_best=False the last iterate is returned, the
    highest loss on this model, which is what to transfer to another (`transfer`).
    """
    check_budget(eps, steps, restarts)
    check_eps(float(eps), norm, "eps")  # float: a 0-d tensor
    y = check_batch(x, y, model=model)
    x = x.detach()  # images that require grad (a generator's output): the result is a constant, as APGD's and FAB's
    threat = make_threat(norm, eps, step_size if step_size is not None else 2.5 * eps / steps)
    with attack_mode(model):
        fooled_at_x = None
        if keep_best:
            with torch.no_grad():
                logits = model(x)
            check_labels(logits, y)
            fooled_at_x = _fooled(logits, y, targeted)
        x_adv = x.clone()
        # The restarts run as if x had not been looked at (wrong-at-x examples included, overwritten at the end):
        # every other example gets the random draws, and so the result, it got before this check existed.
        remaining = torch.arange(len(x), device=x.device)
        for r in range(restarts):
            xr, yr = x[remaining], y[remaining]
            adv = perturb(model, xr, yr, threat, steps, random_start=random_start or r > 0,
                          targeted=targeted, loss_fn=loss_fn, keep_best=keep_best, generator=generator,
                          check_labels_fit=r == 0 and not keep_best)
            x_adv[remaining] = adv
            if r == restarts - 1:  # which examples survived matters only to a next restart (a pass saved: 2.4%)
                break
            with torch.no_grad():
                remaining = remaining[~_fooled(model(adv), yr, targeted)]
            if len(remaining) == 0:
                break
        if fooled_at_x is not None:
            x_adv[fooled_at_x] = x[fooled_at_x]
    return x_adv


def first_success(*attacks):
    """An attack that keeps, per image, the first of `attacks` that breaks it (untargeted); each runs only on the
    images the earlier ones left, and all see the same keyword arguments (`generator`). `pgd`'s restarts do the
    same with one attack repeated."""
    def attack(model, x, y, **kwargs):
        x_adv, left = x.clone(), torch.arange(len(x), device=x.device)
        for one in attacks:
            x_adv[left] = one(model, x[left], y[left], **kwargs)
            with attack_mode(model), torch.no_grad():
                left = left[model(x_adv[left]).argmax(1) == y[left]]
            if len(left) == 0:
                break
        return x_adv
    return attack


def fgsm(model, x, y, *, eps: float, targeted: bool = False, loss_fn: LossFn = cross_entropy,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one L∞ step of size ε from x. `generator` is taken, and
    unused (no random start), so that it can be passed wherever an attack is, e.g. `accuracy(..., attack=fgsm)`."""
    return pgd(model, x, y, eps=eps, norm="linf", steps=1, step_size=eps, random_start=False,
               targeted=targeted, loss_fn=loss_fn)


def fgm(model, x, y, *, eps: float, targeted: bool = False, loss_fn: LossFn = cross_entropy,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Fast gradient method (L2): one step of L2 length ε along the normalized gradient (`generator`: as fgsm)."""
    return pgd(model, x, y, eps=eps, norm="l2", steps=1, step_size=eps, random_start=False,
               targeted=targeted, loss_fn=loss_fn)
