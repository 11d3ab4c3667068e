"""Fine-tune on the retained classes only: the baseline every method is measured against."""

from __future__ import annotations

from nvflare_unlearn.unlearning.base import UnlearningMethod


class Finetune(UnlearningMethod):
    """Train on what stays; the forget classes fade only because they are no longer seen."""

    name = "finetune"
    summary = "fine-tune on the retained classes only (ce, or kd: distil from the original on them)"
