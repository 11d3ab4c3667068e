"""Random relabelling (Graves et al., AAAI 2021, "amnesiac"): forget-class images trained toward random retained
labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nvflare_unlearn.unlearning.base import UnlearningMethod


class RandomLabel(UnlearningMethod):
    """Retained term plus ``forget_weight`` x cross-entropy of forget-class images toward uniformly drawn retained
    labels (the site's seeded generator: reproducible per site)."""

    name = "random_label"
    summary = "forget-class images trained toward random retained labels"
    needs = frozenset({"forget_data"})

    def forget_term(self, obj, model, xf, yf):
        pick = torch.randint(0, len(obj.retained), (yf.shape[0],), generator=obj.generator)
        target = torch.as_tensor(obj.retained)[pick].to(xf.device)
        return F.cross_entropy(model(xf).float(), target)
