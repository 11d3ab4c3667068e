"""Federated class unlearning by class-discriminative pruning (Wang et al., WWW 2022) for NVFlare.

Everything outside ``nvflare_unlearn.fl`` and ``nvflare_unlearn.cli`` is pure torch/numpy and never imports nvflare;
docs/design.md maps the folders and the import rules a test enforces.
"""

from nvflare_unlearn.method import (
    ClassActivationReport,
    PruningPlan,
    apply_pruning_plan,
    build_pruning_plan,
    collect_class_activations,
    coupled_groups,
    enforce_masks,
    load_checkpoint,
    merge_reports,
    save_checkpoint,
    score_channels,
    tfidf_scores,
    unlearn_centralized,
    validate_report,
)
from nvflare_unlearn.models import MODEL_NAMES, build_model, example_input

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
