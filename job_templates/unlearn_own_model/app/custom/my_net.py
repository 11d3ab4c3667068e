"""The user's own network: a small residual CNN for 8x8 grey digits. Not part of nvflare-unlearn's registry.

Its layer names are its own (``entry``, ``stage1.conv_in`` ...). The residual additions tie the output channels
of ``entry`` with ``stage1.conv_out``, and of ``widen`` with ``stage2.conv_out``, so pruning must remove the same
channels from both members of each pair (torch-pruning's DependencyGraph finds these coupled groups).

nvflare-unlearn names this model by import path, ``"my_net:build_net"``; ``build_net.input_shape`` tells it the
input size to trace the network with.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResidualPair(nn.Module):
    """Two 3x3 convs with a skip connection: ``relu(x + bn(conv(relu(bn(conv(x))))))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm_in = nn.BatchNorm2d(channels)
        self.conv_out = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm_out = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm_in(self.conv_in(x)))
        return F.relu(x + self.norm_out(self.conv_out(h)))


class DigitResNet(nn.Module):
    """entry conv -> residual pair -> strided conv (8x8 -> 4x4, twice the width) -> residual pair -> linear."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1):
        super().__init__()
        self.entry = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.entry_norm = nn.BatchNorm2d(width)
        self.stage1 = ResidualPair(width)
        self.widen = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.widen_norm = nn.BatchNorm2d(2 * width)
        self.stage2 = ResidualPair(2 * width)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.entry_norm(self.entry(x)))
        x = self.stage1(x)
        x = F.relu(self.widen_norm(self.widen(x)))
        x = self.stage2(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_net(num_classes: int = 10, width: int = 16) -> DigitResNet:
    """The factory nvflare-unlearn calls on the server and every site: ``build_net(num_classes=K)``."""
    return DigitResNet(num_classes=num_classes, width=width)


#: (C, H, W) of one input: the shape nvflare-unlearn traces the model with to find coupled channels.
build_net.input_shape = (1, 8, 8)
