"""The user's own data loading: each site reads its own shard of scikit-learn's 8x8 digits (bundled with
scikit-learn, no download). Nothing here comes from nvflare-unlearn; a real deployment would read the site's own
files instead.

Every site makes the same seeded, stratified train/test split, then keeps the samples of its own shard (the site
number at the end of its name picks the shard), so the sites' data never overlap and the sites' test shards
together are the whole test split.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch.utils.data import TensorDataset

NUM_CLASSES = 10
TEST_FRACTION = 0.25


def _digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # N x 1 x 8 x 8 in [0, 1]
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=TEST_FRACTION, random_state=seed, stratify=labels)


def shard_index(site_name: str, n_sites: int) -> int:
    """site-1 -> 0, site-2 -> 1, ...; a site name without a trailing number, or out of range, is an error."""
    match = re.search(r"(\d+)$", site_name)
    if not match or not 1 <= int(match.group(1)) <= n_sites:
        raise ValueError(f"site {site_name!r} does not name one of {n_sites} shards (site-1 .. site-{n_sites})")
    return int(match.group(1)) - 1


def load_site_data(site_name: str, n_sites: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of this site: every n_sites-th sample of a seeded shuffle, starting at its shard index."""
    x_train, x_test, y_train, y_test = _digits(seed)
    index = shard_index(site_name, n_sites)

    def shard(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        order = np.random.default_rng(seed).permutation(len(y))[index::n_sites]
        return TensorDataset(torch.from_numpy(x[order]), torch.from_numpy(y[order]))

    return shard(x_train, y_train), shard(x_test, y_test)


def without_classes(dataset: TensorDataset, drop: list[int]) -> TensorDataset:
    """The same samples minus the classes in ``drop`` (used when the server asks the sites to forget classes)."""
    x, y = dataset.tensors
    keep = ~torch.isin(y, torch.tensor(sorted(drop), dtype=y.dtype))
    return TensorDataset(x[keep], y[keep])


def only_classes(dataset: TensorDataset, keep: list[int]) -> TensorDataset:
    """The samples of the classes in ``keep`` (the forget-class images a method such as NegGrad+ trains away from)."""
    x, y = dataset.tensors
    mask = torch.isin(y, torch.tensor(sorted(keep), dtype=y.dtype))
    return TensorDataset(x[mask], y[mask])
