"""How one site finds its own slice of the data, from plain (exportable) job arguments.

Two ways, both deterministic so every run of a job sees the same data:
- a shared dataset cut by a seeded partitioner, the site's slice chosen by the number in its name
  (``site-1`` -> slice 0): the simulator and benchmark setting;
- a per-site folder: ``data_root`` containing ``{site_name}`` (e.g. ``/data/{site_name}``) and ``partition="none"``:
  the production setting, where each site only has its own data.
"""

from __future__ import annotations

import re

import numpy as np

from nvflare_unlearn.data import LabelledDataset, load_dataset, partition_biased, partition_dirichlet, partition_iid
from nvflare_unlearn.options import SiteDataOptions


def site_index(site_name: str, num_clients: int) -> int:
    """0-based slice index from the trailing number of a site name (``site-3`` -> 2)."""
    match = re.search(r"(\d+)$", site_name or "")
    if not match:
        raise ValueError(
            f"cannot tell which data slice site {site_name!r} owns: partitioned data needs site names ending in a "
            "number (site-1, site-2, ...); otherwise give each site its own folder with data_root='.../{site_name}' "
            "and partition='none'"
        )
    index = int(match.group(1)) - 1
    if not 0 <= index < num_clients:
        raise ValueError(
            f"site {site_name!r} maps to slice {index + 1} but the data is split into num_clients={num_clients} "
            "slices; set num_clients to the number of sites in the federation"
        )
    return index


def load_site_split(site_name: str, split: str, data: SiteDataOptions | dict | None = None) -> LabelledDataset:
    """This site's part of ``split`` ("train" or "test"); the same options give the same samples everywhere.

    The test split is always cut IID (seeded), so federated evaluation over all sites covers the whole test set
    exactly once, whatever the training partition.
    """
    opts = SiteDataOptions.from_dict(data)
    root = opts.data_root.replace("{site_name}", site_name) if opts.data_root else None
    subset = opts.train_subset if split == "train" else None
    full = load_dataset(
        opts.dataset, root=root, split=split, subset=subset, seed=opts.data_seed, normalize=opts.normalize
    )
    if opts.partition == "none" or opts.num_clients == 1:
        return full
    index = site_index(site_name, opts.num_clients)
    labels = np.asarray(full.targets)
    if split != "train" or opts.partition == "iid":
        parts = partition_iid(labels, opts.num_clients, seed=opts.data_seed)
    elif opts.partition == "dirichlet":
        parts = partition_dirichlet(labels, opts.num_clients, alpha=opts.alpha, seed=opts.data_seed)
    else:
        parts = partition_biased(labels, opts.num_clients, q=opts.q, seed=opts.data_seed)
    return full.subset(parts[index])
