"""Reader for CIFAR-10-C style corruption sets: one (5·N)×H×W×3 uint8 .npy per corruption.

Rows (s-1)·N : s·N hold severity s. Arrays are memory-mapped so that only the requested
corruptions and severities are read from disk.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import RobustlabError, is_integer
from .datasets import ImageSet

SEVERITIES = (1, 2, 3, 4, 5)
_HOW_TO_GET = ("download CIFAR-10-C (https://zenodo.org/record/2535967), unpack it and pass "
               "the folder holding labels.npy")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RobustlabError(f"cannot read {path}: {exc}; "
                             "delete it and unpack the archive again") from None


def check_severities(severities, allow_empty: bool = False) -> tuple[int, ...]:
    """A collection of levels among 1..5 (read once: a generator too), as a tuple of ints; 3.0 == 3, but a float
    is no level (it would key a result as 3.0), nor a bool."""
    if isinstance(severities, (str, numbers.Number)) or not isinstance(severities, Iterable):
        raise RobustlabError(f"severities is a list of levels among 1..5, got {severities!r}")
    severities = tuple(severities)
    if [s for s in severities if not is_integer(s) or s not in SEVERITIES] or not (severities or allow_empty):
        raise RobustlabError(f"severities must be among 1..5, got {list(severities)}")
    return tuple(int(s) for s in severities)


def cifar_c_folder(data_dir: str | os.PathLike) -> Path:
    """The folder that holds labels.npy: `data_dir` itself or its CIFAR-10-C / CIFAR-100-C subfolder (the
    archives' own folders)."""
    folder = Path(data_dir).expanduser()
    for sub in ("CIFAR-10-C", "CIFAR-100-C"):
        if not (folder / "labels.npy").is_file() and (folder / sub / "labels.npy").is_file():
            return folder / sub
    return folder


def load_cifar_c(data_dir: str | os.PathLike, corruptions: list[str] | None = None,
                 severities=SEVERITIES) -> dict[str, dict[int, ImageSet]]:
    """Return {corruption: {severity: ImageSet}}; all corruptions in the folder if none named."""
    folder = cifar_c_folder(data_dir)
    if not (folder / "labels.npy").is_file():
        raise RobustlabError(f"labels.npy not found in {folder}; {_HOW_TO_GET}")
    available = sorted(p.stem for p in folder.glob("*.npy") if p.stem != "labels")
    if corruptions is None:
        corruptions = available
    missing = [c for c in corruptions if c not in available]
    if missing:
        raise RobustlabError(f"corruption {', '.join(missing)} not found in {folder}; "
                             f"available: {', '.join(available) or 'none'}")
    severities = check_severities(severities, allow_empty=True)  # () reads no images: a check of files and names

    labels = _load_npy(folder / "labels.npy")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise RobustlabError(f"{folder / 'labels.npy'} holds {labels.dtype} labels"
                             f"{f' down to {labels.min()}' if labels.size and np.issubdtype(labels.dtype, np.number) else ''}; "
                             "expected class indices (integers >= 0)")
    result = {}
    for name in corruptions:
        path = folder / f"{name}.npy"
        images = _load_npy(path)
        if images.ndim != 4 or images.shape[3] not in (1, 3) or images.dtype != np.uint8:
            raise RobustlabError(f"{path} holds {images.dtype} {images.shape}; "
                                 "expected uint8 (5·N)×H×W×C")
        rows = images.shape[0]
        if rows % 5 or labels.shape != (rows,):
            raise RobustlabError(f"{path} has {rows} rows and labels.npy has shape {labels.shape}; "
                                 "expected 5·N rows and one label per row")
        n = rows // 5
        result[name] = {
            s: ImageSet(
                torch.from_numpy(images[(s - 1) * n: s * n].transpose(0, 3, 1, 2).copy()),
                torch.from_numpy(np.array(labels[(s - 1) * n: s * n], dtype=np.int64)))
            for s in severities
        }
    return result


def check_cifar_c(data_dir: str | os.PathLike, shape, labels: torch.Tensor | None = None,
                  corruptions: list[str] | None = None) -> list[str]:
    """The corruptions (all in the folder if none named) whose files hold images of `shape` (C, H, W) and, given
    the test set's `labels` (its first images, in its order), at least as many images per severity, with those
    labels at every severity. Reads the files' headers and labels.npy only, so a folder that does not fit fails
    before an evaluation's hours of attacks, not after them."""
    folder = cifar_c_folder(data_dir)
    corruptions = list(load_cifar_c(folder, corruptions, severities=()))  # checks files and names, reads no images
    n, shape = (0 if labels is None else len(labels)), tuple(shape)
    for name in corruptions:
        rows, h, w, c = _load_npy(folder / f"{name}.npy").shape
        if (c, h, w) != shape or rows // 5 < n:
            wanted = f"the test set has {n} images of shape {shape}" if n else f"the dataset's are of shape {shape}"
            raise RobustlabError(f"{name} in {folder} holds {rows // 5} images of shape {(c, h, w)} per severity; "
                                 f"{wanted}: is it the corruption set of another dataset?")
    if labels is not None:
        published = _load_npy(folder / "labels.npy")
        per_severity = len(published) // 5
        if any(not np.array_equal(published[s * per_severity: s * per_severity + n], labels.numpy())
               for s in range(5)):
            raise RobustlabError(f"labels in {folder} do not match the test set's; is it the corruption set of "
                                 "another dataset?")
    return corruptions
