"""How one site finds its own slice of the data, from plain (exportable) job arguments.

Two ways, both deterministic so every run of a job sees the same data:
- a shared dataset cut by a seeded partitioner, the site's slice chosen by the number in its name
  (``site-1`` -> slice 0): the simulator and benchmark setting;
- a per-site folder: ``data_root`` containing ``{site_name}`` (e.g. ``/data/{site_name}``) and ``partition="none"``:
  the production setting, where each site only has its own data.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from ..data import LabelledDataset, load_dataset, partition_biased, partition_dirichlet, partition_iid
from .defs import PARTITIONS


def site_index(site_name: str, n_sites: int) -> int:
    """0-based slice index from the trailing number of a site name (``site-3`` -> 2)."""
    match = re.search(r"(\d+)$", site_name or "")
    if not match:
        raise ValueError(
            f"cannot tell which data slice site {site_name!r} owns: partitioned data needs site names ending in a "
            "number (site-1, site-2, ...); otherwise give each site its own folder with data_root='.../{site_name}' "
            "and partition='none'"
        )
    index = int(match.group(1)) - 1
    if not 0 <= index < n_sites:
        raise ValueError(
            f"site {site_name!r} maps to slice {index + 1} but the data is split into n_sites={n_sites} slices; "
            "set n_sites to the number of sites in the federation"
        )
    return index


def check_data_spec(dataset: str, partition: str, n_sites: int, alpha: float, q: float) -> None:
    """Boundary checks for the data arguments a recipe writes into the job (fail at recipe time, not on a site)."""
    from ..data import DATASET_NAMES

    if dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {list(DATASET_NAMES)}")
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {list(PARTITIONS)}, got {partition!r}")
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    if partition == "dirichlet" and not alpha > 0:
        raise ValueError(f"dirichlet partition needs alpha > 0, got {alpha}")
    if partition == "biased" and not 0.0 <= q <= 1.0:
        raise ValueError(f"biased partition needs q in [0, 1], got {q}")


def load_site_split(
    site_name: str,
    split: str,
    dataset: str = "digits",
    data_root: Optional[str] = None,
    partition: str = "iid",
    n_sites: int = 1,
    seed: int = 0,
    alpha: float = 0.5,
    q: float = 0.5,
    subset: Optional[int] = None,
) -> LabelledDataset:
    """This site's part of ``split`` ("train" or "test"); the same arguments give the same samples everywhere.

    The test split is always cut IID (seeded), so federated evaluation over all sites covers the whole test set
    exactly once, whatever the training partition.
    """
    check_data_spec(dataset, partition, n_sites, alpha, q)
    root = data_root.replace("{site_name}", site_name) if data_root else None
    full = load_dataset(dataset, root=root, split=split, subset=subset, seed=seed)
    if partition == "none" or n_sites == 1:
        return full
    index = site_index(site_name, n_sites)
    labels = np.asarray(full.targets)
    if split != "train" or partition == "iid":
        parts = partition_iid(labels, n_sites, seed=seed)
    elif partition == "dirichlet":
        parts = partition_dirichlet(labels, n_sites, alpha=alpha, seed=seed)
    else:
        parts = partition_biased(labels, n_sites, q=q, seed=seed)
    return full.subset(parts[index])
