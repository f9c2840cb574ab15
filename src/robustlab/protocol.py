"""Threat-model defaults of the evaluation protocol (shared/PROTOCOL.md), per dataset and norm.

Training: Madry et al. 2018 settings (PGD-40 step 0.01 for MNIST, PGD-10 step 2/255 for CIFAR);
Fashion-MNIST follows the same recipe scaled to ε = 0.1. Evaluation: stronger PGD with restarts.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from robustlab.errors import RobustlabError, check_choice


@dataclass(frozen=True)
class Budget:
    eps: float
    steps: int
    step_size: float
    restarts: int = 1


@dataclass(frozen=True)
class ThreatDefaults:
    train: Budget
    eval: Budget


_CIFAR = {
    "linf": ThreatDefaults(Budget(8 / 255, 10, 2 / 255), Budget(8 / 255, 20, 2 / 255)),
    "l2": ThreatDefaults(Budget(0.5, 10, 0.125), Budget(0.5, 20, 0.0625)),
}
_FMNIST = {
    "linf": ThreatDefaults(Budget(0.1, 10, 0.025), Budget(0.1, 50, 0.01, restarts=3)),
    "l2": ThreatDefaults(Budget(1.5, 10, 0.375), Budget(1.5, 50, 0.15, restarts=3)),
}
_MNIST = {
    "linf": ThreatDefaults(Budget(0.3, 40, 0.01), Budget(0.3, 100, 0.01)),
    "l2": ThreatDefaults(Budget(2.0, 40, 0.1), Budget(2.0, 100, 0.1)),  # not in the protocol table
}
# Image folders and .npy arrays (CIFAR-10-C, ImageNet subsets) are natural images of unknown origin: CIFAR's
# budget, the customary one for such images, until --eps says otherwise.
PROTOCOL = {"fashion-mnist": _FMNIST, "mnist": _MNIST, "cifar10": _CIFAR, "cifar100": _CIFAR,
            "folder": _CIFAR, "npy": _CIFAR}


def step_for(budget: Budget, eps: float | None = None, steps: int | None = None) -> float:
    """The step size of `budget` with ε or the step count changed: 2.5·ε/steps for another step count (Madry et
    al.'s rule, which the protocol's training steps follow), else the budget's step scaled with ε, so that a larger
    ε never gets a step too short to reach its edge (10 steps of 0.025 cannot cross ε = 2). The budget's own step
    count keeps its step: `--steps 50` spelled out is the protocol's PGD-50, step 0.01, not 0.005."""
    eps = budget.eps if eps is None else eps
    if steps is not None and steps != budget.steps:
        return 2.5 * eps / steps
    return budget.step_size * (eps / budget.eps)  # (ε/ε is exactly 1)


def threat_defaults(dataset: str, norm: str) -> ThreatDefaults:
    check_choice("dataset", dataset, PROTOCOL)
    check_choice("norm", norm, ("linf", "l2"))
    return PROTOCOL[dataset][norm]


def largest_radius(norm: str, input_shape=None) -> float | None:
    """The radius at which every image is reachable: 1 in L∞ (the pixel range); in L2 the distance between an
    all-black and an all-white image of `input_shape` (C, H, W), √(C·H·W), the largest between any two images with
    pixels in [0, 1] (28 for 1×28×28, 55.4 for 3×32×32); None in L2 without a shape (embeddings have no bound)."""
    if norm == "linf":
        return 1.0
    return math.sqrt(math.prod(input_shape)) if input_shape else None


def check_eps(eps, norm: str, name: str, input_shape=None):
    """ε is a finite radius ≥ 0 in pixel scale; in L∞ one above 1 is no threat model: inputs live in [0, 1], so at
    ε = 1 every image is reachable. With `input_shape` (C, H, W), the same holds in L2 beyond `largest_radius`."""
    if eps is None:
        return
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps >= 0):
        raise RobustlabError(f"{name} must be a finite number >= 0 (a radius in pixel scale), got {eps!r}")
    if norm == "linf" and eps > 1:
        raise RobustlabError(f"{name} {eps:g}: an L∞ radius above 1 exceeds the pixel range [0, 1], where ε = 1 already "
                             "reaches every image; give at most 1 (ε is in pixel scale, e.g. 0.1 or 8/255 = 0.031)")
    if norm == "l2" and input_shape and eps > (diameter := largest_radius(norm, input_shape)):
        shape = "×".join(map(str, input_shape))
        raise RobustlabError(f"{name} {eps:g}: an L2 radius above {diameter:.4g} exceeds the distance between an "
                             f"all-black and an all-white {shape} image, where every image is already reachable; give at "
                             f"most {diameter:.4g} (ε is in pixel scale, e.g. 1.5 for 1×28×28 or 0.5 for 3×32×32)")
