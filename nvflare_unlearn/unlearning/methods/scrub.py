"""SCRUB (Kurmanji et al., NeurIPS 2023), single-loop form: stay with the teacher on what stays, move away from it
on the forget classes."""

from __future__ import annotations

import torch.nn.functional as F

from nvflare_unlearn.unlearning.base import UnlearningMethod


class Scrub(UnlearningMethod):
    """Retained term with distillation minus ``forget_weight`` x KL(teacher ‖ student) on forget-class data (at
    temperature 1, capped like NegGrad+). The original alternates max and min epochs; one combined step is what a
    federated round of local SGD can carry."""

    name = "scrub"
    summary = "SCRUB: distil on retained data, move away from the original on forget-class data"
    needs = frozenset({"forget_data", "teacher"})

    def forget_term(self, obj, model, xf, yf):
        logits = model(xf).float()
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.softmax(obj.teacher_logits(xf), dim=1), reduction="none")
        return self.capped_ascent(kl.sum(1), obj.num_classes)
