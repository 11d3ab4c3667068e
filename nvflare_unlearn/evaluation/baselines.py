"""Unlearning methods compared in the benchmarks, each split into a PREPARE step and a common FedAvg fine-tune.

- ``retrain``: train from scratch without the forget classes (the gold standard);
- ``finetune``: fine-tune on retained data only, no pruning (the ablation that tells what pruning adds);
- ``row_reset``: re-initialise the forget classes' classifier rows, then fine-tune (the output-level foil:
  it hides the class at the output while leaving every feature intact);
- ``fisher``: Fisher forgetting (Golatkar et al., CVPR 2020, Eq. 1 noise ``w + sqrt(alpha F^-1) N(0, 1)``) with
  the diagonal Fisher of the participating sites' retained data summed across sites, then fine-tune; ``alpha``
  fixed, or tuned by ``tune_fisher_alpha`` on the sites' RETAINED data only (the forget class never chooses it);
- ``prune``: the paper's method with FEDERATED statistics (per-site activation reports merged on the server,
  TF-IDF, a pruning plan per forget class, physical removal), then fine-tune;
- ``prune_reinit`` (an idea to make pruning earn its place): the same TF-IDF selection, but the chosen channels
  are re-initialised (fresh filters, reset BatchNorm, silenced consumer inputs) instead of removed, so the
  model keeps its capacity while the class-specific filters are destroyed;
- ``prune_deep`` (another idea): pruning restricted to the deepest conv layers (the last stage), where
  class-specific features live, instead of one global threshold that favours narrow early layers.

Every method ends with the same ``fedsim.run_fedavg`` fine-tune on retained data (same cosine lr family), so
the benchmark compares only what the prepare step does. Pure torch/numpy: nothing here imports nvflare.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nvflare_unlearn.evaluation.fedsim import CostMeter, Federation, federated_activation_report
from nvflare_unlearn.method.activations import WIRE_SUMS_DTYPE
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.method.prune import apply_pruning_plan
from nvflare_unlearn.method.reinit import reinitialise_channels, reset_classifier_rows
from nvflare_unlearn.method.unlearning import unlearning_step
from nvflare_unlearn.options import PlanOptions, ScoringOptions
from nvflare_unlearn.unlearning import MethodOptions

__all__ = [
    "METHODS",
    "PruneOptions",
    "reset_classifier_rows",
    "site_fisher_diagonal",
    "federated_fisher",
    "fisher_noise",
    "tune_fisher_alpha",
    "federated_pruning_plan",
    "reinitialise_channels",
    "prepare_method",
    "PreparedModel",
]

METHODS = ("retrain", "finetune", "row_reset", "fisher", "prune", "prune_reinit", "prune_deep")


def _forget_list(forget_classes: int | Iterable[int]) -> list[int]:
    out = [int(forget_classes)] if isinstance(forget_classes, (int, np.integer)) else [int(c) for c in forget_classes]
    if not out:
        raise ValueError("forget_classes must name at least one class")
    return out


# ------------------------------------------------------------------------------------------------- Fisher
def site_fisher_diagonal(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 64, seed: int = 0
) -> tuple[dict[str, torch.Tensor], int]:
    """One site's SUM over its samples of squared per-example gradients of log p(y|x) (and the sample count).

    Labels are drawn from the model's own predictive distribution (a one-sample Monte-Carlo estimate of the
    true Fisher, as Golatkar et al. use the model's distribution); pass ``y`` to get the empirical Fisher.
    Per-example gradients come from ``torch.func`` (vmap over grad), BatchNorm in eval mode.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    sums = {k: torch.zeros_like(v) for k, v in params.items()}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()

    def nll(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
        out = functional_call(model, (p, b), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_example = vmap(grad(nll), in_dims=(None, None, 0, 0))
    try:
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size]
            if y is None:
                with torch.no_grad():
                    probs = F.softmax(model(xb).float(), 1).cpu()
                yb = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(xb.device)
            else:
                yb = y[s : s + batch_size]
            g = per_example(params, buffers, xb, yb)
            for k in sums:
                sums[k] += (g[k] ** 2).sum(0)
    finally:
        model.train(was_training)
    return sums, int(x.shape[0])


def federated_fisher(
    model: nn.Module,
    fed: Federation,
    sites: Sequence[int],
    forget_classes: Iterable[int],
    images_per_site: int | None = None,
    seed: int = 0,
    meter: CostMeter | None = None,
) -> dict[str, torch.Tensor]:
    """Mean diagonal Fisher over the participating sites' RETAINED data: per-site sums added, divided by N.

    Each site uploads a parameter-sized tensor of sums plus its count (charged to ``meter.bytes_up``).
    """
    t0 = time.perf_counter()
    forget = _forget_list(forget_classes)
    total: dict[str, torch.Tensor] | None = None
    n = 0
    for s in sites:
        xs, _ = fed.site_tensors(s, forget, images_per_site, seed)
        if xs.shape[0] == 0:
            continue
        sums, count = site_fisher_diagonal(model, xs, None, seed=seed * 7919 + s)
        total = sums if total is None else {k: total[k] + sums[k] for k in total}
        n += count
        if meter is not None:
            meter.bytes_up += int(sum(v.numel() * v.element_size() for v in sums.values())) + 8
    if total is None or n == 0:
        raise ValueError("no participating site holds retained data for the Fisher estimate")
    if meter is not None:
        meter.add_time("fisher", time.perf_counter() - t0)
    return {k: v / n for k, v in total.items()}


def fisher_noise(
    model: nn.Module, fisher: dict[str, torch.Tensor], alpha: float = 1e-6, max_inv: float = 1e3, seed: int = 0
) -> nn.Module:
    """Golatkar et al. Eq. 1 (in place): ``w <- w + sqrt(alpha * min(F^-1, max_inv)) * N(0, 1)`` per weight.

    Weights the retained data barely constrain (small Fisher) get the most noise, which destroys what only
    the forgotten data needed; ``max_inv`` is the clamping of their released code (1/F capped at 1e3).
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in fisher:
                raise ValueError(f"Fisher has no entry for parameter {name!r}")
            var = alpha * torch.clamp(1.0 / (fisher[name].float() + 1e-8), max=max_inv)
            noise = torch.randn(p.shape, generator=gen).to(p.device)
            p.add_(var.sqrt() * noise)
    return model


def tune_fisher_alpha(
    model: nn.Module,
    fisher: dict[str, torch.Tensor],
    x_retained: torch.Tensor,
    y_retained: torch.Tensor,
    forget_classes: Iterable[int],
    alphas: Sequence[float] = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3),
    max_r_drop: float = 0.1,
    max_inv: float = 1e3,
    seed: int = 0,
) -> dict[str, Any]:
    """The largest ``alpha`` whose Fisher noise costs at most ``max_r_drop`` of retained accuracy (``model`` untouched).

    Golatkar et al. trade forgetting (more noise) against the retained task; with no access to the forget class
    the one principled choice is the most noise the retained classes tolerate. Each candidate is applied (same
    ``seed``, so the noise differs only in scale) to a copy and scored on ``(x_retained, y_retained)``: the
    participating sites' retained images, never a forget-class image (checked) and never the test set.
    Returns ``{"alpha", "base_r_acc", "max_r_drop", "within_budget", "sweep": [{"alpha", "r_acc"}, ...]}``; when no
    candidate stays within the budget the smallest one is returned with ``within_budget`` False.
    """
    forget = _forget_list(forget_classes)
    if not alphas or any(not a > 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {list(alphas)}")
    if not 0.0 <= max_r_drop <= 1.0:
        raise ValueError(f"max_r_drop must be in [0, 1], got {max_r_drop}")
    if y_retained.numel() == 0:
        raise ValueError("tuning alpha needs retained images")
    if bool(torch.isin(y_retained.cpu(), torch.tensor(forget)).any()):
        raise ValueError("the alpha sweep must not see forget-class images: pass retained images only")

    @torch.no_grad()
    def r_acc(m: nn.Module) -> float:
        was = m.training
        m.eval()
        try:
            correct = sum(
                int((m(x_retained[s : s + 512]).argmax(1) == y_retained[s : s + 512]).sum())
                for s in range(0, x_retained.shape[0], 512)
            )
        finally:
            m.train(was)
        return correct / int(y_retained.numel())

    base = r_acc(model)
    sweep = []
    for a in sorted(float(v) for v in alphas):
        noisy = fisher_noise(copy.deepcopy(model), fisher, alpha=a, max_inv=max_inv, seed=seed)
        sweep.append({"alpha": a, "r_acc": r_acc(noisy)})
    ok = [e["alpha"] for e in sweep if e["r_acc"] >= base - max_r_drop]
    return {
        "alpha": max(ok) if ok else sweep[0]["alpha"],
        "base_r_acc": base,
        "max_r_drop": max_r_drop,
        "within_budget": bool(ok),
        "sweep": sweep,
    }


# ------------------------------------------------------------------------------------------------ pruning
@dataclass
class PruneOptions:
    """The paper's method as the benchmark runs it: the job's option groups, plus the images behind the statistics."""

    plan: PlanOptions = field(default_factory=PlanOptions)
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    images_per_site: int | None = None  # images behind the statistics, per participating site (None = all)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "scoring": self.scoring.to_dict(), "images_per_site": self.images_per_site}


def federated_pruning_plan(
    model: nn.Module,
    fed: Federation,
    sites: Sequence[int],
    forget_classes: int | Iterable[int],
    opts: PruneOptions,
    seed: int = 0,
    meter: CostMeter | None = None,
    apply: bool = True,
) -> tuple[nn.Module, PruningPlan, list[dict[str, Any]]]:
    """The paper's server procedure on federated statistics, one ``unlearning_step`` per forget class.

    For each class: the sites' activation reports on the CURRENT model are merged, and the step is built from their
    class means; with ``apply`` it is applied (in ``opts.plan.prune_mode``) before the next class, as in the paper.
    Returns (model, composed plan, per-step info). ``model`` is modified in place when applying.
    """
    forget = _forget_list(forget_classes)
    plan: PruningPlan | None = None
    info: list[dict[str, Any]] = []
    cur = model
    for c in forget:
        report = federated_activation_report(
            cur, fed, sites, opts.scoring.hook_point, opts.images_per_site, seed=seed, meter=meter
        )
        t0 = time.perf_counter()
        plan = unlearning_step(
            cur,
            report.means(),
            c,
            opts.scoring,
            opts.plan,
            plan,
            class_counts=report.counts,
            record={"federated_sites": [int(s) for s in sites]},
        )
        if apply:
            cur = apply_pruning_plan(cur, plan, mode=opts.plan.prune_mode)
        if meter is not None:
            meter.add_time("scoring", time.perf_counter() - t0)
            meter.bytes_down += len(plan.to_json().encode()) * len(sites)
        wire = int(
            sum(a.size for a in report.sums.values()) * np.dtype(WIRE_SUMS_DTYPE).itemsize + report.counts.nbytes
        )
        info.append(
            {
                "forget_class": c,
                "report_bytes_per_site": wire,
                "images": int(report.counts.sum()),
                "units": plan.steps[-1]["options"]["units"],
            }
        )
    assert plan is not None
    return cur, plan, info


# ---------------------------------------------------------------------------------------------- dispatcher
@dataclass
class PreparedModel:
    """A method's model right before the common fine-tune, and what preparing it cost and did."""

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


def prepare_method(
    method: str,
    original: nn.Module,
    fed: Federation,
    forget_classes: int | Iterable[int],
    participants: Sequence[int],
    meter: CostMeter,
    seed: int = 0,
    prune_opts: PruneOptions | None = None,
    fisher_alpha: float = 1e-6,
    fisher_images_per_site: int | None = None,
    fresh_model: nn.Module | None = None,
    fisher_alphas: Sequence[float] | None = None,
    fisher_max_r_drop: float = 0.1,
) -> PreparedModel:
    """Return the model each method hands to the common FedAvg fine-tune (``original`` is never modified).

    ``participants``: the sites that take part in the statistics phase (activation reports or Fisher).
    ``retrain`` needs ``fresh_model`` (a newly initialised model of the same architecture).
    ``fisher_alphas``: when given, ``fisher`` tunes alpha over them with ``tune_fisher_alpha`` on the participating
    sites' retained images (the images behind the Fisher) instead of using ``fisher_alpha``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    forget = _forget_list(forget_classes)
    if method == "retrain":
        if fresh_model is None:
            raise ValueError("retrain needs fresh_model= (a newly initialised model)")
        return PreparedModel(fresh_model, {})
    model = copy.deepcopy(original)
    if method == "finetune":
        return PreparedModel(model, {})
    if method == "row_reset":
        t0 = time.perf_counter()
        reset_classifier_rows(model, forget, seed)
        meter.add_time("prepare", time.perf_counter() - t0)
        return PreparedModel(model, {})
    if method == "fisher":
        fisher = federated_fisher(model, fed, participants, forget, fisher_images_per_site, seed, meter)
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        alpha = fisher_alpha
        if fisher_alphas is not None:
            parts = [fed.site_tensors(s, forget, fisher_images_per_site, seed) for s in participants]
            xr, yr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            info["alpha_tuning"] = tune_fisher_alpha(
                model, fisher, xr, yr, forget, fisher_alphas, fisher_max_r_drop, seed=seed
            )
            alpha = info["alpha_tuning"]["alpha"]
        fisher_noise(model, fisher, alpha=alpha, seed=seed)
        meter.add_time("prepare", time.perf_counter() - t0)
        info.update(alpha=alpha, fisher_mean=float(torch.cat([v.flatten() for v in fisher.values()]).mean()))
        return PreparedModel(model, info)
    opts = copy.deepcopy(prune_opts) if prune_opts is not None else PruneOptions()
    if method == "prune_deep" and opts.plan.deep_fraction is None:
        opts.plan = dataclasses.replace(opts.plan, deep_fraction=1.0 / 3.0)
    if method == "prune_reinit":
        if opts.plan.prune_mode != "remove":
            raise ValueError("prune_reinit re-initialises instead of removing; leave mode='remove'")
        # Score on the unpruned model; every class's step chosen before anything changes (no removal between).
        plan = None
        info: list[dict[str, Any]] = []
        for c in forget:
            _, step_plan, step_info = federated_pruning_plan(
                model, fed, participants, [c], opts, seed, meter, apply=False
            )
            plan = step_plan if plan is None else _merge_unpruned(plan, step_plan)
            info += step_info
        t0 = time.perf_counter()
        reinitialise_channels(model, plan, seed)
        meter.add_time("prepare", time.perf_counter() - t0)
        return PreparedModel(model, {"plan": json.loads(plan.to_json()), "steps": info, "options": opts.to_dict()})
    model, plan, info = federated_pruning_plan(model, fed, participants, forget, opts, seed, meter, apply=True)
    return PreparedModel(model, {"plan": json.loads(plan.to_json()), "steps": info, "options": opts.to_dict()})


def _merge_unpruned(a: PruningPlan, b: PruningPlan) -> PruningPlan:
    """Union of two single-pass plans scored on the same unpruned model (overlapping channels kept once)."""
    taken = a.pruned_units()
    extra = {k: [i for i in v if i not in set(taken.get(k, []))] for k, v in b.steps[-1]["pruned"].items()}
    step = {**b.steps[-1], "pruned": {k: v for k, v in extra.items() if v}}
    return PruningPlan(
        convs=dict(a.convs),
        groups=[list(g) for g in a.groups],
        steps=a.steps + [step],
        model_name=a.model_name,
        input_shape=a.input_shape,
        original_params=a.original_params,
        original_flops=a.original_flops,
    )


def site_objectives(
    options: MethodOptions | dict,
    fed: Federation,
    forget_classes: Iterable[int],
    teacher: nn.Module | None,
    batch_size: int = 64,
    seed: int = 0,
):
    """``run_fedavg(site_objective=...)`` for an unlearning method: each site's objective on its own data through
    ``unlearning.site_objective``, the function the NVFlare executor calls (its forget-class images for the forget
    term, the original model as teacher)."""
    from nvflare_unlearn.runtime.batches import TensorBatches
    from nvflare_unlearn.unlearning import site_objective

    forget = _forget_list(forget_classes)
    keep_out = [c for c in range(fed.num_classes) if c not in set(forget)]

    def objective(site: int, round_idx: int):
        def forget_loader():
            xf, yf = fed.site_tensors(site, keep_out)
            if xf.shape[0] == 0:
                return None
            return TensorBatches(xf, yf, batch_size, shuffle=True, seed=hash((seed, round_idx, site)) & 0x7FFFFFFF)

        return site_objective(options, forget, fed.num_classes, teacher, forget_loader, hash((seed, site)) & 0x7FFFFFFF)

    return objective
