"""`LabelledDataset`: the one in-memory dataset type every loader returns.

Keeping images and labels as plain numpy arrays makes class filtering, forget/retain splits and site
partitioning simple index operations, and gives every caller the same `.targets` / `.classes` surface
whether the data came from scikit-learn, a folder of `.npz` files or torchvision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["LabelledDataset", "check_class_ids"]


class LabelledDataset(Dataset):
    """Images `x[N, ...]` with integer labels `y[N]`; `transform` maps one image tensor to the model input.

    Labels always keep their ORIGINAL class ids (no remapping after filtering), so a model keeps all of its
    class outputs and `classes` always lists the full label space.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        classes: Sequence[str],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        x = np.asarray(x)
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"labels must be a 1-D array, got shape {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]} labels")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            if not np.all(np.equal(np.mod(y, 1), 0)):
                raise ValueError("labels must be integers")
        y = y.astype(np.int64, copy=False)
        classes = [str(c) for c in classes]
        if not classes:
            raise ValueError("classes must name at least one class")
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(
                f"labels must lie in 0..{len(classes) - 1} (len(classes)={len(classes)}), "
                f"got min {int(y.min())}, max {int(y.max())}"
            )
        self.x = x
        self.targets = y
        self.classes = classes
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.x[index]))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def subset(self, indices: Iterable[int] | np.ndarray) -> LabelledDataset:
        """A new dataset holding `indices` (e.g. one site's partition), sharing classes and transform."""
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise ValueError(f"indices out of range for a dataset of {len(self)} samples")
        return LabelledDataset(self.x[idx], self.targets[idx], self.classes, self.transform)

    def class_counts(self) -> np.ndarray:
        """Samples per class id, length `num_classes` (int64)."""
        return np.bincount(self.targets, minlength=self.num_classes).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"LabelledDataset(n={len(self)}, sample_shape={tuple(self.x.shape[1:])}, "
            f"dtype={self.x.dtype}, classes={self.num_classes})"
        )


def check_class_ids(class_ids: int | Iterable[int], num_classes: int, what: str = "class id") -> list[int]:
    """Validate class ids against a label space; returns them as a sorted list of unique ints."""
    if isinstance(class_ids, (int, np.integer)):
        class_ids = [int(class_ids)]
    out: set[int] = set()
    for c in class_ids:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise ValueError(f"{what} must be an integer, got {c!r}")
        if not 0 <= int(c) < num_classes:
            raise ValueError(f"unknown {what} {int(c)}: valid ids are 0..{num_classes - 1}")
        out.add(int(c))
    return sorted(out)
