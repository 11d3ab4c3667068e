"""The paper's method (Wang et al., WWW 2022): TF-IDF channel pruning, then fine-tuning on the retained classes."""

from __future__ import annotations

from nvflare_unlearn.unlearning.base import UnlearningMethod


class Prune(UnlearningMethod):
    """The server removes the channels most discriminative of the forget class (activation statistics + TF-IDF,
    ``method/``), then the sites fine-tune the smaller model on what stays."""

    name = "prune"
    summary = "the paper's: TF-IDF channel pruning from the sites' activation statistics, then fine-tune"
    needs = frozenset({"plan"})
