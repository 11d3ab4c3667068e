"""Where datasets come from: scikit-learn digits (offline, built in), a folder of `.npz` arrays
(the `../shared/data` layout) or torchvision's CIFAR (with download for online users).

All of them return a `LabelledDataset`, so nothing downstream cares about the source.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np

from nvflare_unlearn.data.dataset import LabelledDataset
from nvflare_unlearn.data.transforms import CifarTransform, Normalize, dataset_stats
from nvflare_unlearn.options import DATASET_NAMES

__all__ = [
    "DATA_ENV_VAR",
    "DATASET_NAMES",
    "default_data_root",
    "digits_dataset",
    "npz_dataset",
    "torchvision_cifar",
    "load_dataset",
    "stratified_subset_indices",
]

DATA_ENV_VAR = "NVFLARE_UNLEARN_DATA"
_SPLITS = ("train", "test")
_NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {list(_SPLITS)}")


def default_data_root() -> Path | None:
    """`$NVFLARE_UNLEARN_DATA` if set, else `../shared/data` next to a source checkout when it exists."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env)
    checkout_guess = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return checkout_guess if checkout_guess.is_dir() else None


def digits_dataset(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> LabelledDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as 1x8x8 float32 in [0, 1].

    The train/test split is stratified and deterministic for a given `seed`, so every site and the
    server agree on which images are test images without exchanging anything.
    """
    _check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    idx = np.sort(idx_train if split == "train" else idx_test)
    return LabelledDataset(np.ascontiguousarray(x[idx]), y[idx], [str(i) for i in range(10)])


def _npz_files(root: Path, split: str) -> list[str]:
    return sorted(glob.glob(str(root / f"{split}_*.npz"))) or (
        [str(root / f"{split}.npz")] if (root / f"{split}.npz").is_file() else []
    )


def _cifar_transform(normalize: Any, name: str, augment: bool) -> CifarTransform:
    """uint8 -> float in [0, 1] -> the ``normalize`` statistics (``dataset_stats``), with crop + flip if ``augment``."""
    stats = dataset_stats(normalize, name, 3)
    mean, std = stats if stats is not None else ((0.0,), (1.0,))
    return CifarTransform(mean, std, augment=augment)


def npz_dataset(
    root: str | os.PathLike, split: str = "train", augment: bool = False, normalize: Any = "dataset"
) -> LabelledDataset:
    """A CIFAR folder of `.npz` archives (`x` uint8 [N,32,32,3], `y` int [N]; `train_*.npz` shards or
    `train.npz`, and `classes.txt`), as normalised float CHW images; `augment` adds crop + flip.

    Images are stored as uint8 CHW (a quarter of the float size) and normalised per item: by default with the
    published CIFAR-10 (or, for 100 classes, CIFAR-100) channel statistics; ``normalize`` as in ``load_dataset``.
    """
    _check_split(split)
    root = Path(root)
    files = _npz_files(root, split)
    if not files:
        raise FileNotFoundError(
            f"no {split}_*.npz or {split}.npz in {root}; point `root` (or ${DATA_ENV_VAR}) at a folder "
            f"holding the CIFAR .npz archives"
        )
    xs, ys = [], []
    for f in files:
        with np.load(f) as arrays:
            if "x" not in arrays.files or "y" not in arrays.files:
                raise ValueError(f"{f} must hold arrays 'x' and 'y', found {arrays.files}")
            xs.append(arrays["x"])
            ys.append(arrays["y"])
    x = np.concatenate(xs)
    y = np.concatenate(ys).astype(np.int64)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"{root}: expected x as uint8 [N, H, W, 3], got {x.dtype} {list(x.shape)}")
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        classes = classes_file.read_text().split()
    else:
        classes = [str(i) for i in range(int(y.max()) + 1 if y.size else 0)]
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    name = "cifar100" if len(classes) == 100 else "cifar10"
    return LabelledDataset(x, y, classes, _cifar_transform(normalize, name, augment))


def torchvision_cifar(
    root: str | os.PathLike,
    name: str = "cifar10",
    split: str = "train",
    download: bool = False,
    augment: bool = False,
    normalize: Any = "dataset",
) -> LabelledDataset:
    """CIFAR-10/100 in torchvision's layout (`cifar-10-batches-py/` ...), downloading when asked; ``normalize`` as
    in ``load_dataset``."""
    _check_split(split)
    from torchvision import datasets

    classes_by_name = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
    if name not in classes_by_name:
        raise ValueError(f"torchvision_cifar supports {sorted(classes_by_name)}, got {name!r}")
    try:
        tv = classes_by_name[name](root=str(root), train=(split == "train"), download=download)
    except RuntimeError as exc:  # torchvision raises RuntimeError("Dataset not found or corrupted ...")
        raise FileNotFoundError(
            f"{name} not found in torchvision layout under {root} ({exc}); pass download=True (needs internet) "
            f"or set ${DATA_ENV_VAR} to a folder of .npz archives"
        ) from None
    x = np.ascontiguousarray(np.asarray(tv.data).transpose(0, 3, 1, 2))
    return LabelledDataset(
        x, np.asarray(tv.targets, dtype=np.int64), list(tv.classes), _cifar_transform(normalize, name, augment)
    )


def stratified_subset_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` indices drawn class by class in round robin (random within a class), sorted ascending.

    Class-balanced (up to one sample) whatever the source order: the shared CIFAR files are sorted by
    label, so taking the first n images would give one class only.
    """
    labels = np.asarray(labels)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"subset must be a positive integer, got {n!r}")
    if n > labels.size:
        raise ValueError(f"subset={n} is larger than the dataset ({labels.size} samples)")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(labels.size)
    plabels = labels[perm]
    rank = np.empty(labels.size, dtype=np.int64)  # position of each sample within its class, in perm order
    for c in np.unique(plabels):
        where = np.flatnonzero(plabels == c)
        rank[where] = np.arange(where.size)
    order = np.lexsort((np.arange(labels.size), rank))  # round robin: all rank-0 samples, then rank-1, ...
    return np.sort(perm[order[:n]])


def _resolve_cifar(name: str, root: Path, split: str, download: bool, augment: bool, normalize: Any) -> LabelledDataset:
    for folder in (root / name, root):
        if _npz_files(folder, split):
            return npz_dataset(folder, split, augment=augment, normalize=normalize)
    return torchvision_cifar(root, name, split, download=download, augment=augment, normalize=normalize)


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
    subset: int | None = None,
    seed: int = 0,
    augment: bool = False,
    normalize: Any = "dataset",
) -> LabelledDataset:
    """Load `digits`, `cifar10` or `cifar100` by name; `subset` keeps a class-balanced random sample.

    For CIFAR, `root` (default `$NVFLARE_UNLEARN_DATA`, then `../shared/data` of a checkout) may be the
    folder holding `cifar10/`, the dataset folder itself (`.npz` archives) or a torchvision root.

    `normalize` states the input normalisation (``SiteDataOptions.normalize``): ``"dataset"`` (default: CIFAR's
    published channel mean/std, digits left in [0, 1]), ``"none"`` (pixels in [0, 1], like torchvision's
    ToTensor alone) or ``{"mean": [...], "std": [...]}`` (as ToTensor then Normalize(mean, std)); match the
    transform of the script the model was trained with.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}: use one of {list(DATASET_NAMES)}")
    _check_split(split)
    if name == "digits":
        ds = digits_dataset(split)
        stats = dataset_stats(normalize, name, 1)
        if stats is not None:
            ds.transform = Normalize(*stats)
    else:
        if root is None:
            root = default_data_root()
        if root is None:
            if not download:
                raise FileNotFoundError(
                    f"no data root for {name}: pass root=..., set ${DATA_ENV_VAR} to the folder holding "
                    f"{name}/ (.npz archives), or pass download=True"
                )
            root = Path.home() / ".cache" / "nvflare_unlearn"
        root = Path(root)
        if not root.exists() and not download:
            raise FileNotFoundError(
                f"data root {root} does not exist; set ${DATA_ENV_VAR} or pass root= pointing at the folder "
                f"holding {name}/ (.npz archives), or pass download=True"
            )
        ds = _resolve_cifar(name, root, split, download, augment, normalize)
    if subset is not None:
        ds = ds.subset(stratified_subset_indices(ds.targets, subset, seed))
    return ds
