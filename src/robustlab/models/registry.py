"""Build models by name. Each builder takes the input shape (C, H, W) and the number of classes."""
from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from robustlab.errors import RobustlabError, check_choice
from robustlab.models import resnet


class Normalize(nn.Module):
    """(x - mean) / std per channel, so that attacks and users only ever see pixels in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def cnn_small(input_shape, num_classes):
    """The protocol's reference CNN: two 3×3 conv blocks with max-pooling, then 128 hidden units.

    Each block pools before its ReLU. ReLU is monotone, so max-pool∘ReLU = ReLU∘max-pool exactly (the
    protocol's conv, ReLU, max-pool), and ReLU then runs on a quarter of the activations: a PGD-10 training
    step is 1.2× faster in bf16 and fp32 alike. The parameter names are the same either way."""
    c, h, w = input_shape
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(c, 32, 3, padding=1), pool1=nn.MaxPool2d(2), relu1=nn.ReLU(),
        conv2=nn.Conv2d(32, 64, 3, padding=1), pool2=nn.MaxPool2d(2), relu2=nn.ReLU(),
        flatten=nn.Flatten(),
        fc1=nn.Linear(64 * (h // 4) * (w // 4), 128), relu3=nn.ReLU(),
        fc2=nn.Linear(128, num_classes),
    ))


def mlp(input_shape, num_classes, hidden: int = 128):
    """One hidden layer, TinyBobNet's layout (784-128-10 on MNIST), with biases; the tinygrad backend's other model."""
    c, h, w = input_shape
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(), fc1=nn.Linear(c * h * w, hidden), relu1=nn.ReLU(), fc2=nn.Linear(hidden, num_classes),
    ))


def lenet(input_shape, num_classes):
    """LeNet-5 layout (5×5 convs with 6 and 16 channels, 120-84 hidden units)."""
    c, h, w = input_shape
    h2, w2 = (h // 2 - 4) // 2, (w // 2 - 4) // 2
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(c, 6, 5, padding=2), pool1=nn.MaxPool2d(2), relu1=nn.ReLU(),  # pool first, as in cnn_small
        conv2=nn.Conv2d(6, 16, 5), pool2=nn.MaxPool2d(2), relu2=nn.ReLU(),
        flatten=nn.Flatten(),
        fc1=nn.Linear(16 * h2 * w2, 120), relu3=nn.ReLU(),
        fc2=nn.Linear(120, 84), relu4=nn.ReLU(),
        fc3=nn.Linear(84, num_classes),
    ))


def cnn_strided(input_shape, num_classes):
    """Two 4×4 stride-2 convolutions (16 and 32 channels) and 100 hidden units: the MNIST network of Wong et al.'s
    Fast-AT code (`MNIST/mnist_net.py` in locuslab/fast_adversarial), whose published weights
    `experiments/fast_at_mnist.py` imports."""
    c, h, w = input_shape
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(c, 16, 4, stride=2, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(16, 32, 4, stride=2, padding=1), relu2=nn.ReLU(),
        flatten=nn.Flatten(),
        fc1=nn.Linear(32 * (h // 4) * (w // 4), 100), relu3=nn.ReLU(),
        fc2=nn.Linear(100, num_classes),
    ))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn-small": cnn_small,
    "cnn-strided": cnn_strided,
    "lenet": lenet,
    "mlp": mlp,
    "preact-resnet18": resnet.preact_resnet18,
    "preact-resnet18-small": resnet.preact_resnet18_small,
    "resnet18": resnet.resnet18,
    "wrn-28-10": resnet.wide_resnet28_10,
}


def model_options(name: str) -> list[str]:
    """The keywords the named network's builder takes besides the input shape and the classes (e.g. `width`)."""
    return sorted(set(inspect.signature(MODELS[name]).parameters) - {"input_shape", "num_classes"})


def build_model(name: str, input_shape, num_classes: int, mean, std, **kwargs) -> nn.Module:
    """`Normalize` followed by the named network; `kwargs` go to the builder (e.g. `width`)."""
    check_choice("model", name, MODELS)
    takes = model_options(name)
    if unknown := sorted(set(kwargs) - set(takes)):  # e.g. --width on cnn-small: a TypeError from the builder
        raise RobustlabError(f"model {name!r} has no option {', '.join(unknown)}; it takes: {', '.join(takes) or 'none'}")
    check_normalization(mean, std, input_shape[0])
    with _no_empty_layer_warning():  # a network too small for its images has one; it is refused just below
        net = MODELS[name](tuple(input_shape), num_classes, **kwargs)
    check_input_size(net, name, tuple(input_shape), num_classes, kwargs)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def check_normalization(mean, std, channels: int):
    """A mean and a std > 0 per channel, or one of each for all: a std of 0 gave a model of inf and NaN logits, and
    three means for one channel broadcast the images to three channels, failing in the first layer."""
    mean, std = (torch.as_tensor(v, dtype=torch.float64).flatten().tolist() for v in (mean, std))
    if ({len(mean), len(std)} - {1, channels} or not all(math.isfinite(v) for v in mean)
            or not all(math.isfinite(v) and v > 0 for v in std)):
        raise RobustlabError(f"normalization takes a finite mean and a finite std > 0 per channel ({channels} here), or "
                             f"one of each for all; got mean {mean} and std {std}")


@contextmanager
def _no_empty_layer_warning():
    """Without torch's "Initializing zero-element tensors is a no-op" (lenet's Linear(0, 120) at 8×8)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        yield


def _error_on_one_image(net: nn.Module, input_shape) -> str | None:
    """None where `net` takes one image of `input_shape`, else the first line of its error. In eval mode (no
    BatchNorm statistics move) and without gradients: a few milliseconds for cnn-small, 0.1 s for WRN-28-10. (On
    the meta device it would cost no arithmetic, but the first meta call of a process takes a second.)"""
    with eval_mode(net), torch.no_grad():
        try:
            net(torch.zeros(1, *input_shape))
        except RuntimeError as exc:
            return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def check_input_size(net: nn.Module, name: str, input_shape, num_classes: int, kwargs) -> None:
    """Images too small for the network (8×8 for lenet's two 5×5 convolutions and pools) failed in the first
    training step's traceback, after the data had been read."""
    if (error := _error_on_one_image(net, input_shape)) is None:
        return
    c, h, w = input_shape

    def grown(s):  # each side at least s
        return c, max(h, s), max(w, s)
    with _no_empty_layer_warning():
        fits = (s for s in range(min(h, w) + 1, 65)
                if _error_on_one_image(MODELS[name](grown(s), num_classes, **kwargs), grown(s)) is None)
        smallest = next(fits, None)
    need = f" (it needs at least {smallest} pixels a side)" if smallest else ""
    raise RobustlabError(f"model {name!r} cannot take {h}×{w} images{need}: {error}")


def classifier_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Conv and Linear modules of a model, by qualified name (the units RiFT and AWP work on)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of `model` (1d, 2d, 3d, SyncBatchNorm)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside; afterwards every module's own mode as the caller left it (`model.train(was_training)`
    would flatten them, e.g. switch a BatchNorm layer the caller had frozen in eval mode back to training)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are; evaluation and attacks bring their data there."""
    weight = next(model.parameters(), None)
    return weight.device if weight is not None else torch.device("cpu")


def channels_last_safe(model: nn.Module, device="cpu") -> bool:
    """Whether `model` may run in channels_last on `device`.

    PyTorch 2.13's CPU (oneDNN) backward of a strided 1×1 convolution with fewer than 8 input channels,
    in channels_last, corrupts the heap (the process dies in free()); narrow ResNets (`--width 4`) have
    such shortcuts. Those models stay in the default format on CPUs.
    """
    if torch.device(device).type != "cpu":
        return True
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels % 8
                   for m in model.modules())


def fast_memory_format(model: nn.Module, device="cpu") -> torch.memory_format:
    """channels_last (the faster layout for convolutions on this project's CPUs) where it is safe."""
    return torch.channels_last if channels_last_safe(model, device) else torch.contiguous_format
