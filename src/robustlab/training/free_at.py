"""Free adversarial training (Shafahi et al. 2019, "Adversarial training for free!")."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from robustlab.attacks import make_threat
from robustlab.errors import RobustlabError
from robustlab.training.methods import Method, StepResult


class FreeAT(Method):
    """Replay each minibatch m times; each replay's single backward pass yields both the parameter
    gradient (for an optimizer step) and the input gradient (for one ascent step on the perturbation).

    The attack costs nothing extra: m replays of a minibatch take m forward/backward passes, as m
    epochs of plain training would. To keep the total work of a run comparable to other methods the
    Trainer runs ⌈epochs / m⌉ epochs (`epochs_for`, as `main_free.py` divides its epoch count by
    `n_repeats`), so `--epochs 10` with m = 8 trains 2 epochs of 8 replays each.

    The perturbation δ is carried over between replays and on to the next minibatch (projected again
    around the new images); it starts at zero, and again whenever the batch size changes (the last,
    smaller minibatch of an epoch) and at the start of every epoch (it lives in `ctx.state`, which the
    Trainer makes per epoch, so that a run resumed at an epoch boundary replays exactly).
    Examples are generated in **train mode**: they are the training forward pass itself. x + δ stays in [0, 1]
    at every replay, as the protocol asks of every iterate and as Wong et al.'s FreeAT does; the authors'
    `main_free.py` clips δ to the ε-ball only and clamps x + δ inside the forward pass (docs/methods.md).

    Defaults and their sources:
    - `replays` m = 8 (the paper's CIFAR-10 choice, "Free (m = 8)"; its ImageNet runs use m = 4).
    - `step_size` = ε (the paper's FGSM step equals ε; `configs.yml`: `fgsm_step` = `clip_eps`).
    - δ starts at zero (`global_noise_data` in `main_free.py`).
    For L2 each ascent step is ε along the per-example normalized gradient, projected onto the L2 ball.
    """
    name = "free-at"
    protocol_fields = ("eps", "norm")

    def __init__(self, eps=0.1, norm="linf", replays=8, step_size=None):
        if int(replays) != replays or replays < 1:
            raise RobustlabError(f"replays must be a positive integer, got {replays}")
        self.eps, self.norm, self.replays = eps, norm, int(replays)
        self.step_size = eps if step_size is None else step_size
        self._threat = make_threat(norm, eps, self.step_size)

    def epochs_for(self, requested: int) -> int:
        return max(1, math.ceil(requested / self.replays))

    def _carried_delta(self, ctx, x):
        delta = ctx.state.get("free_at_delta")
        if delta is None or delta.shape != x.shape:
            return torch.zeros_like(x)
        return self._threat.project(x + delta, x) - x  # keep x + δ inside [0, 1] for the new images

    def train_step(self, ctx, x, y):
        delta = self._carried_delta(ctx, x)
        total = 0.0
        for _ in range(self.replays):
            delta.requires_grad_(True)
            with ctx.autocast():
                logits = ctx.model(x + delta)
                loss = F.cross_entropy(logits, y)
            ctx.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the one backward of this replay: parameter and input gradients together
            with torch.no_grad():
                delta = self._threat.project(self._threat.step(x + delta, delta.grad), x) - x
            ctx.optimizer.step()
            total += loss.detach()
        ctx.state["free_at_delta"] = delta
        return StepResult(total / self.replays, logits.detach())
