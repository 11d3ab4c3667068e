"""Class-level views of a dataset: keep/drop classes, and the forget (U) / retain (R) split."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from nvflare_unlearn.data.dataset import LabelledDataset, check_class_ids

__all__ = ["filter_classes", "split_forget_retain"]


def filter_classes(
    dataset: LabelledDataset, keep: int | Iterable[int] | None = None, drop: int | Iterable[int] | None = None
) -> LabelledDataset:
    """Samples whose label is in `keep` (or not in `drop`); give exactly one. Labels keep their ids."""
    if (keep is None) == (drop is None):
        raise ValueError("filter_classes needs exactly one of keep= or drop=")
    ids = check_class_ids(keep if keep is not None else drop, dataset.num_classes)
    mask = np.isin(dataset.targets, ids)
    return dataset.subset(np.flatnonzero(mask if keep is not None else ~mask))


def split_forget_retain(
    dataset: LabelledDataset, forget_classes: int | Iterable[int]
) -> tuple[LabelledDataset, LabelledDataset]:
    """(U, R): the samples of the classes to forget, and all the others."""
    ids = check_class_ids(forget_classes, dataset.num_classes, what="forget class id")
    if not ids:
        raise ValueError("forget_classes must name at least one class")
    return filter_classes(dataset, keep=ids), filter_classes(dataset, drop=ids)
