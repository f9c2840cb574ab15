"""PyTorch twins of the tinygrad models, with the same state-dict names (no tinygrad needed here): robustlab's
own `cnn-small` and `mlp`, so `robustlab.load_model` reads tinygrad-trained checkpoints too."""
from __future__ import annotations

import torch
from torch import nn

from robustlab.errors import check_choice
from robustlab.models import build_model

TWINS = ("cnn-small", "mlp")


def build_torch_model(name: str, input_shape, num_classes: int, mean, std, **kwargs) -> nn.Module:
    """robustlab.models.build_model, for the models that have a tinygrad twin."""
    check_choice("tinygrad model", name, TWINS)
    return build_model(name, input_shape, num_classes, mean, std, **kwargs)


def architecture_of(state: dict[str, torch.Tensor]) -> tuple[str, tuple, int]:
    """(name, input_shape, num_classes) of a twin's state dict; H = W is assumed (what fits square images)."""
    from robustlab.errors import RobustlabError

    if "net.fc1.weight" not in state or "normalize.mean" not in state:
        raise RobustlabError("not a cnn-small or mlp state dict (needs normalize.mean and net.fc1.weight)")
    c = state["normalize.mean"].numel()
    num_classes = state["net.fc2.weight"].shape[0]
    if "net.conv1.weight" in state:
        side = round((state["net.fc1.weight"].shape[1] // 64) ** 0.5) * 4
        return "cnn-small", (c, side, side), num_classes
    side = round((state["net.fc1.weight"].shape[1] // c) ** 0.5)
    return "mlp", (c, side, side), num_classes
