"""The paper's method, pure torch/numpy: statistics, scores, plans, pruning, the per-class step, checkpoints.

Owns: ``activations`` (per-class ReLU + pooled sums and counts), ``tfidf`` (channel scores), ``graph``
(torch-pruning's view of the model's structure), ``plan`` (the JSON plan type), ``selection`` (scores -> a plan
step), ``prune`` (apply a plan: removal or masks), ``unlearning`` (the one per-class step, and the centralized
loop), ``checkpoint`` (weights + plan on disk). May import ``models``, ``data``, ``options``, ``_validation``;
never ``protect``, ``evaluation``, ``fl``, ``cli`` or nvflare.
"""

from nvflare_unlearn.method.activations import (
    WIRE_SUMS_DTYPE,
    ClassActivationReport,
    collect_class_activations,
    merge_reports,
    validate_report,
)
from nvflare_unlearn.method.checkpoint import load_checkpoint, save_checkpoint
from nvflare_unlearn.method.graph import conv_channels, coupled_groups
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.method.prune import apply_pruning_plan, enforce_masks, masked_plan, plan_summary
from nvflare_unlearn.method.selection import build_pruning_plan
from nvflare_unlearn.method.tfidf import tfidf_scores
from nvflare_unlearn.method.unlearning import score_channels, unlearn_centralized, unlearning_step

__all__ = [
    "WIRE_SUMS_DTYPE",
    "ClassActivationReport",
    "PruningPlan",
    "apply_pruning_plan",
    "build_pruning_plan",
    "collect_class_activations",
    "conv_channels",
    "coupled_groups",
    "enforce_masks",
    "load_checkpoint",
    "masked_plan",
    "merge_reports",
    "plan_summary",
    "save_checkpoint",
    "score_channels",
    "tfidf_scores",
    "unlearn_centralized",
    "unlearning_step",
    "validate_report",
]
