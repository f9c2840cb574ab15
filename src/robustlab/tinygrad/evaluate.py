"""Clean and adversarial accuracy of a tinygrad model over robustlab data (uint8 ImageSets)."""
from __future__ import annotations

from typing import Callable

import numpy as np
from robustlab.progress import progress as progress_bar
from robustlab.tinygrad.backend import require

require()
from tinygrad import Context, Tensor  # noqa: E402

from robustlab.tinygrad.attacks import check_logits  # noqa: E402


def to_numpy(t) -> np.ndarray:
    """A torch tensor, tinygrad Tensor or array as a numpy array."""
    if isinstance(t, Tensor):
        return t.numpy()
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def as_pixels(images) -> np.ndarray:
    """uint8 images (robustlab's storage) as float32 in [0, 1]; float images as they are."""
    array = to_numpy(images)
    return array.astype(np.float32) / 255 if array.dtype == np.uint8 else array.astype(np.float32)


def predict(model, x) -> np.ndarray:
    """Predicted classes, with the model in eval mode (TRAINING=0)."""
    with Context(TRAINING=0):
        logits = model(x if isinstance(x, Tensor) else Tensor(np.ascontiguousarray(x, np.float32)))
        return check_logits(logits).argmax(1).numpy()


def correct_mask(model, images, labels, *, attack: Callable | None = None, batch_size: int = 500, seed: int = 0,
                 progress: str | None = None, show: bool | None = None) -> np.ndarray:
    """Boolean per example: classified correctly; with an `attack`, both on the clean input and on the attacked one
    (as robustlab.evaluate.correct_mask).

    `attack(model, x, y, seed=s)` returns adversarial inputs; batch i is attacked with seed
    `seed + i`, so a figure is reproducible for a given batch size.
    """
    labels = to_numpy(labels)
    out = []
    starts = range(0, len(labels), batch_size)
    bar = progress_bar(starts, desc=progress, unit="batch", show=False if progress is None else show, leave=False)
    for i, s in enumerate(bar):
        x, y = as_pixels(images[s:s + batch_size]), labels[s:s + batch_size]
        right = np.ones(len(y), dtype=bool)
        if attack is not None:
            right = predict(model, x) == y
            x = to_numpy(attack(model, x, y, seed=seed + i))
        out.append(right & (predict(model, x) == y))
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def accuracy(model, data, **kwargs) -> float:
    """Accuracy on an ImageSet (or anything with .images and .labels) under an optional attack."""
    mask = correct_mask(model, data.images, data.labels, **kwargs)
    return float(mask.mean()) if len(mask) else float("nan")
