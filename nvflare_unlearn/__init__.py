"""Federated class unlearning by class-discriminative pruning (Wang et al., WWW 2022) for NVFlare.

The core (this package outside ``nvflare_unlearn.fl``) is pure torch/numpy and never imports nvflare.
"""

from .activations import ClassActivationReport, collect_class_activations, merge_reports, validate_report
from .checkpoint import load_checkpoint, save_checkpoint
from .models import MODEL_NAMES, build_model, example_input
from .plan import PruningPlan, build_pruning_plan, coupled_groups
from .prune import apply_pruning_plan, enforce_masks
from .tfidf import tfidf_scores
from .unlearn import score_channels, unlearn_centralized

__version__ = "0.1.0"

__all__ = [
    "ClassActivationReport",
    "MODEL_NAMES",
    "PruningPlan",
    "__version__",
    "apply_pruning_plan",
    "build_model",
    "build_pruning_plan",
    "collect_class_activations",
    "coupled_groups",
    "enforce_masks",
    "example_input",
    "load_checkpoint",
    "merge_reports",
    "save_checkpoint",
    "score_channels",
    "tfidf_scores",
    "unlearn_centralized",
    "validate_report",
]
