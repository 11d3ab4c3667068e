"""Tensor views of labelled data, shared by the forgetting tests and the in-process federation simulator.

Forgetting tests and simulated FedAvg run many short passes over small sets; holding the (already normalised)
images as one tensor on the compute device and slicing batches from it avoids per-item Python transforms and
host-to-device copies, which dominate on a GPU. Any `(x, y)` pair, `TensorDataset` or `LabelledDataset` (or any
map-style dataset of `(image, label)` items) is accepted.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, TensorDataset

__all__ = ["as_tensors", "EpochPermutation", "TensorBatches", "random_crop_flip", "site_shuffle_seed"]


def as_tensors(data: Any, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 [N, ...], y int64 [N]) for any supported labelled data; deterministic (no augmentation).

    A `LabelledDataset` built with `augment=True` would give one random crop per image here, so we refuse
    it rather than silently freezing an augmentation into an evaluation set.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        x, y = data
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    elif isinstance(data, TensorDataset):
        x, y = data.tensors[0], data.tensors[1]
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        transform = getattr(data, "transform", None)
        if getattr(transform, "augment", False):
            raise ValueError("dataset applies random augmentation; build it with augment=False for evaluation")
        n = len(data)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("dataset is empty")
        raw_x = getattr(data, "x", None)
        targets = getattr(data, "targets", None)
        if raw_x is not None and targets is not None and transform is None:
            x, y = torch.as_tensor(np.asarray(raw_x)), torch.as_tensor(np.asarray(targets))
        else:
            items = [data[i] for i in range(n)]
            x = torch.stack([torch.as_tensor(it[0]) for it in items])
            y = torch.as_tensor([int(it[1]) for it in items])
    else:
        raise ValueError(f"unsupported data type {type(data).__name__}: pass (x, y) tensors or a Dataset")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    x = x.to(torch.float32)
    y = y.to(torch.int64).reshape(-1)
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


def random_crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched random crop (zero pad `pad`) + horizontal flip on a normalised [N, C, H, W] tensor, on its device.

    Zero padding of normalised images pads with the dataset mean rather than black: a small, documented
    departure from torchvision's RandomCrop that keeps augmentation a pure tensor op.
    """
    n, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        offs = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device="cpu").to(dev)
        rows = (offs[:, 0:1] + torch.arange(h, device=dev)).view(n, 1, h, 1)
        cols = (offs[:, 1:2] + torch.arange(w, device=dev)).view(n, 1, 1, w)
        idx_n = torch.arange(n, device=dev).view(n, 1, 1, 1)
        idx_c = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
        x = padded[idx_n, idx_c, rows, cols]
    flip = (torch.rand(n, generator=generator, device="cpu") < 0.5).to(dev)
    return torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)


def site_shuffle_seed(seed: int, site_name: str, round_idx: int) -> int:
    """Seed of one site's batch order in one round (0-based), as the NVFlare executor derives it.

    One definition for both federations: the executor's ``EpochPermutation`` sampler and the in-process federation's
    ``TensorBatches`` (``fedsim``, ``FedConfig(emulate="nvflare")``) are seeded with it, so both draw the same
    ``torch.randperm`` each epoch and a run of one can be checked against the other step for step.
    """
    return zlib.crc32(f"{int(seed)}:{site_name}:{int(round_idx)}".encode())


class EpochPermutation(Sampler[int]):
    """A DataLoader sampler drawing exactly one ``torch.randperm(n)`` per epoch from its own seeded generator.

    The order ``TensorBatches(shuffle=True, seed=seed)`` draws, by construction. torch's ``RandomSampler`` draws a
    second, discarded permutation at the end of every epoch, and a DataLoader given the generator draws a worker
    seed from it first, so neither would reproduce this order past the first epoch.
    """

    def __init__(self, n: int, seed: int) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = int(n)
        self._gen = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self._gen).tolist())


class TensorBatches:
    """Re-iterable (x, y) mini-batches over in-memory tensors: what `train_epochs` and evaluators consume.

    Shuffling uses its own seeded generator, so a simulated site sees the same batch order for the same
    (seed, round) whichever method is being trained: method comparisons differ only in the method.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        augment: str = "none",
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if augment not in ("none", "flip", "crop_flip"):
            raise ValueError(f"augment must be 'none', 'flip' or 'crop_flip', got {augment!r}")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self._gen = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        order = torch.randperm(n, generator=self._gen) if self.shuffle else torch.arange(n)
        order = order.to(self.x.device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.drop_last and idx.numel() < self.batch_size:
                break
            xb = self.x[idx]
            if self.augment == "crop_flip":
                xb = random_crop_flip(xb, 4, self._gen)
            elif self.augment == "flip":
                xb = random_crop_flip(xb, 0, self._gen)
            yield xb, self.y[idx]
