"""Residual networks in their CIFAR layouts (3×3 stem, no initial max-pool).

`width` scales every stage (64 → 64·width/64), so a narrow ResNet trains on a CPU. Activations are
`nn.ReLU` modules rather than `F.relu` calls so that an evaluation can swap them (the smooth-gradient attack,
`robustlab.attacks.smooth`).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    """He et al. 2016 pre-activation block: BN-ReLU before each conv."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + skip


class BasicBlock(nn.Module):
    """The post-activation block of the original ResNet."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, blocks_per_stage, stem_width, stage_widths, in_channels, num_classes, preact,
                 stem_stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stem_stride, 1, bias=False)
        # Post-activation nets normalize the stem; pre-activation nets normalize at the end instead.
        self.bn1 = nn.BatchNorm2d(stem_width) if not preact else None
        self.relu = nn.ReLU()  # after the stem's BN (post-activation) or the final BN (pre-activation)
        layers, cin = [], stem_width
        for i, (n, cout) in enumerate(zip(blocks_per_stage, stage_widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(block(cin, cout, stride if j == 0 else 1))
                cin = cout
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers[:3]
        self.layer4 = layers[3] if len(layers) > 3 else None
        self.bn_final = nn.BatchNorm2d(cin) if preact else None
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        if self.bn1 is not None:
            out = self.relu(self.bn1(out))
        out = self.layer3(self.layer2(self.layer1(out)))
        if self.layer4 is not None:
            out = self.layer4(out)
        if self.bn_final is not None:
            out = self.relu(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def preact_resnet18(input_shape, num_classes, width=64):
    """PreAct-ResNet-18 (21 Conv/Linear modules); `width=16` gives a CPU-sized variant."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    return ResNet(PreActBlock, [2, 2, 2, 2], width, widths, input_shape[0], num_classes, preact=True)


def preact_resnet18_small(input_shape, num_classes, width=16):
    """PreAct-ResNet-18 for small grayscale images on a CPU: width 16 and a stride-2 stem (28×28 → 14×14).

    The same 21 Conv/Linear modules and 0.7 M parameters as `preact-resnet18 --width 16`, at about 2.4× its
    speed (measured with PGD-10 training steps on Fashion-MNIST): a residual network with enough modules for
    RiFT that trains with PGD-AT in about an hour on a 2-core CPU.
    """
    widths = [width, 2 * width, 4 * width, 8 * width]
    return ResNet(PreActBlock, [2, 2, 2, 2], width, widths, input_shape[0], num_classes, preact=True, stem_stride=2)


def resnet18(input_shape, num_classes, width=64):
    widths = [width, 2 * width, 4 * width, 8 * width]
    return ResNet(BasicBlock, [2, 2, 2, 2], width, widths, input_shape[0], num_classes, preact=False)


def wide_resnet28_10(input_shape, num_classes, depth=28, widen=10):
    n = (depth - 4) // 6
    widths = [16 * widen, 32 * widen, 64 * widen]
    # The wide block is the pre-activation block (Zagoruyko & Komodakis 2016), without dropout as in robust training.
    net = ResNet(PreActBlock, [n, n, n], 16, widths, input_shape[0], num_classes, preact=True)
    # The initialization of the WRN code that TRADES, MART and AWP train (wideresnet.py): He normal over each
    # convolution's fan-out, BatchNorm at 1 and 0, the classifier's bias at 0 (its weight keeps PyTorch's default).
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return net
