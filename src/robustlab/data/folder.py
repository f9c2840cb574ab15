"""Datasets too large to hold in memory as one tensor: ImageNet-style folders and memory-mapped `.npy` arrays.

Both are `torch.utils.data.Dataset`s of (uint8 C×H×W tensor, label) pairs, so a DataLoader with workers
decodes in parallel, and `epoch_loader` shards them over torchrun ranks with a DistributedSampler whose
order depends on (seed, epoch) only. Images stay uint8 until the batch is on its device; the model's
own normalization layer does the rest, as for the in-memory sets.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from robustlab import distributed
from robustlab.errors import RobustlabError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ImageFolder(Dataset):
    """root/<class name>/<image file>: classes sorted by name, label = index. Decoded with Pillow.

    size: (height, width) every image is resized to (bilinear), so that batches stack; None keeps the
    files' sizes, which must then all agree. mode: Pillow mode, "RGB" or "L".
    """

    def __init__(self, root, size: tuple[int, int] | None = None, mode: str = "RGB"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RobustlabError(f"image folder {self.root} does not exist (expected {self.root}/<class>/<image>)")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.files = [(f, label) for label, c in enumerate(self.classes)
                      for f in sorted((self.root / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise RobustlabError(f"no images under {self.root} (expected {self.root}/<class>/<image> with one of "
                                 f"{', '.join(IMAGE_SUFFIXES)})")
        self.size, self.mode = size, mode

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode)
                if self.size is not None:
                    im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except OSError as exc:
            raise RobustlabError(f"cannot decode image {path}: {exc}") from None
        a = a[:, :, None] if a.ndim == 2 else a
        return torch.from_numpy(a.transpose(2, 0, 1).copy()), label


class NpyArrays(Dataset):
    """Images and labels in two `.npy` files, memory-mapped: only the rows a batch reads come off disk.

    images: uint8 N×H×W×C (the CIFAR-10-C layout) or N×C×H×W (channels_first=True); labels: integers, N.
    """

    def __init__(self, images_path, labels_path, channels_first: bool = False):
        try:
            self.images = np.load(images_path, mmap_mode="r")
            self.labels = np.load(labels_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise RobustlabError(f"cannot memory-map {images_path} / {labels_path}: {exc}") from None
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise RobustlabError(f"{images_path}: expected uint8 images of 4 dimensions, got "
                                 f"{self.images.dtype} {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise RobustlabError(f"{images_path} holds {len(self.images)} images but {labels_path} "
                                 f"{len(self.labels)} labels")
        self.channels_first = channels_first

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        a = np.array(self.images[i])  # copies the row out of the map
        if not self.channels_first:
            a = a.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(a)), int(self.labels[i])


def epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, *, shuffle: bool = True,
                 workers: int = 2, drop_last: bool = False) -> DataLoader:
    """A DataLoader over this rank's share of `dataset` for one epoch; `batch_size` is per rank.

    The sampler is a DistributedSampler even in one process (world size 1), so the order for a given
    (seed, epoch) is the same whether or not the job was launched with torchrun.
    """
    sampler = DistributedSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                 shuffle=shuffle, seed=seed, drop_last=drop_last)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(), drop_last=drop_last)
