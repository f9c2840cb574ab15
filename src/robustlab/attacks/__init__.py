"""Attacks on models that map inputs in [0, 1] to logits.

Functions take `(model, x, y, *, eps, ...)` with x in [0, 1] (other inputs are refused) and return adversarial
inputs inside the ε-ball and [0, 1].
They run the model in eval mode (restoring the caller's mode) and never touch parameter gradients.
"""
from robustlab.attacks.pgd import (attack_mode, cross_entropy, fgm, fgsm, first_success, frozen_params, perturb,
                                   pgd)
from robustlab.attacks.threat import NORMS, L2Ball, LinfBall, make_threat, within_ball
from robustlab.attacks.apgd import apgd, apgd_targeted, dlr_loss, dlr_targeted_loss
from robustlab.attacks.fab import fab_targeted
from robustlab.attacks.square import square
from robustlab.attacks.smooth import negative_margin, pgd_smooth, smooth_relu_gradients
from robustlab.attacks.autoattack import AutoAttackResult, autoattack, autoattack_accuracy
from robustlab.attacks.transfer import transfer

ATTACKS = {"fgsm": fgsm, "fgm": fgm, "pgd": pgd, "apgd": apgd, "apgd-t": apgd_targeted, "fab-t": fab_targeted,
           "square": square, "pgd-smooth": pgd_smooth}

__all__ = ["ATTACKS", "AutoAttackResult", "NORMS", "L2Ball", "LinfBall", "apgd", "apgd_targeted", "attack_mode",
           "autoattack", "autoattack_accuracy", "cross_entropy", "dlr_loss", "dlr_targeted_loss", "fab_targeted",
           "fgm", "fgsm", "first_success", "frozen_params", "make_threat", "negative_margin", "perturb", "pgd", "pgd_smooth",
           "smooth_relu_gradients", "square", "transfer", "within_ball"]
