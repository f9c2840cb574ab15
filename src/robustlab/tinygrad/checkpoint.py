"""tinygrad models in robustlab's checkpoint format (safetensors + JSON metadata, robustlab.checkpoint).

The tensors are stored under the PyTorch twin's names with the `model.` prefix and the metadata
names the model and dataset as the PyTorch path does, so `robustlab.load_model(path)` rebuilds a
tinygrad-trained cnn-small as the PyTorch cnn-small, and this module reads PyTorch-trained
checkpoints into tinygrad. `backend: tinygrad` in the metadata tells the two kinds of run apart.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from robustlab import checkpoint
from robustlab.data import DATASETS
from robustlab.errors import RobustlabError, check_choice
from robustlab.tinygrad.backend import require

tinygrad = require()
from robustlab.tinygrad.models import MODELS, TinyModel, build_model  # noqa: E402


def backend_meta() -> dict:
    from importlib.metadata import version
    return {"backend": "tinygrad", "tinygrad": {"version": version("tinygrad"), "device": tinygrad.Device.DEFAULT}}


def model_tensors(model: TinyModel) -> dict[str, torch.Tensor]:
    return checkpoint.prefixed("model.", {k: torch.from_numpy(v) for k, v in model.state_dict().items()})


def _dataset_info(model: TinyModel, dataset: str | None) -> dict:
    """What robustlab.load_model needs to rebuild the model: the dataset's info, or the model's own shapes; the
    normalization is always the model's own (the one its buffers hold)."""
    if dataset is not None:
        check_choice("dataset", dataset, DATASETS)
        return {**asdict(DATASETS[dataset]), "mean": list(model.mean), "std": list(model.std)}
    return {"name": None, "input_shape": list(model.input_shape), "num_classes": model.num_classes,
            "mean": list(model.mean), "std": list(model.std)}


def save_model(model: TinyModel, path, *, dataset: str | None = None, metadata: dict | None = None) -> None:
    """Write `model` as a robustlab model checkpoint (kind "model") at `path`."""
    meta = {"kind": "model", "model": {"name": model.name, "kwargs": dict(model.kwargs)}, "dataset": _dataset_info(model, dataset),
            **backend_meta(), **(metadata or {})}
    checkpoint.save(path, model_tensors(model), meta)


def load_model(path, which: str | None = None) -> TinyModel:
    """A tinygrad model from a robustlab run directory or checkpoint, trained by either backend."""
    from robustlab.training.run import resolve_checkpoint

    file = resolve_checkpoint(path, which)
    tensors, meta = checkpoint.load(file)
    name = meta.get("model", {}).get("name")
    if name not in MODELS:
        raise RobustlabError(f"{file} holds model {name!r}; the tinygrad backend has {', '.join(sorted(MODELS))}")
    info = meta["dataset"]
    model = build_model(name, info["input_shape"], info["num_classes"], info["mean"], info["std"],
                        **meta["model"].get("kwargs", {}))
    model.load_state_dict(checkpoint.unprefixed("model.", tensors))
    model.checkpoint_meta = meta
    return model
