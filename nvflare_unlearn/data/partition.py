"""Split sample indices across FL sites: IID, Dirichlet(alpha) label skew, and the paper's biased scheme
(Fang et al.: sites in M groups, a label-m sample goes to group m with probability q).

Every partitioner is deterministic for a seed, assigns every sample to exactly one site, and returns one
sorted int64 index array per site. With `min_size >= 1`, a site left empty by chance receives samples from
the largest site, so every simulated site has data to train on.
"""

from __future__ import annotations

import numpy as np

__all__ = ["partition_iid", "partition_dirichlet", "partition_biased", "site_class_counts"]


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative class ids")
    return labels.astype(np.int64, copy=False)


def _check_sites(n_sites: int, n_samples: int, min_size: int) -> None:
    if isinstance(n_sites, bool) or not isinstance(n_sites, (int, np.integer)) or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if n_sites * min_size > n_samples:
        raise ValueError(
            f"cannot give {n_sites} sites at least {min_size} sample(s) each from {n_samples} samples; "
            f"use fewer sites or min_size=0"
        )


def _finish(site_of: np.ndarray, n_sites: int, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Turn a site id per sample into index arrays, topping up sites below `min_size` from the largest."""
    sizes = np.bincount(site_of, minlength=n_sites)
    for s in np.flatnonzero(sizes < min_size):
        while sizes[s] < min_size:
            donor = int(np.argmax(sizes))
            moved = rng.choice(np.flatnonzero(site_of == donor))
            site_of[moved] = s
            sizes[donor] -= 1
            sizes[s] += 1
    order = np.argsort(site_of, kind="stable")
    bounds = np.cumsum(np.bincount(site_of, minlength=n_sites))[:-1]
    return [np.asarray(part, dtype=np.int64) for part in np.split(order, bounds)]


def partition_iid(labels: np.ndarray, n_sites: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and cut into `n_sites` near-equal parts (sizes differ by at most one)."""
    labels = _check_labels(labels)
    _check_sites(n_sites, labels.size, 0)
    rng = np.random.default_rng(seed)
    return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(labels.size), n_sites)]


def partition_dirichlet(
    labels: np.ndarray, n_sites: int, alpha: float, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Per class, site shares drawn from Dirichlet(alpha): small alpha -> each site sees few classes."""
    labels = _check_labels(labels)
    _check_sites(n_sites, labels.size, min_size)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    rng = np.random.default_rng(seed)
    site_of = np.empty(labels.size, dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(n_sites, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * idx.size).astype(np.int64)
        for site, part in enumerate(np.split(idx, cuts)):
            site_of[part] = site
    return _finish(site_of, n_sites, min_size, rng)


def partition_biased(
    labels: np.ndarray,
    n_sites: int,
    q: float,
    seed: int = 0,
    num_groups: int | None = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """The paper's non-IID scheme (Fang et al., 2020), Sec. 5.1.

    Sites are randomly split into M groups (M = number of classes, or `num_groups`; at most `n_sites`).
    A sample with label m goes to group m mod M with probability q, otherwise to one of the other M-1
    groups uniformly; within a group it goes to a uniformly chosen site. q = 1/M is IID; q = 1 gives each
    group only its own classes.
    """
    labels = _check_labels(labels)
    _check_sites(n_sites, labels.size, min_size)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"bias probability q must be in [0, 1], got {q}")
    n_classes = int(labels.max()) + 1 if labels.size else 1
    m = min(n_classes, n_sites) if num_groups is None else num_groups
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= n_sites:
        raise ValueError(f"num_groups must be an integer in 1..n_sites ({n_sites}), got {num_groups!r}")
    rng = np.random.default_rng(seed)
    groups = np.array_split(rng.permutation(n_sites), m)  # site ids per group
    home = labels % m
    if m == 1:
        group_of = np.zeros(labels.size, dtype=np.int64)
    else:
        stay = rng.random(labels.size) < q
        other = (home + rng.integers(1, m, size=labels.size)) % m  # uniform over the other M-1 groups
        group_of = np.where(stay, home, other)
    site_of = np.empty(labels.size, dtype=np.int64)
    for g, members in enumerate(groups):
        where = np.flatnonzero(group_of == g)
        site_of[where] = members[rng.integers(0, members.size, size=where.size)]
    return _finish(site_of, n_sites, min_size, rng)


def site_class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """[n_sites, K] sample counts per site and class: a quick look at how skewed a partition is."""
    labels = _check_labels(labels)
    k = num_classes if num_classes is not None else (int(labels.max()) + 1 if labels.size else 0)
    return np.stack([np.bincount(labels[p], minlength=k) for p in parts]).astype(np.int64)
