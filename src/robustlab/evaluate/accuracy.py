"""Clean and adversarial accuracy over an ImageSet, batched, with a fixed-seed attack."""
from __future__ import annotations

import math
from typing import Callable

import torch

from robustlab import distributed
from robustlab.attacks.threat import check_in_box, check_label_vector, check_labels, check_model_takes
from robustlab.data.datasets import images_and_labels
from robustlab.errors import RobustlabError, check_integer
from robustlab.models import eval_mode, model_device
from robustlab.progress import progress as progress_bar


def correct_mask(model, images, labels, *, attack: Callable | None = None, batch_size: int = 500,
                 device=None, seed: int = 0, progress: str | None = None, show: bool | None = None,
                 keep: Callable | None = None) -> torch.Tensor:
    """Boolean per example: classified correctly; with an `attack`, classified correctly both on the clean input
    and on the attacked one (robust accuracy's definition, and AutoAttack's: an attack that returned an input the
    model gets right, for an image it gets wrong, must not make that image count as robust).

    `attack(model, x, y, generator=g)` returns adversarial inputs; each batch's generator is seeded from
    (seed, batch index), so a figure is reproducible and the same when the batches are shared out over
    the ranks of a torchrun job (each rank takes every W-th batch; the masks are gathered exactly).
    The model's mode is left as the caller had it. Batches go to `device`, by default the model's.
    `keep(rows, x, predicted)`, if given, receives each batch's rows (a slice), its inputs (attacked, with an
    attack) and the model's predictions on them: the examples behind the mask.
    """
    if len(images) != len(labels):
        raise RobustlabError(f"{len(images)} images but {len(labels)} labels")
    check_integer("batch_size", batch_size)  # 0 divided by zero in the batch count
    if isinstance(images, torch.Tensor) and images.is_floating_point():  # else a wrong clean accuracy, without a word
        check_in_box(images, "float images")
    check_label_vector(labels)
    device = device or model_device(model)
    n = len(labels)
    mask = torch.zeros(n, dtype=torch.uint8)
    batches = distributed.my_batches(math.ceil(n / batch_size))
    show = False if progress is None or not distributed.is_main() else show
    with eval_mode(model):
        for i, b in enumerate(progress_bar(batches, desc=progress, unit="batch", show=show, leave=False)):
            rows = slice(b * batch_size, (b + 1) * batch_size)
            x = images[rows].to(device)
            x = x.float().div(255) if x.dtype == torch.uint8 else x
            if i == 0:  # every batch has the images' type: one check (its probe pass, where it needs one) is enough
                check_model_takes(model, x)
            y = labels[rows].to(device)
            with torch.no_grad():
                logits = model(x)
            check_labels(logits, y)  # a label beyond the outputs counted as a wrong prediction, without a word
            right = logits.argmax(1) == y
            if attack is not None:  # then right on the clean input and on the attacked one
                x = attack(model, x, y, generator=torch.Generator(device).manual_seed(seed + b * 1_000_003))
                with torch.no_grad():
                    logits = model(x)
            predicted = logits.argmax(1)
            if keep is not None:
                keep(rows, x, predicted)
            mask[rows] = (right & (predicted == y)).cpu()
    return distributed.all_max(mask).bool()


def fraction(mask) -> float:
    """The share of True entries as the exact k/n (a float32 mean would write 355/500 as 0.70999998); nan when empty."""
    return int(mask.sum()) / len(mask) if len(mask) else float("nan")


def accuracy(model, data, **kwargs) -> float:
    """Accuracy on an ImageSet (uint8 images), or on an (images, labels) pair of tensors (uint8, or float in
    [0, 1]), under an optional attack; see `correct_mask`."""
    images, labels = images_and_labels(data, "accuracy")
    return fraction(correct_mask(model, images, labels, **kwargs))
