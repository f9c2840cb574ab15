"""Datasets (uint8 tensors, fixed train/val/test protocol), batch augmentation and CIFAR-10-C."""

from .augment import AUGMENTATIONS, augment_batch
from .corruptions_npy import check_cifar_c, load_cifar_c
from .datasets import DATASETS, DEFAULT_DATA_DIRS, LARGE_DATASETS, DatasetInfo, ImageSet, Splits, load_dataset

__all__ = [
    "AUGMENTATIONS", "DATASETS", "DEFAULT_DATA_DIRS", "LARGE_DATASETS", "DatasetInfo", "ImageSet", "Splits",
    "augment_batch", "check_cifar_c", "load_cifar_c", "load_dataset",
]
