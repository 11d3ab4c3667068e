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

``UnlearningObjective.batch_loss(model, x, y)`` is what ``runtime.training.train_epochs`` calls for every
retained batch; the forget batch, when the method needs one, is drawn from a cycling iterator over the site's
forget data. Pure torch: the NVFlare executor, the Client API helpers and the benchmark all use this one object.

A site's training code is its own (a Client API script may ignore the objective), so each site reports the loss it
minimised (``UnlearningObjective.report``, read by ``reported_loss``) and ``objective_check`` compares the reports
with the request: a site that ran plain fine-tuning under a NegGrad+ request shows up in the record instead of
passing as NegGrad+. The unit is the site's own statement: it catches code that does not apply the method, not a
site that lies about it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nvflare_unlearn.options import MethodOptions

__all__ = [
    "FORGET_LOSS_CAP",
    "OBJECTIVE_HINT",
    "SITE_LOSSES",
    "UnlearningObjective",
    "objective_check",
    "reported_loss",
]

#: cap (in multiples of ln K, chance-level cross-entropy) beyond which a forget term stops pushing
FORGET_LOSS_CAP = 2.0

#: every loss a site can report (``MethodOptions.site_loss``); anything else in a report is malformed
SITE_LOSSES = frozenset(
    MethodOptions(method=m, recovery=r).site_loss
    for m in ("prune", "neggrad", "random_label", "scrub")
    for r in ("ce", "kd")
)


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
        self.steps = 0  # retained batches this objective computed a loss for (what ``report`` vouches for)
        self.forget_steps = 0  # forget-class batches among them

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
        self.forget_steps += 1
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
        self.steps += 1
        loss = self._retained_term(logits.float(), y, x)
        if self.needs_forget_data:
            loss = loss + self.options.forget_weight * self._forget_term(model, x.device)
        return loss

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
    if not isinstance(report, dict) or not isinstance(report.get("loss"), str) or report["loss"] not in SITE_LOSSES:
        return "malformed report"
    counts = [report.get("steps"), report.get("forget_steps")]
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts) or counts[1] > counts[0]:
        return "malformed report"
    loss = str(report["loss"])
    if counts[0] == 0:
        return f"{loss} (no step)"
    if (loss == "scrub" or "+" in loss) and counts[1] == 0:
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
