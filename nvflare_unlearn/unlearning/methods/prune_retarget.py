"""TF-IDF pruning with retrain-like recovery (issue 22, H5): the paper's class-discriminative channels removed, then
the forget class's images distilled toward where the original ranks them among the retained classes."""

from __future__ import annotations

from nvflare_unlearn.unlearning.methods.retarget import Retarget


class PruneRetarget(Retarget):
    """The server prunes the forget class's most discriminative channels (``prune``); the sites then minimise
    ``retarget``'s loss: distillation on retained data plus ``forget_weight`` x the soft cross-entropy of
    forget-class images toward the original's retained-class distribution."""

    name = "prune_retarget"
    summary = "the paper's TF-IDF pruning, then retarget's recovery (forget-class images sent where retraining would)"
    needs = frozenset({"plan", "forget_data", "teacher"})
