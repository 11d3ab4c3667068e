"""NegGrad+ (Kurmanji et al., NeurIPS 2023): gradient ascent on the forget classes beside descent on the rest."""

from __future__ import annotations

import torch.nn.functional as F

from nvflare_unlearn.unlearning.base import UnlearningMethod


class NegGrad(UnlearningMethod):
    """Retained term minus ``forget_weight`` x the forget batch's cross-entropy, the ascent capped at
    ``FORGET_LOSS_CAP`` x chance (beyond chance, pushing further only damages the features)."""

    name = "neggrad"
    summary = "NegGrad+: ascent on the sites' forget-class images (capped), descent on the rest"
    needs = frozenset({"forget_data"})

    def forget_term(self, obj, model, xf, yf):
        ce = F.cross_entropy(model(xf).float(), yf, reduction="none")
        return self.capped_ascent(ce, obj.num_classes)
