"""Shared fixtures-in-code for the core engine tests: a small CNN trained on sklearn's bundled digits."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from nvflare_unlearn.models import build_model


@functools.lru_cache(maxsize=1)
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as [N, 1, 8, 8] floats in [0, 1]; a fixed stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.3, random_state=0, stratify=d.target)
    return torch.from_numpy(xtr), torch.from_numpy(ytr).long(), torch.from_numpy(xte), torch.from_numpy(yte).long()


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def train(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 5, lr: float = 1e-2, seed: int = 0
) -> torch.nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader(x, y, batch_size=64, shuffle=True, seed=seed):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def class_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int = 10) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    return np.array([(pred[y == k] == k).float().mean().item() for k in range(num_classes)])


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch threads and restore the count after (results can depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def _trained_state() -> dict[str, torch.Tensor]:
    xtr, ytr, _, _ = digits_tensors()
    with torch_threads(2):
        torch.manual_seed(0)  # the initialisation must not depend on which test happens to train the model first
        model = train(build_model("small_cnn", 10), xtr, ytr)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_digits_cnn() -> torch.nn.Module:
    """A fresh copy of a small_cnn trained once per test session on digits (cached weights)."""
    model = build_model("small_cnn", 10)
    model.load_state_dict(_trained_state())
    return model.eval()


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Trained-like BatchNorm statistics and affine weights (so pruned channels actually matter in outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()
