"""Datasets, class splits and FL partitioners (pure torch/numpy; nothing here imports nvflare)."""

from .classes import filter_classes, split_forget_retain
from .dataset import LabelledDataset, check_class_ids
from .partition import partition_biased, partition_dirichlet, partition_iid, site_class_counts
from .sources import (
    DATA_ENV_VAR,
    DATASET_NAMES,
    default_data_root,
    digits_dataset,
    load_dataset,
    npz_dataset,
    stratified_subset_indices,
    torchvision_cifar,
)
from .transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, CifarTransform

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
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
]
