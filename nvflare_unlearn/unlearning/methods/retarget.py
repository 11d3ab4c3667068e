"""Retrain-like targets (issue 22, H1): forget-class images distilled toward where a retrained model sends them.

A model retrained without a class sends its images to the classes that resemble it (CIFAR-10 trucks mostly to
automobile, then airplane and ship; CoUn, arXiv 2509.16391, Table 5), while NegGrad+ pushes the loss up and
misroutes them. The original model already ranks those look-alikes: its distribution over the RETAINED classes
(forget logits masked out, renormalised) is the target here, at the distillation temperature, beside the usual
masked distillation on retained data. Nothing is pushed up, so nothing is capped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nvflare_unlearn.unlearning.base import UnlearningMethod


class Retarget(UnlearningMethod):
    """Retained term with distillation plus ``forget_weight`` x the soft cross-entropy of forget-class images
    toward the original's retained-class distribution (``kd_temperature``; zero mass on the forget classes)."""

    name = "retarget"
    summary = "forget-class images distilled toward the original's choice among the retained classes"
    needs = frozenset({"forget_data", "teacher"})

    def forget_term(self, obj, model, xf, yf):
        t = obj.options.kd_temperature
        teacher = obj.teacher_logits(xf)
        masked = teacher.index_fill(1, torch.as_tensor(obj.forget, device=teacher.device), float("-inf"))
        target = F.softmax(masked / t, dim=1)
        student = F.log_softmax(model(xf).float() / t, dim=1)
        return -(target * student.clamp_min(-1e4)).sum(1).mean() * (t * t)
