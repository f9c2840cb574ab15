"""Generalist (Wang & Wang, CVPR 2023, "Generalist: Decoupling Natural and Robust Generalization").

Two base learners of one architecture train on their own objectives, each with its own optimizer: the
adversarial learner (the Trainer's model and optimizer, trained by PGD-AT or TRADES) and the natural
learner (clean cross-entropy). A global learner, an exponential moving average of a β-mix of the two,
is what gets validated and exported; from epoch t′ on, every c epochs, it is copied back into both.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn.functional as F

from robustlab import distributed
from robustlab.errors import RobustlabError, check_choice
from robustlab.models import batch_norms
from robustlab.training.methods import PGDAT, Method
from robustlab.training.schedules import SCHEDULES, learning_rate
from robustlab.training.trades import TRADES
from robustlab.training.trainer import make_optimizer

# The reference's c = 5 of its 120 epochs: short runs scale it to the run's length (at least 1).
REFERENCE_EPOCHS, REFERENCE_EVERY = 120, 5


def mixing_ratio(progress: float, start: float, final: float) -> float:
    """β at `progress` ∈ [0, 1] of the run: 1 until `start`, then linear to `final` at the end."""
    if progress <= start or start >= 1:
        return 1.0
    return 1.0 + (final - 1.0) * (progress - start) / (1.0 - start)


def warmed_up(decay: float, updates: int) -> float:
    """γ after `updates` earlier updates: min(γ, (1 + t) / (10 + t)), the reference's warm-up, so the
    average is not dominated by the initialization for its first thousand steps."""
    return min(decay, (1 + updates) / (10 + updates))


GLOBAL_BN = ("mix", "adversarial", "own")


@torch.no_grad()
def mix_into(global_model, adversarial, natural, decay: float, beta: float, global_bn: str = "mix"):
    """θ_g ← γ·θ_g + (1 − γ)·(β·θ_adv + (1 − β)·θ_nat) over parameters. Floating-point buffers (BatchNorm's
    running statistics) are mixed the same way with `global_bn="mix"` (the paper), averaged from the
    adversarial learner alone (β = 1) with `global_bn="adversarial"`, and left alone with `global_bn="own"`
    (the global learner estimates them itself: `Generalist.train_step`). Integer buffers (BatchNorm's batch
    counter) cannot be averaged: they follow the adversarial learner, unless the statistics are the global's own."""
    buffers = {name for name, _ in global_model.named_buffers()} if global_bn != "mix" else set()
    learners = zip(global_model.state_dict().items(), adversarial.state_dict().values(), natural.state_dict().values())
    for (name, g), a, n in learners:
        if global_bn == "own" and name in buffers:
            continue
        if not g.is_floating_point():
            g.copy_(a)
            continue
        mix = 1.0 if global_bn == "adversarial" and name in buffers else beta
        g.mul_(decay).add_(a, alpha=(1 - decay) * mix)
        if mix != 1.0:
            g.add_(n, alpha=(1 - decay) * (1 - mix))


@torch.no_grad()
def own_statistics(global_model, x_adv, autocast):
    """One train-mode forward pass of the global learner: its BatchNorm layers fold the batch's statistics into
    their running averages; its weights have no gradients and do not change."""
    global_model.train()
    with autocast():
        global_model(x_adv)
    global_model.eval()


def redistribute(global_model, *learners):
    """Copy the global learner's weights and buffers into the base learners (optimizer states are kept)."""
    state = global_model.state_dict()
    for learner in learners:
        learner.load_state_dict(state)


class Generalist(Method):
    """Decoupled natural and adversarial base learners, mixed into a global learner.

    Each step: (1) the adversarial learner takes a step of `adv_loss` (PGD-AT or TRADES, the existing
    methods), its examples generated against itself in **eval mode** (as the reference's PGD, which calls
    `model.eval()`); (2) the natural learner takes a clean cross-entropy step on the same batch; (3) the
    global learner moves: θ_g ← γ·θ_g + (1 − γ)·(β·θ_adv + (1 − β)·θ_nat), parameters and BatchNorm buffers.
    γ warms up as min(γ, (1 + t)/(10 + t)); β is 1 until `mix_start` of the run, then linear to `mix_final`.
    At the start of each redistribution epoch the global learner is copied into both base learners.
    The global learner is validated, chosen as best epoch, and exported; checkpoints hold all three learners
    and both optimizers. The three start from the same initialization, so that their weights can be mixed.

    The Trainer's options (`--lr`, `--schedule`, `--weight-decay`, `--optimizer`, `--momentum`) are the
    adversarial learner's, as for `pgd-at`; the natural learner has `nat_lr`, `nat_schedule` (both
    defaulting to the adversarial learner's, as the reference uses one learning rate for both) and
    `nat_weight_decay`, with the same kind of optimizer.

    Defaults and their sources (PKU-ML/Generalist, `main.py`, ResNet-18 on CIFAR-10, 120 epochs):
    - `global_decay` γ = 0.999 with the warm-up above (`EMA(alpha=0.999)`).
    - `mix_final` = 0.4, `mix_start` = 2/3 (`adjust_beta`: 1 until epoch 80 of 120, then linear to 0.4).
    - `redistribute_from` = 0.625 and `redistribute_every` = 5 epochs of 120 (`epoch >= 75 and epoch % 5 == 0`),
      as fractions of the run: the first redistribution is at epoch round(0.625·E) (counting from 1), then
      every max(1, round(5·E/120)) epochs; `redistribute_every` = 0 turns redistribution off.
    - `nat_weight_decay` = 5e-4 (`optimizer_ST`). The reference's adversarial learner uses 3.5e-3 for
      ResNet-18 and 7e-4 for its other networks (smallcnn, WRN); here that is `--weight-decay` (robustlab's
      default 5e-4, so that the adversarial learner is exactly `pgd-at`'s unless asked otherwise).
    - `adv_loss` = "pgd-at" (the reference's PGD-10 cross-entropy; its TRADES loss is in comments).
      `beta` is TRADES's β (6.0) and applies to `adv_loss="trades"` only.
    - The reference schedule is piecewise linear (lr, lr, lr/10, lr/100 at 0, E/3, 2E/3, E, lr = 0.01);
      here it is the Trainer's `--schedule` (one-cycle by default), so Generalist and PGD-AT share it.

    `global_bn="adversarial"` (not in the paper) averages the global learner's BatchNorm running statistics
    from the adversarial learner alone, while its weights (BatchNorm's affine ones included) are mixed as
    above. On a PGD-AT residual network, clean-image statistics alone took PGD-10 accuracy from 79% to 1%
    (docs/results.md, RiFT section), and mixing in the natural learner's statistics is one way to get there.
    `global_bn="own"` (not in the paper either) gives the global learner statistics of its own weights: after
    each mixing step it runs a forward pass in train mode, without gradients, on the adversarial learner's
    examples of that step, so its running averages describe its own activations on adversarial inputs (as
    SWA re-estimates the statistics of its weight average; here on the inputs the robustness is about). It
    costs one forward pass per step.

    Deliberate differences from the reference, each for a stated reason:
    - Redistribution happens once, at the start of each redistribution epoch, as the paper describes; the
      reference code copies the global learner into both learners after every iteration of those epochs.
      `redistribute_per_step=True` does that instead.
    - The global learner mixes the base learners themselves, as the paper's formula; the reference mixes
      their own EMAs (γ = 0.999 each), an average of averages that lags further behind.
    - The natural learner does not train while its weights cannot reach the global learner: before the
      first redistribution, if β is still 1 until then (the defaults), since that redistribution overwrites
      it. Its result is unchanged, apart from its momentum starting at that redistribution; its cost is saved.
    """
    name = "generalist"
    batchnorm_inputs = "clean+adversarial"  # the global learner's statistics mix the two base learners'

    @classmethod
    def batchnorm_inputs_of(cls, options: dict) -> str:
        """What the global learner's statistics were measured on, by `global_bn`: both learners' inputs when
        mixed, the adversarial learner's own, or the global learner's pass on adversarial examples."""
        global_bn = options.get("global_bn", "mix")
        if global_bn == "adversarial":
            return "clean+adversarial joint" if options.get("adv_loss") == "trades" else "adversarial"
        return "adversarial" if global_bn == "own" else cls.batchnorm_inputs

    def __init__(self, eps=0.1, norm="linf", steps=10, step_size=0.025, adv_loss="pgd-at", beta=None,
                 mix_final=0.4, mix_start=2 / 3, global_decay=0.999, redistribute_from=0.625, redistribute_every=None,
                 redistribute_per_step=False, nat_lr=None, nat_weight_decay=5e-4, nat_schedule=None, global_bn="mix"):
        check_choice("adv_loss", adv_loss, ("pgd-at", "trades"))
        check_choice("global_bn", global_bn, GLOBAL_BN)
        for name, value in (("mix_final", mix_final), ("mix_start", mix_start), ("redistribute_from", redistribute_from)):
            if not 0 <= value <= 1:
                raise RobustlabError(f"{name} must be in [0, 1] (a mixing ratio or a fraction of the run), got {value}")
        if not 0 < global_decay < 1:
            raise RobustlabError(f"global_decay (the global learner's EMA decay γ) must be in (0, 1), got {global_decay}")
        if redistribute_every is not None and (int(redistribute_every) != redistribute_every or redistribute_every < 0):
            raise RobustlabError(f"redistribute_every is a number of epochs >= 0 (0: never), got {redistribute_every}")
        if nat_lr is not None and not nat_lr > 0:
            raise RobustlabError(f"nat_lr must be > 0, got {nat_lr}")
        if not nat_weight_decay >= 0:
            raise RobustlabError(f"nat_weight_decay must be >= 0, got {nat_weight_decay}")
        if nat_schedule is not None:
            check_choice("nat_schedule", nat_schedule, SCHEDULES)
        if beta is not None and adv_loss != "trades":
            raise RobustlabError("beta is TRADES's weight: it needs --adv-loss trades (the mixing ratio is --mix-final)")
        self.eps, self.norm, self.steps, self.step_size = eps, norm, steps, step_size
        self.adv_loss = adv_loss
        self.beta = (6.0 if beta is None else beta) if adv_loss == "trades" else None
        self.mix_final, self.mix_start, self.global_decay = mix_final, mix_start, global_decay
        self.redistribute_from = redistribute_from
        self.redistribute_every = None if redistribute_every is None else int(redistribute_every)
        self.redistribute_per_step = bool(redistribute_per_step)
        self.nat_lr, self.nat_weight_decay, self.nat_schedule = nat_lr, nat_weight_decay, nat_schedule
        self.global_bn = global_bn
        self._adversarial = (TRADES(eps, norm, steps, step_size, beta=self.beta) if adv_loss == "trades"
                             else PGDAT(eps, norm, steps, step_size))

    # -- schedules ---------------------------------------------------------------------------------
    def redistribution_epochs(self, epochs: int) -> list[int]:
        """The epochs (0-based) at whose start the global learner is copied into both base learners."""
        every = self.redistribute_every
        if every is None:
            every = max(1, round(REFERENCE_EVERY * epochs / REFERENCE_EPOCHS))
        if every == 0:
            return []
        first = max(1, int(self.redistribute_from * epochs + 0.5))  # counted from 1, as the paper's t′
        return [n - 1 for n in range(first, epochs + 1, every)]

    def _natural_idle(self, ctx) -> bool:
        """True while the natural learner's weights cannot reach the global learner (see the class notes)."""
        epochs = self.redistribution_epochs(ctx.epochs)
        return bool(epochs) and ctx.epoch < epochs[0] and epochs[0] / ctx.epochs <= self.mix_start

    # -- the run -----------------------------------------------------------------------------------
    def init_run_state(self, model, config):
        if config.ema:
            raise RobustlabError("generalist exports its global learner, already a weight average: leave out --ema")
        if self.global_bn != "mix" and not batch_norms(model):
            raise RobustlabError(f"global_bn {self.global_bn} chooses the global learner's BatchNorm statistics, but the "
                                 "model has no BatchNorm layers, so it would change nothing; leave it out")
        natural = copy.deepcopy(model)
        nat_config = replace(config, lr=self.nat_lr or config.lr, weight_decay=self.nat_weight_decay)
        global_model = copy.deepcopy(model).eval()
        for p in global_model.parameters():
            p.requires_grad_(False)
        return {"natural": natural, "natural_optimizer": make_optimizer(nat_config, natural.parameters()),
                "global": global_model, "global_updates": 0,
                "nat_lr": nat_config.lr, "nat_schedule": self.nat_schedule or config.schedule}

    def eval_model(self, run):
        return run.get("global")

    def loss(self, ctx, x, y):
        return self._adversarial.loss(ctx, x, y)

    def train_step(self, ctx, x, y):
        run = ctx.run
        natural, global_model = run["natural"], run["global"]
        first_step = "generalist_started" not in ctx.state  # ctx.state is new every epoch
        ctx.state["generalist_started"] = True
        redistributing = ctx.epoch in self.redistribution_epochs(ctx.epochs)
        if redistributing and first_step and not self.redistribute_per_step:
            redistribute(global_model, ctx.module, natural)

        result = super().train_step(ctx, x, y)  # the adversarial learner: the Trainer's model and optimizer

        if not self._natural_idle(ctx):
            optimizer = run["natural_optimizer"]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(run["nat_schedule"], run["nat_lr"], ctx.progress)
            natural.train()
            with ctx.autocast():
                loss = F.cross_entropy(natural(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(natural.parameters(), ctx.share)  # the natural learner is not DDP-wrapped
            optimizer.step()

        decay = warmed_up(self.global_decay, run["global_updates"])
        # β for the whole epoch at its 1-based number, as the reference's adjust_beta(epoch): moving it per step
        # lagged up to an epoch behind (at 5 epochs, 0.58 on average in the last one instead of 0.4)
        beta = mixing_ratio((ctx.epoch + 1) / ctx.epochs, self.mix_start, self.mix_final)
        mix_into(global_model, ctx.module, natural, decay, beta, self.global_bn)
        if self.global_bn == "own":
            own_statistics(global_model, result.x_adv.detach(), ctx.autocast)
        run["global_updates"] += 1
        if redistributing and self.redistribute_per_step:  # as the reference: after every step's mix
            redistribute(global_model, ctx.module, natural)
        return result
