"""Black-box transfer: adversarial examples made against one model (the source) and scored on another.

A transfer attack needs no gradient of the attacked model, so it is a check on gradient masking as much as an
attack: if examples from a source model break images that white-box attacks on the target itself left, the
target's gradients hide its weakness (Athalye, Carlini and Wagner 2018; Carlini et al. 2019, "On Evaluating
Adversarial Robustness", §5). Craft them with PGD to its last iterate (`pgd(..., keep_best=False)`): an iterate
just across the source's boundary rarely crosses the target's.
"""
from __future__ import annotations

from typing import Callable


def transfer(source, attack: Callable) -> Callable:
    """An attack with the usual signature `(model, x, y, generator=None)` that runs `attack` against `source`,
    whatever model it is asked to attack; the attacked model is never run, so its gradients play no part."""
    def attack_source(model, x, y, generator=None):
        return attack(source, x, y, generator=generator)
    return attack_source
