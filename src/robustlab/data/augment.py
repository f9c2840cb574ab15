"""Batch augmentation on tensors: random crop after zero padding, optionally with horizontal flip.

Done on the whole batch with one gather (no loop over examples, no PIL) so that it costs a
fraction of a training step and runs on whatever device the batch lives on. All randomness comes
from `generator`, drawn on the generator's device, so a seeded run is reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import RobustlabError, check_choice

AUGMENTATIONS = ("none", "crop", "crop-flip")


def default_padding(height: int) -> int:
    """2 pixels for 28×28 images, 4 for 32×32 (the customary MNIST and CIFAR settings)."""
    return 2 if height <= 28 else 4


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator | None = None,
                  padding: int | None = None) -> torch.Tensor:
    """Augment a batch N×C×H×W; returns a new tensor of the same shape ("none" returns `x`).

    "crop": shift each example by a random (dy, dx) in [-padding, padding], filling with zeros.
    "crop-flip": the same, then mirror each example left-right with probability 1/2.
    """
    check_choice("augmentation", kind, AUGMENTATIONS)
    if x.dim() != 4:
        raise RobustlabError(f"augment_batch expects an N×C×H×W batch, got shape {tuple(x.shape)}")
    if kind == "none":
        return x
    n, c, h, w = x.shape
    p = default_padding(h) if padding is None else padding
    if p < 0:
        raise RobustlabError(f"padding must be >= 0, got {p}")

    # Draw on the generator's device (so results do not depend on where x lives), then move.
    rng_device = generator.device if generator is not None else torch.device("cpu")
    dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=rng_device).to(x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if kind == "crop-flip":
        flip = (torch.rand(n, generator=generator, device=rng_device) < 0.5).to(x.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    # Flat index into the padded image: row (dy + i) times its width plus column (dx + j).
    hp, wp = h + 2 * p, w + 2 * p
    rows = (dy[:, None] + torch.arange(h, device=x.device)) * wp  # N×H
    cols = dx[:, None] + cols  # N×W
    index = (rows[:, :, None] + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    padded = F.pad(x, (p, p, p, p)).view(n, c, hp * wp)
    return padded.gather(2, index).view(n, c, h, w)
