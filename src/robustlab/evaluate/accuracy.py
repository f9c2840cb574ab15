"""Clean and adversarial accuracy over an ImageSet, batched, with a fixed-seed attack."""
from __future__ import annotations

from typing import Callable

import torch
from robustlab.progress import progress as progress_bar


@torch.no_grad()
def _predict(model, x):
    return model(x).argmax(1)


def correct_mask(model, images, labels, *, attack: Callable | None = None, batch_size: int = 500,
                 device="cpu", seed: int = 0, progress: str | None = None, show: bool | None = None) -> torch.Tensor:
    """Boolean per example: classified correctly (on the attacked input when `attack` is given).

    `attack(model, x, y, generator=g)` returns adversarial inputs; the generator is seeded once so a
    figure is reproducible. The model's mode is left as the caller had it.
    """
    was_training = model.training
    model.eval()
    g = torch.Generator(device).manual_seed(seed)
    out = []
    starts = range(0, len(labels), batch_size)
    for s in progress_bar(starts, desc=progress, unit="batch", show=False if progress is None else show, leave=False):
        x = images[s:s + batch_size].to(device)
        x = x.float().div(255) if x.dtype == torch.uint8 else x
        y = labels[s:s + batch_size].to(device)
        if attack is not None:
            x = attack(model, x, y, generator=g)
        out.append((_predict(model, x) == y).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def accuracy(model, data, **kwargs) -> float:
    """Accuracy on an ImageSet (uint8 images) under an optional attack; see `correct_mask`."""
    mask = correct_mask(model, data.images, data.labels, **kwargs)
    return mask.float().mean().item() if len(mask) else float("nan")
