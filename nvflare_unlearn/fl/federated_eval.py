"""Federated evaluation at the server: every site's per-class correct/total, capped and screened for outliers
(``protect.robust.robust_evaluation``), pooled into U/R and class-wise accuracy, with each site's own result kept;
and, for simulator and benchmark runs, the same model on a server-side test set.

A mixin of ``FedAvgEvalController`` (which sends the tasks and holds the options), with the two helpers every
server component shares for what comes back from the sites: who sent a result, and results as plain JSON.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants

from nvflare_unlearn.fl.defs import METRIC_CORRECT, METRIC_TOTAL, TASK_VALIDATE


def site_name(result: FLModel) -> str:
    """The site that sent ``result`` (NVFlare puts its name in the meta)."""
    return str((result.meta or {}).get("client_name", AppConstants.CLIENT_UNKNOWN))


def jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays -> plain Python, so metrics always serialise."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class FederatedEvaluation:
    """``evaluate``: the federated evaluation of a global model, for a ``FedAvgEvalController``."""

    def evaluate(self, model: FLModel, stage: str, step: int) -> dict:
        """Federated evaluation: every site's per-class correct/total, capped and screened for outliers
        (``protect.robust.robust_evaluation``), pooled into U/R and class-wise accuracy; per-site results kept."""
        from nvflare_unlearn.protect.robust import robust_evaluation, size_caps

        results = self.send_to_sites(TASK_VALIDATE, model)
        site_correct: dict[str, np.ndarray] = {}
        site_total: dict[str, np.ndarray] = {}
        malformed: dict[str, str] = {}
        for r in results:
            metrics = r.metrics or {}
            try:
                c = np.asarray(metrics.get(METRIC_CORRECT, []), dtype=np.float64)
                t = np.asarray(metrics.get(METRIC_TOTAL, []), dtype=np.float64)
            except (TypeError, ValueError):
                c = t = np.zeros(0)
            ok = c.shape == (self.num_classes,) and t.shape == (self.num_classes,)
            ok = ok and bool(np.all(np.isfinite(t)) and np.all(c >= 0) and np.all(c <= t) and np.all(c == np.rint(c)))
            ok = ok and bool(np.all(t == np.rint(t)))
            if not ok or site_name(r) in site_total:
                malformed[site_name(r)] = "malformed or repeated evaluation counts"
                self.warning(f"{stage}: ignoring malformed evaluation counts from {site_name(r)}")
                continue
            site_correct[site_name(r)], site_total[site_name(r)] = c, t
        if len(site_total) < self.quorum("validate"):
            raise RuntimeError(
                f"{stage}: only {len(site_total)} valid evaluation result(s), the validate phase needs "
                f"min_clients={self.quorum('validate')}"
            )
        sec = self._security
        caps = size_caps({s: float(t.sum()) for s, t in site_total.items()}, sec.site_test_sizes, sec.size_cap_factor)
        agg = robust_evaluation(
            site_correct, site_total, self.forget_classes, caps, sec.eval_outlier_tol, sec.size_cap_factor
        )
        for site, why in agg["flagged"].items():
            self.warning(f"{stage}: left {site} out of the federated evaluation: {why}")
        correct, total = agg["correct"], agg["total"]
        entry = {k: agg[k] for k in ("u_acc", "r_acc", "acc", "class_acc")}
        entry.update(
            correct=[int(v) if float(v).is_integer() else round(float(v), 3) for v in correct],
            total=[int(v) if float(v).is_integer() else round(float(v), 3) for v in total],
            sites=agg["sites"],
            per_site=agg["per_site"],
            flagged=agg["flagged"],
            median=agg["median"],
        )
        if malformed:
            entry["malformed"] = malformed
        loader = self._server_test_loader()
        if loader is not None:
            from nvflare_unlearn.runtime import class_correct_total, u_r_accuracy

            c, t = class_correct_total(self.to_torch(model), loader, self.num_classes)
            entry["server"] = dict(u_r_accuracy(c, t, self.forget_classes))
            entry["server"].update(acc=float(c.sum() / max(t.sum(), 1)), correct=c.tolist(), total=t.tolist())
        self.info(
            f"[{stage}] federated accuracy: U={_fmt(entry.get('u_acc'))} R={_fmt(entry.get('r_acc'))} "
            f"all={_fmt(entry['acc'])} ({int(total.sum())} samples, {len(agg['sites'])} site(s))"
        )
        self.set_progress(evaluated=stage, u_acc=entry.get("u_acc"), r_acc=entry.get("r_acc"), acc=entry["acc"])
        group = "original" if stage == "original" else "accuracy"  # step 0 of "accuracy" = the pruned model
        for key in ("u_acc", "r_acc", "acc"):
            self.track(f"{group}/{key}", entry.get(key), step)
        return jsonable(entry)

    def _server_test_loader(self):
        if self.test_dataset is None:
            return None
        if self._test_loader is None:
            from torch.utils.data import DataLoader

            from nvflare_unlearn.data import load_dataset

            data = load_dataset(self.test_dataset, root=self.test_data_root, split="test")
            self._test_loader = DataLoader(data, batch_size=256, shuffle=False)
        return self._test_loader
