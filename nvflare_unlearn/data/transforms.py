"""Input transforms done directly in torch on one CHW image.

Picklable classes (not lambdas) so datasets can cross process boundaries (DataLoader workers, NVFlare
client processes). By default (``normalize="dataset"``) CIFAR is normalised with the standard published channel
statistics, which match the shared data to 4 decimals (see ../shared/data/README.md), and digits are not
normalised; ``normalize="none"`` or explicit ``{"mean": [...], "std": [...]}`` match a user's own script, since a
model trained on one normalisation and evaluated on another is silently wrong (``dataset_stats``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nvflare_unlearn._validation import parse_normalize

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CifarTransform",
    "Normalize",
    "dataset_stats",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


#: the published channel statistics ``normalize="dataset"`` uses (digits: none, pixels stay in [0, 1])
_DATASET_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}


def dataset_stats(normalize: Any, dataset: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) a loader of ``dataset`` applies to images in [0, 1] for a ``normalize`` setting (see
    ``SiteDataOptions.normalize``); None: no normalisation. Explicit statistics must give one value or one per
    channel."""
    parsed = parse_normalize(normalize)
    if parsed == "none":
        return None
    if parsed == "dataset":
        return _DATASET_STATS.get(dataset)
    mean, std = parsed
    if len(mean) not in (1, channels):
        raise ValueError(
            f"normalize gives {len(mean)} mean/std values but {dataset} images have {channels} channel(s): give one "
            "value or one per channel"
        )
    return mean, std


class Normalize:
    """float [C, H, W] in [0, 1] -> (x - mean) / std per channel, as torchvision's Normalize after ToTensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError("mean and std must have the same length, std values positive")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return (img.to(torch.float32) - self._mean) / self._std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class CifarTransform:
    """uint8 [3, H, W] -> normalised float32 [3, H, W]; with `augment`, random crop (pad 4) and horizontal flip.

    Augmentation pads with black pixels before normalising, as torchvision's RandomCrop(32, padding=4) does.
    Randomness comes from torch's global generator, which DataLoader seeds per worker.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: bool = False, pad: int = 4) -> None:
        if len(mean) != len(std):
            raise ValueError("mean and std must have the same length")
        if any(s <= 0 for s in std):
            raise ValueError("std values must be positive")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = bool(augment)
        self.pad = int(pad)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(-1, 1, 1)
        self._shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)]).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.augment:
            img = self._crop_flip(img)
        return img.to(torch.float32) * self._scale - self._shift

    def _crop_flip(self, img: torch.Tensor) -> torch.Tensor:
        c, h, w = img.shape
        p = self.pad
        if p > 0:
            padded = torch.zeros((c, h + 2 * p, w + 2 * p), dtype=img.dtype)
            padded[:, p : p + h, p : p + w] = img
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            img = padded[:, top : top + h, left : left + w]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img

    def __repr__(self) -> str:
        return f"CifarTransform(mean={self.mean}, std={self.std}, augment={self.augment})"
