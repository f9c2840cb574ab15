"""Datasets too large to hold in memory as one tensor: ImageNet-style folders and memory-mapped `.npy` arrays.

Both are `torch.utils.data.Dataset`s of (uint8 C×H×W tensor, label) pairs, so a DataLoader with workers
decodes in parallel, and `epoch_loader` shards them over torchrun ranks with a DistributedSampler whose
order depends on (seed, epoch) only. Images stay uint8 until the batch is on its device; the model's
own normalization layer does the rest, as for the in-memory sets.

`load_large` makes them the datasets `folder` and `npy` of `load_dataset`: the training split streams,
validation and test are `LazyImageSet`s, decoded into memory only when (and as far as) they are read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from robustlab import distributed
from robustlab.data.datasets import DatasetInfo, ImageSet, Splits, default_val_size, split_indices
from robustlab.errors import RobustlabError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _stored_bits(im) -> int:
    """Bits per value of an integer image as its file stores them: Pillow opens 16-bit PGM files in mode "I", as it
    does 32-bit TIFFs."""
    if im.mode.startswith("I;16"):
        return 16
    try:
        args = im.tile[0][3]
        rawmode = args if isinstance(args, str) else args[0]
    except (IndexError, TypeError):
        return 32
    return 16 if str(rawmode).startswith("I;16") else 32


class ImageFolder(Dataset):
    """root/<class name>/<image file>: classes sorted by name, label = index. Decoded with Pillow.

    size: (height, width) every image is resized to (bilinear), so that batches stack; None keeps the
    files' sizes, which must then all agree (the first image's becomes `size`; another is an error).
    mode: Pillow mode, "RGB" or "L".
    """

    def __init__(self, root, size: tuple[int, int] | None = None, mode: str = "RGB"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RobustlabError(f"image folder {self.root} does not exist (expected {self.root}/<class>/<image>)")
        # Hidden folders (.ipynb_checkpoints, .git) are no classes: one of them would shift every label.
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        # Hidden files too: macOS's ._name.png beside each image is no image.
        self.files = [(f, label) for label, c in enumerate(self.classes) for f in sorted((self.root / c).iterdir())
                      if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
        if not self.files:
            raise RobustlabError(f"no images under {self.root} (expected {self.root}/<class>/<image> with one of "
                                 f"{', '.join(IMAGE_SUFFIXES)})")
        if empty := sorted(set(self.classes) - {self.classes[label] for _, label in self.files}):
            raise RobustlabError(f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} under {self.root} "
                                 f"hold{'' if len(empty) > 1 else 's'} no images ({', '.join(IMAGE_SUFFIXES)}): "
                                 "an empty class would still get an output; remove it or fill it")
        self.mode, self.size, self.resize = mode, None, size is not None
        self.size = tuple(size) if size is not None else self._decode(self.files[0][0]).shape[:2]

    def __len__(self):
        return len(self.files)

    def _decode(self, path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as im:
                if im.mode == "F":  # floats have no range to scale from; a cast would make them black or white
                    raise RobustlabError(f"{path} holds floating-point pixels; save the images as 8- or 16-bit")
                if im.mode == "I" or im.mode.startswith("I;16"):  # convert clips values above 255
                    bits = _stored_bits(im)
                    wide = np.asarray(im, dtype=np.float64)
                    if bits == 16:  # scaled, not clipped
                        im = Image.fromarray((wide / 257).round().astype(np.uint8))
                    elif wide.size and (wide.min() < 0 or wide.max() > 255):  # no range to scale from
                        raise RobustlabError(f"{path} holds 32-bit pixels outside 0..255; save it as 8- or 16-bit")
                im = im.convert(self.mode)
                if self.size is not None and (im.height, im.width) != self.size:
                    if not self.resize:  # a silently resized odd image would hide a mixed-up folder
                        raise RobustlabError(f"{path} is {im.height}×{im.width} but {self.files[0][0]} is "
                                             f"{self.size[0]}×{self.size[1]}; give an image size "
                                             "(--image-size) to resize them all")
                    im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8)
        except (OSError, Image.DecompressionBombError) as exc:  # the second is not an OSError
            raise RobustlabError(f"cannot decode image {path}: {exc}") from None

    def __getitem__(self, i):
        path, label = self.files[i]
        a = self._decode(path)
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
        channels = self.images.shape[1 if channels_first else 3]
        if channels not in (1, 3):  # e.g. N×3×H×W read as N×H×W×C: its width would be the channels
            layout = "N×C×H×W" if channels_first else "N×H×W×C"
            raise RobustlabError(f"{images_path} is {self.images.shape}: expected {layout} with 1 or 3 channels")
        if self.labels.ndim != 1 or not np.issubdtype(self.labels.dtype, np.integer):
            raise RobustlabError(f"{labels_path} holds {self.labels.dtype} {self.labels.shape}: expected one integer "
                                 "class index per image")
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


def decode(dataset: Dataset, n: int, shape) -> ImageSet:
    """The first `n` examples of `dataset` as an in-memory ImageSet of images of `shape` (C, H, W)."""
    images, labels = torch.empty((n, *shape), dtype=torch.uint8), torch.empty(n, dtype=torch.long)
    for i in range(n):
        images[i], labels[i] = dataset[i]
    return ImageSet(images, labels)


class LazyImageSet(ImageSet):
    """An ImageSet over a Dataset, decoded on first use of `images` or `labels`; `subset(n)` before that
    decodes n images only, so evaluating the first 1,000 images of a 50,000-image test folder reads 1,000 files."""

    def __init__(self, dataset: Dataset, shape):
        self.dataset, self.shape = dataset, tuple(shape)

    def __getattr__(self, name):  # called only while `images` and `labels` are not set yet
        if name not in ("images", "labels"):
            raise AttributeError(name)
        whole = decode(self.dataset, len(self.dataset), self.shape)
        self.images, self.labels = whole.images, whole.labels
        return getattr(self, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"LazyImageSet({len(self)} images of {self.shape})"

    def subset(self, n: int) -> ImageSet:
        if "images" in self.__dict__ or n < 0:
            return super().subset(n)
        return decode(self.dataset, min(n, len(self)), self.shape)


_NPY_FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy")


def _folder_sets(root: Path, image_size, grayscale: bool):
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise RobustlabError(f"--dataset folder: no folders train/ and test/ (or val/) in {root}; pass --data-dir ROOT "
                             "with ROOT/train/<class>/<image> and ROOT/test/<class>/<image> (ROOT/val/<class>/<image> "
                             "in the ImageNet layout)")
    mode = "L" if grayscale else "RGB"
    train = ImageFolder(root / "train", image_size, mode)
    test = ImageFolder(test_dir, image_size, mode)
    if test.size != train.size:
        raise RobustlabError(f"{test.files[0][0]} is {test.size[0]}×{test.size[1]} but {train.files[0][0]} is "
                             f"{train.size[0]}×{train.size[1]}; give an image size (--image-size) to resize them all")
    if test.classes != train.classes:
        raise RobustlabError(f"{test_dir} has classes {test.classes[:5]}... but {root / 'train'} has "
                             f"{train.classes[:5]}...; both splits need the same class folders")
    if len(train.classes) < 2:  # trained to 100% clean and "robust" accuracy without a word
        raise RobustlabError(f"{root / 'train'} has {len(train.classes)} class folder ({', '.join(train.classes)}); a "
                             "classifier needs at least two classes")
    return train, test, tuple(train.classes)


def _npy_sets(root: Path):
    missing = [f for f in _NPY_FILES if not (root / f).is_file()]
    if missing:
        raise RobustlabError(f"--dataset npy: {', '.join(missing)} not found in {root}; pass --data-dir pointing at a "
                             f"folder with {', '.join(_NPY_FILES)} (uint8 N×H×W×C images, integer labels)")
    train, test = (NpyArrays(root / f"{s}_images.npy", root / f"{s}_labels.npy") for s in ("train", "test"))
    if len(train) == 0:
        raise RobustlabError(f"{root / 'train_images.npy'} holds no images")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise RobustlabError(f"{root}: training images are {train.images.shape[1:]} but test images "
                             f"{test.images.shape[1:]} (H×W×C)")
    labels = np.concatenate([np.asarray(train.labels), np.asarray(test.labels)])
    if labels.size and labels.min() < 0:  # "labels must lie in 0..-1" once, where every training label was negative
        raise RobustlabError(f"{root}: labels are class indices from 0, found {labels.min()}")
    num_classes = int(np.asarray(train.labels).max()) + 1
    if labels.size and labels.max() >= num_classes:
        raise RobustlabError(f"{root}: labels must lie in 0..{num_classes - 1} (the training labels' range), "
                             f"found {labels.min()}..{labels.max()}")
    # np.unique, not np.bincount up to the largest label: a label of 10**9 allocated 7.5 GiB and was killed
    present = np.unique(np.asarray(train.labels))
    if len(present) < 2:
        raise RobustlabError(f"{root}: every training label is {present[0]}; a classifier needs at least two classes")
    if len(present) < num_classes:
        empty = np.setdiff1d(np.arange(min(num_classes, len(present) + 10)), present)[:10].tolist()  # the first ten
        missing = num_classes - len(present)
        hint = " (labels counted from 1? subtract 1)" if missing == 1 and empty == [0] else ""
        listed = ", ".join(map(str, empty)) + (f" and {missing - len(empty)} more" if missing > len(empty) else "")
        raise RobustlabError(f"{root}: class{'es' if missing > 1 else ''} {listed} of 0..{num_classes - 1} "
                             f"{'have' if missing > 1 else 'has'} no training images: an empty class would still get "
                             f"an output{hint}")
    return train, test, tuple(str(c) for c in range(num_classes))


def load_large(name: str, data_dir, val_size: int | None = None, seed: int = 0, image_size=None,
               grayscale: bool = False) -> Splits:
    """The `folder` or `npy` dataset at `data_dir`, split as the in-memory datasets are (see load_dataset)."""
    if data_dir is None:
        raise RobustlabError(f"--dataset {name} needs --data-dir ROOT (" + (
            "ROOT/train/<class>/<image> and ROOT/test/<class>/<image>)" if name == "folder" else
            f"ROOT/{', ROOT/'.join(_NPY_FILES)})"))
    root = Path(data_dir).expanduser()
    if name != "folder" and (image_size or grayscale):
        raise RobustlabError("--image-size and --grayscale apply to --dataset folder only")
    train, test, classes = _folder_sets(root, image_size, grayscale) if name == "folder" else _npy_sets(root)
    shape = tuple(train[0][0].shape)
    keep, held = split_indices(len(train), default_val_size(len(train)) if val_size is None else val_size, seed)
    train_part = Subset(train, keep.tolist())
    # Per-channel statistics of up to 1,000 training images, the same ones on every machine; summed image by
    # image, since 1,000 ImageNet-sized images in float would take 600 MB.
    sample = torch.randperm(len(train_part), generator=torch.Generator().manual_seed(0))[:1000]
    moments = torch.zeros(2, shape[0], dtype=torch.float64)
    for i in sample.tolist():
        x = train_part[i][0].flatten(1).double() / 255
        moments += torch.stack([x.mean(1), (x * x).mean(1)])
    mean, square = moments / len(sample)
    std = (square - mean**2).clamp_min(0).sqrt().clamp_min(1 / 255)  # a constant channel must not divide by zero
    info = DatasetInfo(name, len(classes), shape, tuple(round(v, 4) for v in mean.tolist()),
                       tuple(round(v, 4) for v in std.tolist()), classes,
                       "crop-flip" if shape[0] == 3 else "crop")  # mirror natural RGB images as CIFAR does
    return Splits(train_part, LazyImageSet(Subset(train, held.tolist()), shape), LazyImageSet(test, shape), info)
