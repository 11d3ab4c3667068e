"""Evaluation: how well a model forgot, measured without trusting its outputs alone (pure torch/numpy/sklearn).

Owns the per-class accuracy counts, the forgetting tests (linear probe, relearn time, membership attacks), the one
training loop every method shares, the in-process federation the benchmarks use (``fedsim``) and the methods they
compare (``baselines``). May import ``method``, ``models``, ``data``; never ``nvflare``, ``fl`` or ``cli``.
Each test is a pure function of (model, data): run it on the retrained model (the reference) and on the original
(the ceiling) as well as on the unlearned model, and read them side by side.
"""

from nvflare_unlearn.evaluation.accuracy import (
    accuracy_report,
    class_correct_total,
    class_distribution_kl,
    compare_class_accuracy,
    evaluate_accuracy,
    u_r_accuracy,
)
from nvflare_unlearn.evaluation.data import TensorBatches, as_tensors, random_crop_flip
from nvflare_unlearn.evaluation.device import model_device, pick_device
from nvflare_unlearn.evaluation.membership import ATTACKS, membership_inference, model_outputs
from nvflare_unlearn.evaluation.probe import final_linear_name, linear_probe, penultimate_features
from nvflare_unlearn.evaluation.relearn import relearn_steps
from nvflare_unlearn.evaluation.training import PRECISIONS, train_epochs

__all__ = [
    "ATTACKS",
    "PRECISIONS",
    "TensorBatches",
    "accuracy_report",
    "as_tensors",
    "class_correct_total",
    "class_distribution_kl",
    "compare_class_accuracy",
    "evaluate_accuracy",
    "final_linear_name",
    "linear_probe",
    "membership_inference",
    "model_device",
    "model_outputs",
    "penultimate_features",
    "pick_device",
    "random_crop_flip",
    "relearn_steps",
    "train_epochs",
    "u_r_accuracy",
]
