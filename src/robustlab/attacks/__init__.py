"""Attacks on models that map inputs in [0, 1] to logits.

Functions take `(model, x, y, *, eps, ...)` and return adversarial inputs inside the ε-ball and [0, 1].
They run the model in eval mode (restoring the caller's mode) and never touch parameter gradients.
"""
from robustlab.attacks.pgd import attack_mode, cross_entropy, fgm, fgsm, frozen_params, perturb, pgd
from robustlab.attacks.threat import NORMS, L2Ball, LinfBall, make_threat, within_ball

ATTACKS = {"fgsm": fgsm, "fgm": fgm, "pgd": pgd}

__all__ = ["ATTACKS", "NORMS", "L2Ball", "LinfBall", "attack_mode", "cross_entropy", "fgm", "fgsm",
           "frozen_params", "make_threat", "perturb", "pgd", "within_ball"]
