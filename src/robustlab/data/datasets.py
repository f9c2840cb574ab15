"""Dataset registry, readers for the publishers' own file formats, and the train/val/test protocol.

Everything is read into uint8 tensors (N×C×H×W): four bytes per pixel less than float, and the
model's Normalize layer, not the loader, owns the scaling. The validation split is carved out of
the training set by a seeded permutation so that every run, on every machine, selects
hyper-parameters on the same images and never on the test set.
"""

from __future__ import annotations

import codecs
import gzip
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import RobustlabError, check_choice
from .download import download_dataset


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_shape: tuple  # (C, H, W)
    mean: tuple  # per channel, pixel scale [0, 1]
    std: tuple
    class_names: tuple
    augment: str  # default training augmentation, a kind of augment_batch


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, N×C×H×W, contiguous
    labels: torch.Tensor  # int64, N

    def __post_init__(self):
        for name, value in (("images", self.images), ("labels", self.labels)):
            if not isinstance(value, torch.Tensor):
                raise RobustlabError(f"ImageSet {name} must be a torch tensor, got {type(value).__name__} "
                                     f"(torch.as_tensor converts it)")
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise RobustlabError(f"ImageSet images must be uint8 N×C×H×W, got {self.images.dtype} "
                                 f"{tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise RobustlabError(f"ImageSet has {len(self.images)} images but labels of shape "
                                 f"{tuple(self.labels.shape)}")
        if self.labels.is_floating_point():
            raise RobustlabError(f"ImageSet labels must be integers, got {self.labels.dtype}")
        self.images = self.images.contiguous()
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> "ImageSet":
        """The first `n` examples (all of them if n >= len)."""
        if n < 0:
            raise RobustlabError(f"subset size must be >= 0, got {n}")
        return ImageSet(self.images[:n], self.labels[:n])

    def as_float(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.images.float().div_(255)


def images_and_labels(data, taker: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`data` as (images, labels): an ImageSet, or a pair of tensors given as they are."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    if hasattr(data, "images") and hasattr(data, "labels"):
        return data.images, data.labels
    raise RobustlabError(f"{taker} takes an ImageSet (e.g. load_dataset(...).test) or an (images, labels) pair, "
                         f"not a {type(data).__name__}")


@dataclass
class Splits:
    train: ImageSet | torch.utils.data.Dataset  # a Dataset for the streamed large datasets
    val: ImageSet
    test: ImageSet
    info: DatasetInfo


_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                    "dog", "frog", "horse", "ship", "truck")
_CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree
orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum
rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train
trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split())

# Mean/std: population statistics of each training set (Fashion-MNIST measured on the files
# in /usr/share/datasets/fashion-mnist; the others are the widely reproduced values).
DATASETS = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        "crop"),
    "mnist": DatasetInfo(
        "mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), tuple(str(d) for d in range(10)), "none"),
    "cifar10": DatasetInfo(
        "cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        _CIFAR10_CLASSES, "crop-flip"),
    "cifar100": DatasetInfo(
        "cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        _CIFAR100_CLASSES, "crop-flip"),
}

# Searched in order when no data_dir is given; "~" is expanded at call time. Downloads go to
# the last entry, the per-user cache.
DEFAULT_DATA_DIRS = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist", "~/.cache/robustlab/fashion-mnist"),
    "mnist": ("/usr/share/datasets/mnist", "~/.cache/robustlab/mnist"),
    "cifar10": ("~/.cache/robustlab/cifar10",),
    "cifar100": ("~/.cache/robustlab/cifar100",),
}

_HOW_TO_GET = {
    "fashion-mnist": "install Debian's dataset-fashion-mnist, pass --data-dir, or add --download",
    "mnist": "pass --data-dir pointing at the MNIST idx files, or add --download",
    "cifar10": "pass --data-dir pointing at cifar-10-batches-py or cifar-10-python.tar.gz, "
               "or add --download",
    "cifar100": "pass --data-dir pointing at cifar-100-python or cifar-100-python.tar.gz, "
                "or add --download",
}


# ---- idx (MNIST, Fashion-MNIST) ----

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte idx file (optionally gzip-compressed) with `ndim` dimensions."""
    path = Path(path)
    hint = "delete it and get a fresh copy (e.g. with --download)"
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise RobustlabError(f"cannot read idx file {path}: {exc}; {hint}") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise RobustlabError(f"{path} is not a {ndim}-d unsigned-byte idx file "
                             f"(magic {raw[:4].hex() or 'missing'}); {hint}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)  # Python ints: numpy's int64 product of a forged header wraps to 0
    if len(raw) - header != expected:
        raise RobustlabError(f"idx file {path} has {len(raw) - header} data bytes but its header "
                             f"{dims} says {expected}; {hint}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _missing_idx(folder: Path) -> list[str]:
    return [stem for pair in _IDX_FILES.values() for stem in pair if not _idx_path(folder, stem)]


def _has_idx(folder: Path) -> bool:
    return not _missing_idx(folder)


def _read_idx_split(folder: Path, split: str, num_classes: int) -> ImageSet:
    img_path, lbl_path = (_idx_path(folder, stem) for stem in _IDX_FILES[split])
    images = read_idx(img_path, 3)
    labels = read_idx(lbl_path, 1)
    if len(images) != len(labels):
        raise RobustlabError(f"{img_path} has {len(images)} images but {lbl_path} has "
                             f"{len(labels)} labels; the files do not belong together")
    if labels.size and labels.max() >= num_classes:
        raise RobustlabError(f"{lbl_path} has label {labels.max()} >= {num_classes} classes")
    return ImageSet(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())


# ---- CIFAR python pickles ----

_CIFAR = {  # name -> (archive, folder inside it, train files, test files, label key)
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",), b"fine_labels"),
}

_reconstruct = np.zeros(0).__reduce__()[0]  # numpy's array rebuild function, whatever its module
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes objects in protocol-2 pickles written by Python 3
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and nothing else: these files come from the web."""

    def find_class(self, module, name):
        try:
            return _PICKLE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _read_cifar_file(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
    except MemoryError:  # a good file on a full machine, or a damaged length field
        raise RobustlabError(f"out of memory reading CIFAR batch {path} (or the file is damaged)") from None
    except Exception as exc:  # a damaged pickle fails in many ways (LookupError, AttributeError, MemoryError, ...)
        raise RobustlabError(f"cannot read CIFAR batch {path}: {exc!r}; "
                             "delete the folder and extract or download the archive again") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise RobustlabError(f"CIFAR batch {path} holds data {data.shape} and {len(labels)} labels; "
                             "expected N×3072 and N labels")
    if data.dtype != np.uint8 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        # a cast would turn pixels in [0, 1] into black images and truncate float labels without a word
        raise RobustlabError(f"CIFAR batch {path} holds {data.dtype} data and {labels.dtype} labels; "
                             "expected uint8 pixels and integer labels, as the publisher's files")
    return data, labels.astype(np.int64)


def _read_cifar_split(folder: Path, files: tuple, label_key: bytes, num_classes: int) -> ImageSet:
    parts = [_read_cifar_file(folder / f, label_key) for f in files]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lbl for _, lbl in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise RobustlabError(f"CIFAR labels in {folder} fall outside 0..{num_classes - 1}")
    images = torch.from_numpy(data).reshape(-1, 3, 32, 32)  # rows are R, G, B planes
    return ImageSet(images, torch.from_numpy(labels))


def _extract(archive: Path, member: str, dest: Path, marker: str) -> Path:
    """Extract `member` (a top-level folder) of a tar.gz into dest, atomically; `marker` is a file that a
    complete `member` holds."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    except OSError as exc:
        raise RobustlabError(f"cannot extract {archive} in {dest} ({exc.strerror or exc}); extract it by hand "
                             "into a folder you can write and point --data-dir there") from None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # Plain files and folders under `member` only, so no path can escape `dest`.
            members = [m for m in tar.getmembers()
                       if m.name.split("/")[0] == member and ".." not in m.name.split("/")
                       and (m.isfile() or m.isdir())]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
            tar.extractall(tmp, members=members, **safe)
        if not (tmp / member).is_dir():
            raise RobustlabError(f"archive {archive} has no folder {member}/; "
                                 "delete it and download it again")
        try:
            os.replace(tmp / member, dest / member)
        except OSError:
            if (dest / member / marker).is_file():  # another process (a torchrun rank) extracted it first
                return dest / member
            if (dest / member).exists():
                raise RobustlabError(f"{dest / member} is incomplete (it has no {marker}); delete that folder and "
                                     f"it is extracted again from {archive.name}") from None
            raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise RobustlabError(f"cannot extract {archive}: {exc}; "
                             "delete it and download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / member


def _find_cifar(name: str, folder: Path) -> Path | None:
    """The batch folder at `folder`: the folder itself, its subfolder, or extracted from the archive."""
    archive, member, train_files, _, _ = _CIFAR[name]
    if folder.is_file() and folder.name == archive:
        folder, archive_path = folder.parent, folder
    else:
        archive_path = folder / archive
    if (folder / train_files[0]).is_file():
        return folder
    if (folder / member / train_files[0]).is_file():
        return folder / member
    if archive_path.is_file():
        return _extract(archive_path, member, folder, train_files[0])
    return None


# ---- loading ----

def _search_dirs(name: str, data_dir) -> list[Path]:
    if data_dir is None:
        return [Path(d).expanduser() for d in DEFAULT_DATA_DIRS[name]]
    data_dir = Path(data_dir).expanduser()
    return [data_dir, data_dir / name]


def _locate(name: str, dirs: list[Path]) -> Path | None:
    for folder in dirs:
        if name in _CIFAR:
            found = _find_cifar(name, folder)
            if found is not None:
                return found
        elif _has_idx(folder):
            return folder
    return None


def _read(name: str, folder: Path) -> tuple[ImageSet, ImageSet]:
    classes = DATASETS[name].num_classes
    if name in _CIFAR:
        _, _, train_files, test_files, key = _CIFAR[name]
        return (_read_cifar_split(folder, train_files, key, classes),
                _read_cifar_split(folder, test_files, key, classes))
    return _read_idx_split(folder, "train", classes), _read_idx_split(folder, "test", classes)


def default_val_size(n: int) -> int:
    """The protocol's validation split for a training set of n: 5,000 images, 10% of fewer than 50,000."""
    return 5000 if n >= 50_000 else n // 10


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices: validation = the last `val_size` of randperm(n) under manual_seed(seed)."""
    if not 0 <= val_size < n:
        raise RobustlabError(f"val_size must be in 0..{n - 1} for a training set of {n}, got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n - val_size], perm[n - val_size:]


def split_train_val(train: ImageSet, val_size: int, seed: int) -> tuple[ImageSet, ImageSet]:
    keep, held = split_indices(len(train), val_size, seed)
    return (ImageSet(train.images[keep], train.labels[keep]),
            ImageSet(train.images[held], train.labels[held]))


def _mistaken_for(name: str, train: ImageSet) -> str | None:
    """The other registered dataset whose training-set mean these images have, if not `name`'s own.

    MNIST and Fashion-MNIST share file names and shapes, so the wrong --dataset would train and evaluate with
    the other's normalization and class names without a word; their means (0.131, 0.286) tell them apart.
    """
    mean = float(train.images.numpy().mean(dtype=np.float64)) / 255  # float64: a float32 sum drifts over 47M pixels
    if abs(mean - float(np.mean(DATASETS[name].mean))) < 0.02:
        return None
    return next((other.name for other in DATASETS.values() if other.name != name
                 and other.input_shape == DATASETS[name].input_shape
                 and abs(mean - float(np.mean(other.mean))) < 0.002), None)


# Read from --data-dir by robustlab.data.folder, never held in memory whole: the training split streams.
LARGE_DATASETS = ("folder", "npy")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
                 val_size: int | None = None, seed: int = 0, image_size: tuple[int, int] | None = None,
                 grayscale: bool = False) -> Splits:
    """Load a registered dataset and split its training set into train/val (test untouched).

    Looks in `data_dir` and `data_dir/<name>` if given, else in DEFAULT_DATA_DIRS[name]. With
    `download`, missing files are fetched (sha256-verified) into `data_dir` or the user cache.
    val_size None: `default_val_size` of the training set.

    `folder` (data_dir/train/<class>/<image>, data_dir/test or val/<class>/<image>; images resized to
    `image_size` if given, 1-channel if `grayscale`) and `npy` (data_dir/{train,test}_{images,labels}.npy) are
    split the same way, but their training split is a streaming torch Dataset and validation and test are
    decoded on first use (robustlab.data.folder.load_large).
    """
    check_choice("dataset", name, (*DATASETS, *LARGE_DATASETS))
    if name in LARGE_DATASETS:
        from .folder import load_large
        return load_large(name, data_dir, val_size, seed, image_size, grayscale)
    if image_size or grayscale:
        raise RobustlabError("--image-size and --grayscale apply to --dataset folder only")
    dirs = _search_dirs(name, data_dir)
    folder = _locate(name, dirs)
    if data_dir is not None and folder is not None and (other := _locate(name, dirs[1:])) is not None \
            and other.resolve() != folder.resolve():  # files beside a folder named for the dataset: which is meant?
        raise RobustlabError(f"both {folder} and {other} hold {name} files; point --data-dir at the one to use")
    if folder is None and download:
        dest = dirs[0] if data_dir is not None else dirs[-1]
        download_dataset(name, dest)
        folder = _locate(name, [dest])
    if folder is None:
        where = ", ".join(str(d) for d in dirs)
        # A folder with some of the four idx files: name the others (a download cut short, other file names)
        part = next(((d, m) for d in dirs if name not in _CIFAR and 0 < len(m := _missing_idx(d)) < 4), None)
        lacks = f" ({part[0]} lacks {', '.join(part[1])}, with or without .gz)" if part else ""
        raise RobustlabError(f"{name} not found in {where}{lacks}; {_HOW_TO_GET[name]}")
    train, test = _read(name, folder)
    want = tuple(DATASETS[name].input_shape)
    for split, images in (("training", train), ("test", test)):
        if tuple(images.images.shape[1:]) != want:  # caught here, not as a matmul error inside the model
            raise RobustlabError(f"the {name} {split} images in {folder} are {tuple(images.images.shape[1:])}, "
                                 f"not {name}'s {want}")
    if len(train) == 0:
        raise RobustlabError(f"the {name} training set in {folder} holds no images")
    if (other := _mistaken_for(name, train)) is not None:
        raise RobustlabError(f"the images in {folder} are {other}'s, not {name}'s (mean pixel "
                             f"{np.mean(DATASETS[other].mean):.3f}, not {np.mean(DATASETS[name].mean):.3f}); "
                             f"pass --dataset {other}")
    train, val = split_train_val(train, default_val_size(len(train)) if val_size is None else val_size, seed)
    return Splits(train, val, test, DATASETS[name])
