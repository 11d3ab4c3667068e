"""Forgetting tests that tell feature-level forgetting from output-level hiding (pure torch/numpy/sklearn).

Each test is a pure function of (model, data); run each on the retrained model (the reference) and on the
original (the ceiling) as well as on the unlearned model, and read them side by side.
"""

from .accuracy import accuracy_report, compare_class_accuracy
from .data import TensorBatches, as_tensors, random_crop_flip
from .membership import ATTACKS, membership_inference, model_outputs
from .probe import final_linear_name, linear_probe, penultimate_features
from .relearn import relearn_steps

__all__ = [
    "accuracy_report",
    "compare_class_accuracy",
    "linear_probe",
    "penultimate_features",
    "final_linear_name",
    "relearn_steps",
    "membership_inference",
    "model_outputs",
    "ATTACKS",
    "as_tensors",
    "TensorBatches",
    "random_crop_flip",
]
