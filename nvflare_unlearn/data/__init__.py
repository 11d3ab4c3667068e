"""Data: datasets (digits built in, CIFAR as .npz or torchvision), class splits and FL partitioners, all
deterministic for a seed. Pure torch/numpy; may import ``options`` and ``_validation`` only."""

from nvflare_unlearn.data.classes import filter_classes, split_forget_retain
from nvflare_unlearn.data.dataset import LabelledDataset, check_class_ids
from nvflare_unlearn.data.partition import partition_biased, partition_dirichlet, partition_iid, site_class_counts
from nvflare_unlearn.data.sources import (
    DATA_ENV_VAR,
    DATASET_NAMES,
    default_data_root,
    digits_dataset,
    load_dataset,
    npz_dataset,
    stratified_subset_indices,
    torchvision_cifar,
)
from nvflare_unlearn.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CifarTransform,
    Normalize,
    dataset_stats,
)

__all__ = [
    "LabelledDataset",
    "check_class_ids",
    "digits_dataset",
    "npz_dataset",
    "torchvision_cifar",
    "load_dataset",
    "default_data_root",
    "stratified_subset_indices",
    "DATA_ENV_VAR",
    "DATASET_NAMES",
    "filter_classes",
    "split_forget_retain",
    "partition_iid",
    "partition_dirichlet",
    "partition_biased",
    "site_class_counts",
    "CifarTransform",
    "Normalize",
    "dataset_stats",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
]
