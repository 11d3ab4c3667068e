"""Architectures for the pruning property tests (tests/test_architectures.py), importable by path as user models.

torchvision's ``resnet18`` (residual adds), ``mobilenet_v2`` (depthwise convs, inverted residuals),
``densenet121`` (concatenation followed by BatchNorm) and ``googlenet`` (four-branch concatenation, auxiliary heads
used only in training), each with its ``input_shape``; and small hand-made models for the patterns one at a time,
including the ones whose channels must be excluded (grouped convs, a depthwise conv on the input, a hard-coded
view, shared weights, a conv classifier). Every factory takes ``num_classes`` like any model given by import path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


def resnet18(num_classes: int = 10) -> nn.Module:
    return torchvision.models.resnet18(num_classes=num_classes)


def mobilenet_v2(num_classes: int = 10) -> nn.Module:
    return torchvision.models.mobilenet_v2(num_classes=num_classes)


def densenet121(num_classes: int = 10) -> nn.Module:
    return torchvision.models.densenet121(num_classes=num_classes)


def googlenet(num_classes: int = 10) -> nn.Module:
    """With its two auxiliary heads (train mode only): the channels feeding them are excluded."""
    return torchvision.models.googlenet(num_classes=num_classes, aux_logits=True, init_weights=True)


resnet18.input_shape = mobilenet_v2.input_shape = densenet121.input_shape = (3, 32, 32)
googlenet.input_shape = (3, 64, 64)  # its five stride-2 stages and the auxiliary heads' 4x4 pooling need 64x64


class DigitsDenseNet(nn.Module):
    """torchvision's densenet121 for 1x8x8 digits: a one-channel stem, the images upsampled to 32x32 first."""

    input_shape = (1, 8, 8)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = torchvision.models.densenet121(num_classes=num_classes)
        self.net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(F.interpolate(x, scale_factor=4.0, mode="nearest"))


def _cbr(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class ConcatNet(nn.Module):
    """Inception/DenseNet in small: two branches concatenated with their input, then one BatchNorm over all."""

    input_shape = (3, 16, 16)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.a = _cbr(8, 6)
        self.b = _cbr(8, 10, k=1)
        self.norm = nn.BatchNorm2d(24)
        self.post = _cbr(24, 12)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.relu(self.norm(torch.cat([self.a(s), self.b(s), s], 1)))
        return self.fc(self.post(y).mean((2, 3)))


class DepthwiseNet(nn.Module):
    """Depthwise-separable blocks, an inverted residual (add), and the convs that cannot be pruned: a depthwise conv
    on the input, a channel-multiplier conv (groups=in, out=2 x in) and a ResNeXt-style grouped conv."""

    input_shape = (3, 16, 16)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.input_dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.stem = _cbr(3, 16)
        self.dw = _cbr(16, 16, groups=16)
        self.pw = _cbr(16, 24, k=1)
        self.expand = _cbr(24, 48, k=1)
        self.dw2 = _cbr(48, 48, groups=48)
        self.project = nn.Sequential(nn.Conv2d(48, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.bridge = _cbr(24, 24, k=1)
        self.mult = _cbr(24, 48, groups=24)
        self.pw2 = _cbr(48, 32, k=1)
        self.grouped = _cbr(32, 32, groups=4)
        self.pw3 = _cbr(32, 16, k=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(self.input_dw(x))))
        x = x + self.project(self.dw2(self.expand(x)))
        x = self.pw3(self.grouped(self.pw2(self.mult(self.bridge(x)))))
        return self.fc(x.mean((2, 3)))


class MultiHeadNet(nn.Module):
    """A residual trunk split into two branches, each with its own head, plus a head on both: logits summed."""

    input_shape = (3, 16, 16)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.res = _cbr(3, 16), _cbr(16, 16)  # the trunk, then its two branches
        self.left, self.right = _cbr(16, 8), _cbr(16, 12)
        self.head_left = nn.Linear(8, num_classes)
        self.head_right = nn.Linear(12, num_classes)
        self.head_both = nn.Linear(20, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        s = s + self.res(s)
        left, right = self.left(s).mean((2, 3)), self.right(s).mean((2, 3))
        return self.head_left(left) + self.head_right(right) + self.head_both(torch.cat([left, right], 1))


class OddNet(nn.Module):
    """What cannot be pruned without breaking the model: a conv used twice (shared weights), a view that hard-codes
    a width, and a conv whose channels are the class scores."""

    input_shape = (3, 16, 16)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.twice = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = _cbr(8, 12)
        self.fixed = _cbr(12, 16)
        self.side = _cbr(12, 6)
        self.classifier = nn.Conv2d(6, num_classes, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.twice(torch.relu(self.twice(self.stem(x)))))
        m = self.mid(s)
        pooled = self.fixed(m).mean((2, 3)).view(-1, 16)
        return self.fc(pooled) + self.classifier(self.side(m)).mean((2, 3))


HAND_MADE = {
    "concat": ConcatNet,
    "depthwise": DepthwiseNet,
    "multi_head": MultiHeadNet,
    "odd": OddNet,
}
TORCHVISION = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "densenet121": densenet121,
    "googlenet": googlenet,
}
