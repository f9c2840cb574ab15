"""The MLP and cnn-small in tinygrad, with state-dict names and layouts that match the PyTorch twins.

Weights are kept in PyTorch's layout (conv O×C×3×3, linear out×in) under PyTorch's names
(`normalize.mean`, `net.conv1.weight`, ...), so transfer is a copy in either direction and a
tinygrad-trained model saves into robustlab's checkpoint format as it is.

The convolutions are computed as im2col + matmul on channels-last activations rather than with
`Tensor.conv2d`: on tinygrad's CPU device that is about 4× faster for cnn-small's 32→64 layer,
forward and backward (measured: 0.48 s against 2.0 s at batch 128 on this 2-core machine).
"""
from __future__ import annotations

import numpy as np

from robustlab.errors import RobustlabError, check_choice
from robustlab.tinygrad.backend import require
from robustlab.tinygrad.torch_twins import TWINS, architecture_of, build_torch_model

require()
from tinygrad import Tensor, nn  # noqa: E402
from tinygrad.nn.state import get_state_dict  # noqa: E402


class Normalize:
    """(x - mean) / std per channel; mean and std are buffers (is_param False), not trained."""

    def __init__(self, mean, std):
        self.mean = Tensor(np.asarray(mean, np.float32).reshape(1, -1, 1, 1)).is_param_(False)
        self.std = Tensor(np.asarray(std, np.float32).reshape(1, -1, 1, 1)).is_param_(False)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class _Net:
    """A bare attribute holder, so that get_state_dict names the layers `net.<layer>.<weight>`."""


def conv3x3_nhwc(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """3×3 convolution, stride 1, zero padding 1, on N×H×W×C input with an O×C×3×3 (PyTorch) weight.

    The nine shifted views are materialized (`contiguous`) into one N·H·W × 9C matrix, so the
    convolution becomes a single matmul that tinygrad's CPU kernels run well.
    """
    n, h, w, c = x.shape
    padded = x.pad(((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = Tensor.stack(*[padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], dim=3)
    cols = cols.reshape(n * h * w, 9 * c).contiguous()
    kernel = weight.permute(2, 3, 1, 0).reshape(9 * c, -1)  # (ki, kj, c) rows, matching cols
    return (cols.matmul(kernel) + bias).reshape(n, h, w, -1)


def maxpool2_nhwc(x: Tensor) -> Tensor:
    """2×2 max-pooling. Where a window ties (flat backgrounds), tinygrad's max splits the gradient among the tied
    inputs and PyTorch's max_pool2d gives it all to the first: both are gradients of the same function, but the
    input gradients of cnn-small's twins then differ, and FGSM's signs with them (6.6% of the pixels of a trained
    model). Routing it to the first maximum (argmax and a one-hot) made a PGD-AT step 35–50% slower, so the twins
    agree in their outputs and in their attacks' accuracy (tests/test_tinygrad.py), not example for example."""
    n, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2, :].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class TinyModel:
    """Shared by both models: input checks, normalization, state-dict transfer, the PyTorch twin."""
    name = ""
    kwargs: dict = {}  # options beyond the shapes, passed on to the PyTorch twin

    def __init__(self, input_shape, num_classes, mean, std):
        self.input_shape, self.num_classes = tuple(int(s) for s in input_shape), int(num_classes)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)  # as given, for metadata
        self.normalize = Normalize(mean, std)
        self.net = _Net()

    def __call__(self, x: Tensor) -> Tensor:
        """Logits for x in [0, 1], shaped N×C×H×W or N×(C·H·W)."""
        if x.numel() != x.shape[0] * int(np.prod(self.input_shape)):
            raise RobustlabError(f"{self.name} expects inputs of shape N×{'×'.join(map(str, self.input_shape))}, "
                                 f"got {tuple(x.shape)}")
        return self.forward(self.normalize(x.reshape(x.shape[0], *self.input_shape)))

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def parameters(self) -> list[Tensor]:
        """The trainable tensors (normalization buffers excluded), in state-dict order."""
        return [t for t in self.state_dict_tensors().values() if t.is_param]

    def state_dict_tensors(self) -> dict[str, Tensor]:
        return {k: v for k, v in get_state_dict(self).items() if k.startswith(("normalize.", "net."))}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Weights as float32 numpy arrays under the PyTorch twin's names."""
        return {k: v.numpy() for k, v in self.state_dict_tensors().items()}

    def load_state_dict(self, state: dict) -> "TinyModel":
        """Copy weights in from numpy arrays or torch tensors (names and shapes must match exactly)."""
        own = self.state_dict_tensors()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise RobustlabError(f"state dict does not fit {self.name}: missing {missing}, unexpected {extra}")
        for key, tensor in own.items():
            value = np.asarray(state[key].detach().cpu() if hasattr(state[key], "detach") else state[key], np.float32)
            if tuple(value.shape) != tuple(tensor.shape):
                raise RobustlabError(f"{key}: shape {tuple(value.shape)} does not fit {self.name}'s {tuple(tensor.shape)}")
            # assign into the existing buffer (not replace): a TinyJit that captured it stays valid
            tensor.realize().assign(Tensor(value.copy(), device=tensor.device)).realize()
        # the shortest decimal of each float32 (0.286, not 0.28600001335144043), for readable metadata
        self.mean, self.std = (tuple(float(str(v)) for v in self.normalize.mean.numpy().ravel()),
                               tuple(float(str(v)) for v in self.normalize.std.numpy().ravel()))
        return self

    def to_torch(self):
        """The PyTorch twin with these weights, in eval mode."""
        import torch
        model = build_torch_model(self.name, self.input_shape, self.num_classes, self.mean, self.std, **self.kwargs)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in self.state_dict().items()})
        return model.eval()


class MLP(TinyModel):
    """TinyBobNet's 784-128-10 layout: flatten, linear, ReLU, linear."""
    name = "mlp"

    def __init__(self, input_shape=(1, 28, 28), num_classes=10, mean=(0.0,), std=(1.0,), hidden: int = 128):
        super().__init__(input_shape, num_classes, mean, std)
        self.kwargs = {"hidden": hidden} if hidden != 128 else {}
        self.net.fc1 = nn.Linear(int(np.prod(self.input_shape)), hidden)
        self.net.fc2 = nn.Linear(hidden, self.num_classes)

    def forward(self, x):
        return self.net.fc2(self.net.fc1(x.flatten(1)).relu())


class CNNSmall(TinyModel):
    """robustlab's cnn-small: conv 1→32, ReLU, pool, conv 32→64, ReLU, pool, linear →128, ReLU, linear."""
    name = "cnn-small"

    def __init__(self, input_shape=(1, 28, 28), num_classes=10, mean=(0.0,), std=(1.0,)):
        super().__init__(input_shape, num_classes, mean, std)
        c, h, w = self.input_shape
        self.net.conv1 = nn.Conv2d(c, 32, 3, padding=1)
        self.net.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.net.fc1 = nn.Linear(64 * (h // 4) * (w // 4), 128)
        self.net.fc2 = nn.Linear(128, self.num_classes)

    def forward(self, x):
        net = self.net
        x = x.permute(0, 2, 3, 1)  # channels-last for the im2col convolutions
        x = maxpool2_nhwc(conv3x3_nhwc(x, net.conv1.weight, net.conv1.bias).relu())
        x = maxpool2_nhwc(conv3x3_nhwc(x, net.conv2.weight, net.conv2.bias).relu())
        x = x.permute(0, 3, 1, 2).flatten(1)  # PyTorch's C×H×W flattening order, so fc1 transfers as it is
        return net.fc2(net.fc1(x).relu())


MODELS = {"mlp": MLP, "cnn-small": CNNSmall}
OPTIONS = {"mlp": {"hidden"}, "cnn-small": set()}
assert set(MODELS) == set(TWINS)


def build_model(name: str, input_shape=(1, 28, 28), num_classes: int = 10, mean=(0.0,), std=(1.0,),
                **kwargs) -> TinyModel:
    """A tinygrad model by robustlab name ('mlp' or 'cnn-small'), with tinygrad's own initialization.

    kwargs go to the model (the MLP's `hidden`); cnn-small takes none.
    """
    check_choice("tinygrad model", name, MODELS)
    unknown = sorted(set(kwargs) - OPTIONS[name])
    if unknown:
        raise RobustlabError(f"model {name!r} has no option {', '.join(unknown)}; it takes: {', '.join(sorted(OPTIONS[name])) or 'none'}")
    return MODELS[name](input_shape, num_classes, mean, std, **kwargs)


def from_torch(torch_model) -> TinyModel:
    """The tinygrad version of a PyTorch cnn-small or MLP twin, with a copy of its weights.

    The input shape comes from the model's checkpoint metadata when it has some (models from
    robustlab.load_model do), else it is inferred for square images.
    """
    state = torch_model.state_dict()
    name, input_shape, num_classes = architecture_of(state)
    meta = getattr(torch_model, "checkpoint_meta", None)
    if meta and "dataset" in meta:
        input_shape = tuple(meta["dataset"]["input_shape"])
    hidden = state["net.fc1.weight"].shape[0]
    kwargs = {"hidden": hidden} if name == "mlp" and hidden != 128 else {}
    mean, std = (state[f"normalize.{k}"].flatten().tolist() for k in ("mean", "std"))  # 3 channels for CIFAR
    return build_model(name, input_shape, num_classes, mean, std, **kwargs).load_state_dict(state)
