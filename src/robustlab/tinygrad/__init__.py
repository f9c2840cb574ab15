"""robustlab for tinygrad models: FGSM/PGD, PGD adversarial training, evaluation, weight transfer.

Needs the optional extra (pip install 'robustlab[tinygrad]') and, on CPU, clang. Names are
imported lazily, so `robustlab.tinygrad.torch_twins` (PyTorch only) works without tinygrad, and a
missing tinygrad surfaces as a one-line RobustlabError at first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "fgsm": "attacks", "fgm": "attacks", "pgd": "attacks",
    "MLP": "models", "CNNSmall": "models", "build_model": "models", "from_torch": "models",
    "accuracy": "evaluate", "correct_mask": "evaluate",
    "train": "trainer", "build_trainer": "trainer", "save_model": "checkpoint", "load_model": "checkpoint",
    "device": "backend", "set_threads": "backend",
    "build_torch_model": "torch_twins",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'robustlab.tinygrad' has no attribute {name!r}")
    return getattr(importlib.import_module(f"robustlab.tinygrad.{_EXPORTS[name]}"), name)
