"""Evaluation and the shared training loop (pure torch/numpy; nothing here imports nvflare)."""

from .accuracy import class_correct_total, class_distribution_kl, evaluate_accuracy, u_r_accuracy
from .device import model_device, pick_device
from .training import train_epochs

__all__ = [
    "class_correct_total",
    "u_r_accuracy",
    "class_distribution_kl",
    "evaluate_accuracy",
    "train_epochs",
    "pick_device",
    "model_device",
]
