"""TRADES (Zhang et al. 2019) and MART (Wang et al. 2020): clean-vs-adversarial regularized objectives.

Both generate their examples with PGD in **eval mode** (as `model.eval()` in both reference
implementations), started from x + 0.001·N(0, 1), and train on the clean and the adversarial logits.
Each method splits into `adversarial_examples` and `objective(model, x, x_adv, y)`, so that AWP can
evaluate the same objective on a proxy model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from robustlab.attacks import attack_mode, make_threat, perturb
from robustlab.errors import RobustlabError
from robustlab.training.methods import Method, StepResult


def kl_to_target(logits, target_probs):
    """Per-example KL(target ‖ softmax(logits)): TRADES's inner maximization loss."""
    return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="none").sum(1)


class RegularizedAT(Method):
    """Shared parts: the threat model, β, and PGD from a small Gaussian start, in eval mode."""
    batchnorm_inputs = "clean+adversarial"

    def __init__(self, eps=0.1, norm="linf", steps=10, step_size=0.025, beta=6.0, init_std=0.001,
                 joint_batch=True):
        if not beta >= 0:  # (nan fails every comparison)
            raise RobustlabError(f"beta must be >= 0, got {beta}")
        self.eps, self.norm, self.steps, self.step_size = eps, norm, steps, step_size
        self.beta, self.init_std, self.joint_batch = beta, init_std, joint_batch
        self._threat = make_threat(norm, eps, step_size)

    def _start(self, ctx, x):
        # 0.001·N(0, 1) rather than a uniform start: KL(p(x) ‖ p(x')) has a zero gradient at x' = x.
        return x + self.init_std * torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)

    def loss(self, ctx, x, y):
        x_adv = self.adversarial_examples(ctx, x, y)
        result = self.objective(ctx.model, x, x_adv, y)
        result.x_adv = x_adv
        return result

    def adversarial_examples(self, ctx, x, y):
        raise NotImplementedError

    @classmethod
    def batchnorm_inputs_of(cls, options: dict) -> str:
        # Runs from before `joint_batch` existed made two passes.
        return "clean+adversarial joint" if options.get("joint_batch", False) else "clean+adversarial"

    def _logits(self, model, x, x_adv):
        """Clean and adversarial logits from one forward pass over both batches (`joint_batch`, the default),
        or from two as in the reference code.

        In train mode BatchNorm normalizes each pass with its own batch's statistics: with two passes the
        adversarial batch is normalized with adversarial statistics and the clean one with clean statistics,
        while the running statistics used at test time average the two, so the model is tested as it never
        trained. On the residual network on Fashion-MNIST that left TRADES's robustness masked (AutoAttack
        60.6% where PGD-50×3 found 72.2%; one pass: 76.0% and 77.4%; docs/results.md).
        """
        if self.joint_batch:
            return model(torch.cat([x, x_adv])).chunk(2)
        return model(x), model(x_adv)

    def objective(self, model, x, x_adv, y) -> StepResult:
        raise NotImplementedError


class TRADES(RegularizedAT):
    """Cross-entropy on clean inputs plus β·KL(p(x) ‖ p(x')), x' maximizing that KL in the ε-ball.

    The regularizer trades clean accuracy for a smooth decision boundary; β sets the trade-off.
    Gradients flow through both distributions of the KL term, as in the reference `trades_loss`.
    Examples are generated in **eval mode** (the reference's `model.eval()`), the loss in train mode.

    Defaults and their sources (`train_trades_cifar10.py`, yaodongyu/TRADES):
    - `beta` = 6.0 (`--beta 6.0`, the paper's 1/λ = 6 for CIFAR-10; the paper uses 1.0 for MNIST).
    - `init_std` = 0.001 (start x + 0.001·N(0, 1)).
    - `eps`, `steps`, `step_size`: the protocol's training threat model (CIFAR-10 reference: ε = 0.031,
      10 steps of 0.007). For L2 the steps are along the per-example normalized gradient.
    - `joint_batch` = True: one forward pass over the clean and the adversarial batch (the reference makes
      two; `--separate-batches`). See `_logits`.
    Under bf16 or fp16 autocast the inner maximization's first step runs in fp32 (see below).
    """
    name = "trades"

    def adversarial_examples(self, ctx, x, y):
        # The first step and its target in fp32 whatever the autocast: it climbs the KL from 0.001·N(0, 1)
        # away from x, a change of the logits below bf16's resolution, so in bf16 it follows rounding noise
        # and the whole PGD-10 ends weaker (docs/results.md, "TRADES's first step in bf16"). Later steps start
        # where the KL is large enough for bf16.
        first = min(1, self.steps)
        with attack_mode(ctx.module):
            with torch.autocast(x.device.type, enabled=False):
                with torch.no_grad():
                    target = F.softmax(ctx.module(x), dim=1)
                x_adv = perturb(ctx.module, x, target, self._threat, first, loss_fn=kl_to_target,
                                x_init=self._start(ctx, x))
            return perturb(ctx.module, x, target, self._threat, self.steps - first, loss_fn=kl_to_target,
                           x_init=x_adv)

    def objective(self, model, x, x_adv, y):
        logits_clean, logits_adv = self._logits(model, x, x_adv)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
        return StepResult(F.cross_entropy(logits_clean, y) + self.beta * robust, logits_adv, logits_clean)


class MART(RegularizedAT):
    """Misclassification-aware adversarial training: a boosted cross-entropy on adversarial examples
    plus β·KL(p(x) ‖ p(x')) weighted by 1 − p_y(x), so that misclassified clean examples weigh more.

    Boosted CE = CE(p(x'), y) − log(1 − max_{k≠y} p_k(x')): it also pushes down the strongest wrong class.
    x' is CE-PGD (not KL-PGD). Both gradients flow through p(x), as in the reference `mart_loss`.
    Examples are generated in **eval mode** (the reference's `model.eval()`), the loss in train mode.

    Defaults and their sources (YisenWang/MART):
    - `beta` = 6.0 (`train_wideresnet.py --beta 6.0` and the default of the reference `mart_loss`).
    - `init_std` = 0.001 (start x + 0.001·N(0, 1)); the constants 1.0001 and 1e-12 of the reference loss.
    - `eps`, `steps`, `step_size`: the protocol's. The reference implements L∞ only; for L2 the same
      CE-PGD runs with normalized steps in the L2 ball.
    - `joint_batch` = True, as TRADES's.
    """
    name = "mart"

    def adversarial_examples(self, ctx, x, y):
        with attack_mode(ctx.module):
            return perturb(ctx.module, x, y, self._threat, self.steps, x_init=self._start(ctx, x))

    def objective(self, model, x, x_adv, y):
        # In fp32 whatever the autocast: in bf16, 1.0001 rounds to 1 and p to 1 for a confidently wrong
        # example, so log(1.0001 − p) loses the reference's bound and its gradient reaches 1e12 (NaN weights).
        logits_clean, logits_adv = (logits.float() for logits in self._logits(model, x, x_adv))
        p_adv, p_clean = F.softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1)
        top2 = p_adv.topk(2, dim=1).indices
        runner_up = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])  # the most likely wrong class
        boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), runner_up)
        kl = F.kl_div(torch.log(p_adv + 1e-12), p_clean, reduction="none").sum(1)  # KL(p(x) ‖ p(x'))
        p_true = p_clean.gather(1, y[:, None]).squeeze(1)
        robust = (kl * (1.0000001 - p_true)).mean()
        return StepResult(boosted_ce + self.beta * robust, logits_adv, logits_clean)
