"""Evaluation: how well a model forgot, measured without trusting its outputs alone (pure torch/numpy/sklearn).

Owns the per-class accuracy counts, the forgetting tests (linear probe, relearn time, membership attacks), their
statistics (``stats``: bootstrap intervals, t-intervals over seeds, paired differences, noise floors), the per-example
arrays they read (``artifacts``), the one training loop every method shares, the in-process federation the benchmarks
use (``fedsim``) and the methods they compare (``baselines``). May import ``method``, ``models``, ``data``; never
``nvflare``, ``fl`` or ``cli``. Each test is a pure function of (model, data) or of saved arrays: run it on the
retrained models (the references, whose spread is the noise floor) and on the original (the ceiling) as well as on
the unlearned model, and read them side by side.
"""

from nvflare_unlearn.evaluation.accuracy import accuracy_report, class_distribution_kl, compare_class_accuracy
from nvflare_unlearn.evaluation.artifacts import load_arrays, per_example_arrays, save_arrays
from nvflare_unlearn.evaluation.membership import (
    ATTACKS,
    feature_membership_attack,
    lira_offline,
    logit_confidence,
    loss_attack_power,
    membership_auc,
    membership_inference,
    model_outputs,
)
from nvflare_unlearn.evaluation.probe import (
    final_linear_name,
    forward_outputs,
    linear_probe,
    linear_probe_features,
    penultimate_features,
)
from nvflare_unlearn.evaluation.relearn import relearn_steps
from nvflare_unlearn.evaluation.stats import (
    auc,
    auc_ci,
    bootstrap_ci,
    noise_floor,
    paired_difference,
    t_interval,
    tpr_at_fpr,
)
from nvflare_unlearn.runtime.accuracy import class_correct_total, evaluate_accuracy, u_r_accuracy
from nvflare_unlearn.runtime.batches import EpochPermutation, TensorBatches, as_tensors, random_crop_flip
from nvflare_unlearn.runtime.device import model_device, pick_device
from nvflare_unlearn.runtime.training import PRECISIONS, train_epochs

__all__ = [
    "ATTACKS",
    "PRECISIONS",
    "EpochPermutation",
    "TensorBatches",
    "accuracy_report",
    "as_tensors",
    "auc",
    "auc_ci",
    "bootstrap_ci",
    "class_correct_total",
    "class_distribution_kl",
    "compare_class_accuracy",
    "evaluate_accuracy",
    "feature_membership_attack",
    "final_linear_name",
    "forward_outputs",
    "linear_probe",
    "linear_probe_features",
    "lira_offline",
    "load_arrays",
    "logit_confidence",
    "loss_attack_power",
    "membership_auc",
    "membership_inference",
    "model_device",
    "model_outputs",
    "noise_floor",
    "paired_difference",
    "penultimate_features",
    "per_example_arrays",
    "pick_device",
    "random_crop_flip",
    "relearn_steps",
    "save_arrays",
    "t_interval",
    "tpr_at_fpr",
    "train_epochs",
    "u_r_accuracy",
]
