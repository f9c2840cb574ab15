"""Learning-rate schedules as pure functions of training progress, so a resumed run needs no scheduler state."""
from __future__ import annotations

import math

from robustlab.errors import check_choice

SCHEDULES = ("constant", "piecewise", "cosine", "one-cycle")


def learning_rate(schedule: str, base_lr: float, progress: float, *, peak_at: float = 0.4,
                  milestones=(0.5, 0.75), gamma: float = 0.1) -> float:
    """Learning rate at `progress` ∈ [0, 1] (epochs done / total epochs, fractional within an epoch).

    one-cycle: linear 0 → base_lr at `peak_at`, then linear → 0 (the cyclic schedule of Wong et al. 2020; 0.4 as
    their MNIST script, whose CIFAR-10 script peaks at 0.5).
    piecewise: base_lr, multiplied by `gamma` at each milestone (Madry et al.; Rice et al. 2020).
    """
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return 0.5 * base_lr * (1 + math.cos(math.pi * progress))
    if schedule == "one-cycle":
        if progress < peak_at:
            return base_lr * progress / peak_at
        return base_lr * max(0.0, (1 - progress) / (1 - peak_at))
    return base_lr * gamma ** sum(progress >= m for m in milestones)
