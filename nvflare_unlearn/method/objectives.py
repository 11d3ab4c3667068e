"""What a site minimises while it unlearns: the fine-tuning objective of each method, as one batch loss.

Every method trains on the site's retained classes; some also use the forget classes the site holds (where the
data to forget lives) and some distil from the original model (the teacher, sent with the task):

- ``recovery="ce"``: cross-entropy on retained data (the paper's fine-tune);
- ``recovery="kd"``: cross-entropy + distillation from the original model on retained data, the forgotten classes'
  logits masked out of both softmaxes, so the student keeps the original's behaviour on what stays
  (Hinton et al. 2015 with a class mask);
- ``method="neggrad"``: NegGrad+ (Kurmanji et al., NeurIPS 2023): the retained term minus ``forget_weight`` x the
  cross-entropy on forget-class data, the ascent capped at ``FORGET_LOSS_CAP`` (beyond chance, pushing further only
  damages the features);
- ``method="random_label"``: the retained term plus ``forget_weight`` x cross-entropy of forget-class images towards
  random retained labels (Graves et al., AAAI 2021 "amnesiac" relabelling);
- ``method="scrub"``: SCRUB (Kurmanji et al. 2023), single-loop form: the retained term (with distillation) minus
  ``forget_weight`` x KL(teacher || student) on forget-class data (at temperature 1, capped like NegGrad+). The
  original alternates max and min epochs; one combined step is what a federated round of local SGD can carry.

``UnlearningObjective.batch_loss(model, x, y)`` is what ``evaluation.training.train_epochs`` calls for every
retained batch; the forget batch, when the method needs one, is drawn from a cycling iterator over the site's
forget data. Pure torch: the NVFlare executor, the Client API helpers and the benchmark all use this one object.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nvflare_unlearn.options import MethodOptions

__all__ = ["FORGET_LOSS_CAP", "UnlearningObjective"]

#: cap (in multiples of ln K, chance-level cross-entropy) beyond which a forget term stops pushing
FORGET_LOSS_CAP = 2.0


def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the forget-class loader is empty: this method needs forget-class data at the site")


class UnlearningObjective:
    """The batch loss of one method at one site (see the module docstring for each method)."""

    def __init__(
        self,
        options: MethodOptions | dict | None,
        forget_classes: Sequence[int],
        num_classes: int,
        teacher: nn.Module | None = None,
        forget_loader: Iterable | None = None,
        seed: int = 0,
    ):
        self.options = MethodOptions.from_dict(options)
        self.forget = sorted(int(c) for c in forget_classes)
        self.num_classes = int(num_classes)
        self.retained = [c for c in range(self.num_classes) if c not in set(self.forget)]
        if not self.retained:
            raise ValueError("no retained class left to train on")
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method={self.options.method!r}, recovery={self.options.recovery!r} needs the teacher")
        if self.needs_forget_data and forget_loader is None:
            raise ValueError(f"method={self.options.method!r} needs the site's forget-class data")
        self.teacher = teacher.eval() if teacher is not None else None
        self._forget_batches = _cycle(forget_loader) if self.needs_forget_data else None
        self._gen = torch.Generator().manual_seed(int(seed))
        self._cap = FORGET_LOSS_CAP * math.log(self.num_classes)

    @property
    def needs_teacher(self) -> bool:
        return self.options.needs_teacher

    @property
    def needs_forget_data(self) -> bool:
        return self.options.needs_forget_data

    # -- terms -----------------------------------------------------------------------------------------------
    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x).float()

    def _retained_term(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, y)
        if self.options.recovery == "kd" or self.options.method == "scrub":
            t = self.options.kd_temperature
            keep = torch.as_tensor(self.retained, device=logits.device)
            student = F.log_softmax(logits.float().index_select(1, keep) / t, dim=1)
            teacher = F.softmax(self._teacher_logits(x).index_select(1, keep) / t, dim=1)
            kd = F.kl_div(student, teacher, reduction="batchmean") * (t * t)
            loss = loss + self.options.kd_weight * kd
        return loss

    def _forget_term(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        xf, yf = next(self._forget_batches)
        xf = torch.as_tensor(xf).to(device)
        yf = torch.as_tensor(yf, dtype=torch.int64).to(device)
        logits = model(xf).float()
        method = self.options.method
        if method == "neggrad":
            ce = F.cross_entropy(logits, yf, reduction="none")
            return -torch.clamp(ce, max=self._cap).mean()
        if method == "random_label":
            pick = torch.randint(0, len(self.retained), (yf.shape[0],), generator=self._gen)
            target = torch.as_tensor(self.retained)[pick].to(device)
            return F.cross_entropy(logits, target)
        # scrub: move away from the teacher on the forget classes, in nats at temperature 1 (capped)
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.softmax(self._teacher_logits(xf), dim=1), reduction="none")
        return -torch.clamp(kl.sum(1), max=self._cap).mean()

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None):
        """The loss of one retained batch (plus the method's forget term), ready for ``backward()``."""
        logits = model(x) if logits is None else logits
        loss = self._retained_term(logits.float(), y, x)
        if self.needs_forget_data:
            loss = loss + self.options.forget_weight * self._forget_term(model, x.device)
        return loss

    def describe(self) -> dict[str, Any]:
        return {**self.options.to_dict(), "forget_classes": self.forget}
