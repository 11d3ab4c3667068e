"""What a site minimises while it unlearns: the registered method's terms as one batch loss, and its report.

Every method trains on the site's retained classes; some also use the forget classes the site holds and some
distil from the original model (the teacher, sent with the task). The terms themselves live with each method
(``unlearning/methods/``); this object draws the forget batches, holds the teacher and counts what it computed.

``UnlearningObjective.batch_loss(model, x, y)`` is what ``runtime.training.train_epochs`` calls for every retained
batch, and ``before_step(model)`` what it calls between ``backward()`` and the optimizer step. The NVFlare executor,
the Client API helpers and the in-process federation build it through one function (``unlearning.site``).

A site's training code is its own (a Client API script may ignore the objective), so each site reports the loss it
minimised (``UnlearningObjective.report``, read by ``reported_loss``) and ``objective_check`` compares the reports
with the request: a site that ran plain fine-tuning under a NegGrad+ request shows up in the record instead of
passing as NegGrad+. The unit is the site's own statement: it catches code that does not apply the method, not a
site that lies about it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nvflare_unlearn.unlearning.base import FORGET_LOSS_CAP
from nvflare_unlearn.unlearning.options import MethodOptions
from nvflare_unlearn.unlearning.registry import all_methods

__all__ = [
    "FORGET_LOSS_CAP",
    "OBJECTIVE_HINT",
    "site_losses",
    "UnlearningObjective",
    "objective_check",
    "reported_loss",
]


def site_losses() -> frozenset[str]:
    """Every loss a site can report (each registered method's ``site_losses``); anything else is malformed."""
    return frozenset(loss for m in all_methods().values() for loss in m.site_losses())


def _forget_losses() -> frozenset[str]:
    """The losses that include a forget-class term: a report of one without a forget-class step is flagged."""
    return frozenset(loss for m in all_methods().values() if m.uses_forget_data for loss in m.site_losses())


def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the forget-class loader is empty: this method needs forget-class data at the site")


class UnlearningObjective:
    """The batch loss of one registered method at one site."""

    def __init__(
        self,
        options: MethodOptions | dict | None,
        forget_classes: Sequence[int],
        num_classes: int,
        teacher: nn.Module | None = None,
        forget_loader: Iterable | None = None,
        seed: int = 0,
    ):
        self.options = MethodOptions.from_dict(options).resolved()
        self.method = self.options.spec
        self.forget = sorted(int(c) for c in forget_classes)
        self.num_classes = int(num_classes)
        self.retained = [c for c in range(self.num_classes) if c not in set(self.forget)]
        if not self.retained:
            raise ValueError("no retained class left to train on")
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method={self.options.method!r}, recovery={self.options.recovery!r} needs the teacher")
        if self.needs_forget_data and forget_loader is None:
            raise ValueError(f"method={self.options.method!r} needs the site's forget-class data")
        self.teacher = teacher.eval() if teacher is not None and self.needs_teacher else None
        self._forget_batches = _cycle(forget_loader) if self.needs_forget_data else None
        self.generator = torch.Generator().manual_seed(int(seed))
        self.steps = 0  # retained batches this objective computed a loss for (what ``report`` vouches for)
        self.forget_steps = 0  # forget-class batches among them

    @property
    def needs_teacher(self) -> bool:
        return self.method.uses_teacher(self.options.recovery)

    @property
    def needs_forget_data(self) -> bool:
        return self.method.uses_forget_data

    # -- what the methods' terms share ----------------------------------------------------------------------
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x).float()

    def distillation(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) over the retained classes only (forget logits masked out of both softmaxes), at
        ``kd_temperature``: the student keeps the original's behaviour on what stays (Hinton et al. 2015)."""
        t = self.options.kd_temperature
        keep = torch.as_tensor(self.retained, device=logits.device)
        student = F.log_softmax(logits.float().index_select(1, keep) / t, dim=1)
        teacher = F.softmax(self.teacher_logits(x).index_select(1, keep) / t, dim=1)
        return F.kl_div(student, teacher, reduction="batchmean") * (t * t)

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None):
        """The loss of one retained batch (plus the method's forget term), ready for ``backward()``."""
        logits = model(x) if logits is None else logits
        self.steps += 1
        loss = self.method.retained_term(self, logits.float(), y, x)
        if self.needs_forget_data:
            xf, yf = next(self._forget_batches)
            self.forget_steps += 1
            xf = torch.as_tensor(xf).to(x.device)
            yf = torch.as_tensor(yf, dtype=torch.int64).to(x.device)
            loss = loss + self.options.forget_weight * self.method.forget_term(self, model, xf, yf)
        return loss

    def before_step(self, model: nn.Module) -> None:
        """The method's hook between ``backward()`` and the optimizer step."""
        self.method.before_step(self, model)

    def describe(self) -> dict[str, Any]:
        return {**self.options.to_dict(), "forget_classes": self.forget}

    def report(self) -> dict[str, Any]:
        """What this site tells the server it minimised this round (``fl.defs.META_OBJECTIVE_APPLIED``)."""
        return {"loss": self.options.site_loss, "steps": self.steps, "forget_steps": self.forget_steps}


#: why a site's reported loss may differ from the request, and what to do (the server log and the CLI print it)
OBJECTIVE_HINT = (
    "a site without forget-class images trains on the retained term alone; a Client API script must minimise "
    "ua.training_objective(...) and pass it to ua.weights_result(model, n, objective)"
)


def reported_loss(report: Any) -> str:
    """One site's report (``UnlearningObjective.report``, or None) as a loss name, or why it cannot be read. It comes
    from the site, so every field is checked, and only this short name is kept."""
    if report is None:
        return "not reported"
    if not isinstance(report, dict) or not isinstance(report.get("loss"), str) or report["loss"] not in site_losses():
        return "malformed report"
    counts = [report.get("steps"), report.get("forget_steps")]
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts) or counts[1] > counts[0]:
        return "malformed report"
    loss = str(report["loss"])
    if counts[0] == 0:
        return f"{loss} (no step)"
    if loss in _forget_losses() and counts[1] == 0:
        return f"{loss} (no forget-class step)"
    return loss


def objective_check(requested: MethodOptions | dict, rounds: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """Compare what the sites report they minimised with what the job asked, over all fine-tuning rounds.

    ``rounds``: per round, ``{site: reported_loss(its report)}`` for the sites whose update was averaged. Returns the
    requested loss, each site's reported losses (distinct, in round order) and the sites that ever reported
    anything else (for a plain cross-entropy request, a site that does not report is not flagged: any training loop
    runs it). A site without forget-class images legitimately trains on the retained term alone: it is listed
    with what it ran (e.g. ``kd``), since the method did not run there.
    """
    want = MethodOptions.from_dict(requested).site_loss
    sites: dict[str, list[str]] = {}
    for per_site in rounds:
        for site, got in sorted(per_site.items()):
            if got not in sites.setdefault(str(site), []):
                sites[str(site)].append(str(got))
    # plain cross-entropy is what any training loop runs: a script that does not report is not flagged for it
    ok = {want, "not reported"} if want == "ce" else {want}
    differ = sorted(site for site, got in sites.items() if not set(got) <= ok)
    return {"requested": want, "sites": sites, "not_as_requested": differ}
