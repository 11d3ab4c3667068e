"""A small CNN for scikit-learn's 8x8 grey digits, shaped like NVIDIA FLARE's hello-pt network: two conv + pool
stages, then three fully connected layers (written for this example, not copied)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(1, 16, 3, padding=1)  # 8x8 -> 8x8, pooled to 4x4
        self.conv_b = nn.Conv2d(16, 32, 3, padding=1)  # 4x4 -> 4x4, pooled to 2x2
        self.pool = nn.MaxPool2d(2)
        self.hidden1 = nn.Linear(32 * 2 * 2, 64)
        self.hidden2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv_a(x)))
        x = self.pool(F.relu(self.conv_b(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.hidden1(x))
        x = F.relu(self.hidden2(x))
        return self.out(x)
