"""Runtime: what a job runs at a site or on the server, apart from how we judge it (pure torch/numpy).

Owns the one training loop every method and every phase shares (``training``), the compute device (``device``),
tensor batches and the seeded per-round shuffle (``batches``), the per-class correct/total counts a federated
evaluation sums (``accuracy``), and the forgetting check the job ends with, site side and server arithmetic
(``verification``). ``fl/`` runs these; ``evaluation/`` (the benchmarks' tests) reuses them. May import
``options``, ``models``, ``data``, ``method``; never ``evaluation``, ``protect``, ``fl``, ``cli`` or nvflare.
"""

from nvflare_unlearn.runtime.accuracy import class_correct_total, evaluate_accuracy, u_r_accuracy
from nvflare_unlearn.runtime.batches import (
    EpochPermutation,
    TensorBatches,
    as_tensors,
    random_crop_flip,
    site_shuffle_seed,
)
from nvflare_unlearn.runtime.device import model_device, pick_device
from nvflare_unlearn.runtime.training import PRECISIONS, train_epochs

__all__ = [
    "PRECISIONS",
    "EpochPermutation",
    "TensorBatches",
    "as_tensors",
    "class_correct_total",
    "evaluate_accuracy",
    "model_device",
    "pick_device",
    "random_crop_flip",
    "site_shuffle_seed",
    "train_epochs",
    "u_r_accuracy",
]
