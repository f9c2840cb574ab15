"""PyTorch twins of the tinygrad models, with the same state-dict names (no tinygrad needed here).

`mlp` has the signature of the builders in robustlab.models.registry, so registering it there
(`MODELS["mlp"] = mlp`) would let `robustlab.load_model` read tinygrad-trained MLP checkpoints too.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from robustlab.errors import check_choice
from robustlab.models import build_model
from robustlab.models.registry import Normalize

TWINS = ("cnn-small", "mlp")


def mlp(input_shape, num_classes, hidden: int = 128):
    """TinyBobNet's layout (784-128-10 on MNIST), with biases: flatten, linear, ReLU, linear."""
    c, h, w = input_shape
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(), fc1=nn.Linear(c * h * w, hidden), relu1=nn.ReLU(), fc2=nn.Linear(hidden, num_classes),
    ))


def build_torch_model(name: str, input_shape, num_classes: int, mean, std, **kwargs) -> nn.Module:
    """`normalize` + `net`, as robustlab.models.build_model builds them, for either twin."""
    check_choice("tinygrad model", name, TWINS)
    if name == "cnn-small":
        return build_model(name, input_shape, num_classes, mean, std, **kwargs)
    net = mlp(tuple(input_shape), num_classes, **kwargs)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


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
