"""Training methods: each turns a batch into a loss (and may take over the optimizer step).

A method holds its hyper-parameters only (no model, no global state), so the same object serves
one process or many under DDP. `Batch`-level work goes through `StepContext`, which the Trainer builds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustlab import distributed
from robustlab.attacks import attack_mode, frozen_params, make_threat, perturb


@dataclass
class StepContext:
    """What a method needs besides the batch: the model (maybe DDP-wrapped), the plain module for
    attacks, the optimizer, a seeded generator for random starts, and the autocast context."""
    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    autocast: Callable
    state: dict = field(default_factory=dict)  # per-epoch scratch space a method may keep (e.g. FreeAT's δ)
    epoch: int = 0                             # the epoch being trained (0-based), for warm-ups such as AWP's
    epochs: int = 1                            # the number of epochs the Trainer runs
    progress: float = 0.0                      # fraction of the run done at this step, for a method's own schedules
    run: dict = field(default_factory=dict)    # the method's run-long state (`Method.init_run_state`)
    scaler: torch.amp.GradScaler | None = None  # fp16 only: loss scaling for the base `train_step`
    share: distributed.BatchShare | None = None   # under DDP: this rank's weight, for `distributed.average_gradients`


@dataclass
class StepResult:
    loss: torch.Tensor
    logits: torch.Tensor          # on the examples the loss was trained on
    logits_clean: torch.Tensor | None = None
    x_adv: torch.Tensor | None = None  # the adversarial examples, for methods that reuse them (Generalist)


class Method:
    name = "base"
    adversarial = True
    # What the model's BatchNorm layers see in train mode, so its running statistics describe: "adversarial",
    # "clean", "clean+adversarial" (a clean and an adversarial pass per batch) or "clean+adversarial joint" (one
    # pass over both). RiFT's --bn recalibrate uses it.
    batchnorm_inputs = "adversarial"
    # The protocol's training-threat fields that `make_method` fills in when not given: a method whose
    # defaults come from its paper instead (Fast-AT's step 1.25·ε, FreeAT's step ε) leaves them out.
    protocol_fields = ("eps", "norm", "steps", "step_size")
    # Options a resumed run may change because they decide when to stop, not what an epoch computes.
    resumable_changes: tuple[str, ...] = ()
    # The validation figure that picks the best epoch (best.safetensors).
    selected_by = "val_robust"

    def loss(self, ctx: StepContext, x, y) -> StepResult:
        raise NotImplementedError

    def train_step(self, ctx: StepContext, x, y) -> StepResult:
        """One optimizer step. Methods that replay batches or perturb weights override this."""
        with ctx.autocast():
            result = self.loss(ctx, x, y)
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.scaler is None:
            result.loss.backward()
            ctx.optimizer.step()
        else:
            ctx.scaler.scale(result.loss).backward()
            ctx.scaler.step(ctx.optimizer)
            ctx.scaler.update()
        return result

    def epochs_for(self, requested: int) -> int:
        """Epochs the Trainer runs when `requested` are asked for. A method that takes several optimizer
        steps per minibatch (FreeAT) runs fewer, so that the total number of passes stays comparable."""
        return requested

    def should_stop(self, metrics: dict, best: dict) -> str | None:
        """Called after each epoch with its metrics and the best epoch so far (by `selected_by`): a one-line
        reason to stop training early, or None to go on."""
        return None

    @classmethod
    def batchnorm_inputs_of(cls, options: dict) -> str:
        """`batchnorm_inputs` of a run trained with these method options (a checkpoint's `method` metadata)."""
        return cls.batchnorm_inputs

    def init_run_state(self, model: nn.Module, config) -> dict:
        """State kept for the whole run besides the Trainer's model and optimizer (e.g. more learners): a dict
        of modules, optimizers and JSON-able values. The Trainer passes it to every step as `ctx.run`, saves
        it in every checkpoint and restores it on resume. `model` is the Trainer's, already on its device."""
        return {}

    def eval_model(self, run: dict) -> nn.Module | None:
        """The weights to validate and export when they are not the Trainer's model (or its EMA)."""
        return None

    def config(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class Standard(Method):
    """Plain training on clean inputs (the undefended baseline)."""
    name = "standard"
    adversarial = False
    batchnorm_inputs = "clean"
    selected_by = "val_clean"  # by robust accuracy, an undefended run kept its first, least trained epoch

    def loss(self, ctx, x, y):
        logits = ctx.model(x)
        return StepResult(F.cross_entropy(logits, y), logits)


class PGDAT(Method):
    """Madry et al. 2018: minimize the cross-entropy on PGD examples.

    Examples are generated with the model in eval mode (`attack_in_eval=True`, as in the TRADES and
    MART reference code), so BatchNorm statistics are not updated by attack forward passes; set it to
    False to generate in train mode (Madry's and Rice et al.'s code).
    """
    name = "pgd-at"

    def __init__(self, eps=0.1, norm="linf", steps=10, step_size=0.025, random_start=True, attack_in_eval=True):
        self.eps, self.norm, self.steps, self.step_size = eps, norm, steps, step_size
        self.random_start, self.attack_in_eval = random_start, attack_in_eval
        self._threat = make_threat(norm, eps, step_size)

    def adversarial_examples(self, ctx, x, y):
        guard = attack_mode(ctx.module) if self.attack_in_eval else frozen_params(ctx.module)
        with guard:
            return perturb(ctx.module, x, y, self._threat, self.steps,
                           random_start=self.random_start, generator=ctx.generator)

    def loss(self, ctx, x, y):
        x_adv = self.adversarial_examples(ctx, x, y)
        logits = ctx.model(x_adv)
        return StepResult(F.cross_entropy(logits, y), logits, x_adv=x_adv)

