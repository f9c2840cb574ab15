"""Adversarial weight perturbation (Wu, Xia & Wang 2020, "Adversarial weight perturbation helps robust
generalization"), on top of PGD-AT and of TRADES."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from robustlab import distributed
from robustlab.errors import RobustlabError
from robustlab.training.methods import PGDAT, StepResult
from robustlab.training.trades import TRADES

# The proxy's SGD learning rate. Irrelevant to the result: each layer's step is rescaled to γ·‖w‖.
PROXY_LR = 1.0


def perturbed_weights(module):
    """The weights AWP perturbs: every trainable `weight` of two or more dimensions (conv and linear
    weights), as the reference's `diff_in_weights`; biases and normalization parameters are left alone."""
    return [(n, p) for n, p in module.named_parameters()
            if p.requires_grad and p.dim() > 1 and n.rsplit(".", 1)[-1] == "weight"]


class AdversarialWeightPerturbation:
    """Mixin for a method with `adversarial_examples(ctx, x, y)` and `objective(model, x, x_adv, y)`.

    Each step: (1) adversarial examples at the current weights w; (2) one ascent step of a proxy copy
    of the model on the method's own objective gives, per layer l, the direction d_l, scaled to a
    relative size v_l = γ·‖w_l‖·d_l/‖d_l‖ (a layer-wise perturbation relative to the weights' norm);
    (3) the objective's gradient is taken at w + v; (4) the weights go back to exactly w (a copy, not
    a subtraction, so no rounding residue builds up) and the optimizer steps with that gradient.
    The proxy is a copy of the model, kept in `ctx.state` with its own SGD optimizer; it runs in train
    mode like the reference's, so its forward passes leave the model's BatchNorm statistics alone.

    AWP is active from the 0-based epoch ⌈awp_warmup · epochs⌉ on (`awp_warmup` is a fraction of the run).
    Deliberate difference from the reference: it restores w after `optimizer.step()` by subtracting
    v, so its weight decay (and momentum) see w + v; here they see w, and the update is
    w ← w − lr·(∇L(w + v) + decay·w), the paper's update with the regularizer taken at w.
    """
    awp_gamma: float
    awp_warmup: float

    def _init_awp(self, awp_gamma, awp_warmup):
        if not awp_gamma >= 0:  # (nan fails every comparison)
            raise RobustlabError(f"awp_gamma must be >= 0, got {awp_gamma}")
        if not 0 <= awp_warmup <= 1:
            raise RobustlabError(f"awp_warmup is a fraction of the epochs in [0, 1], got {awp_warmup}")
        self.awp_gamma, self.awp_warmup = awp_gamma, awp_warmup

    def awp_active(self, ctx) -> bool:
        first = self.awp_first_epoch(ctx.epochs)
        return first is not None and ctx.epoch >= first

    def awp_first_epoch(self, epochs: int) -> int | None:
        """The first 0-based epoch of a run of `epochs` that perturbs the weights; None when none does."""
        first = math.ceil(self.awp_warmup * epochs)
        return first if self.awp_gamma > 0 and first < epochs else None

    def _proxy(self, ctx):
        if "awp_proxy" not in ctx.state:
            proxy = copy.deepcopy(ctx.module)
            ctx.state["awp_proxy"] = (proxy, torch.optim.SGD(proxy.parameters(), lr=PROXY_LR))
        return ctx.state["awp_proxy"]

    def weight_perturbation(self, ctx, x, x_adv, y) -> dict:
        """{parameter name: v} for the current weights, from one proxy ascent step."""
        proxy, proxy_opt = self._proxy(ctx)
        proxy.load_state_dict(ctx.module.state_dict())
        proxy.train()
        with ctx.autocast():
            loss = -self.objective(proxy, x, x_adv, y).loss
        proxy_opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(proxy.parameters(), ctx.share)  # the proxy is not DDP-wrapped: its step needs every rank's examples
        proxy_opt.step()
        moved = dict(proxy.named_parameters())
        with torch.no_grad():
            perturbation = {}
            for name, w in perturbed_weights(ctx.module):
                d = moved[name] - w
                perturbation[name] = self.awp_gamma * w.norm() / (d.norm() + 1e-20) * d
        return perturbation

    def train_step(self, ctx, x, y):
        with ctx.autocast():
            x_adv = self.adversarial_examples(ctx, x, y)
        perturbation = self.weight_perturbation(ctx, x, x_adv, y) if self.awp_active(ctx) else {}
        params = dict(ctx.module.named_parameters())
        originals = {}
        with torch.no_grad():
            for name, v in perturbation.items():
                originals[name] = params[name].detach().clone()
                params[name].add_(v)
        with ctx.autocast():
            result = self.objective(ctx.model, x, x_adv, y)
        ctx.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        with torch.no_grad():
            for name, w in originals.items():
                params[name].copy_(w)
        ctx.optimizer.step()
        return result


class PGDATAWP(AdversarialWeightPerturbation, PGDAT):
    """AT-AWP: PGD adversarial training (see `PGDAT`, examples in eval mode by default) with AWP.

    Defaults and their sources (csdongxian/AWP, `AT_AWP/train_cifar10.py`):
    - `awp_gamma` γ = 0.01 (`--awp-gamma 0.01`, PreAct ResNet-18 on CIFAR-10).
    - `awp_warmup` = 0 (`--awp-warmup 0`: AWP from the first epoch).
    - the PGD settings: the protocol's, as for `pgd-at`, so that AWP is the only difference.
    """
    name = "pgd-at-awp"

    def __init__(self, eps=0.1, norm="linf", steps=10, step_size=0.025, random_start=True, attack_in_eval=True,
                 awp_gamma=0.01, awp_warmup=0.0):
        PGDAT.__init__(self, eps, norm, steps, step_size, random_start, attack_in_eval)
        self._init_awp(awp_gamma, awp_warmup)

    def objective(self, model, x, x_adv, y):
        logits = model(x_adv)
        return StepResult(F.cross_entropy(logits, y), logits)


class TRADESAWP(AdversarialWeightPerturbation, TRADES):
    """TRADES-AWP: TRADES (see `TRADES`, examples in eval mode) with AWP on the TRADES objective.

    Defaults and their sources (csdongxian/AWP, `trades_AWP/train_trades_cifar.py`):
    - `awp_gamma` γ = 0.005 (`--awp-gamma 0.005`, WRN-34-10 on CIFAR-10).
    - `awp_warmup` = 0.045: the reference trains 200 epochs numbered from 1 and perturbs from `epoch >= 10`
      (`--awp-warmup 10`), after 9 warm-up epochs: 9/200. Here a fraction, so that short runs keep the same
      proportion.
    - `beta` = 6.0 and the rest: as `TRADES`.
    """
    name = "trades-awp"

    def __init__(self, eps=0.1, norm="linf", steps=10, step_size=0.025, beta=6.0, init_std=0.001,
                 awp_gamma=0.005, awp_warmup=0.045, joint_batch=True):
        TRADES.__init__(self, eps, norm, steps, step_size, beta, init_std, joint_batch)
        self._init_awp(awp_gamma, awp_warmup)
