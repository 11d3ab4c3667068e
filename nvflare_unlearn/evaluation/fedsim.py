"""In-process FedAvg simulator for benchmarks and sweeps (NOT a replacement for the NVFlare job).

A real NVFlare simulation costs a process per site and seconds per round; a sweep over methods, ratios and
seeds would not fit a small machine. This simulator runs the same arithmetic in one process: sites are index
partitions of one tensor dataset, a seeded subset of sites is sampled each round, each trains `local_epochs`
with the codebase's one training loop (`metrics.train_epochs`), and the server takes the sample-weighted
average of the returned state dicts. The federated activation phase is the NVFlare job's math exactly:
per-site `collect_class_activations`, then `merge_reports`.

Fairness between methods: client sampling and each site's batch order depend only on (seed, round, site), and
every method uses the same cosine learning-rate family, so two methods differ only in what they do.

Faithfulness to the NVFlare job: with ``FedConfig(emulate="nvflare", lr_min=lr)`` and every site sampled each
round, a site's batch order is the executor's (``data.site_shuffle_seed`` with the site's name ``site-<i+1>``), the
learning rate is constant as in the job, and the server averages with the job's own function
(``protect.robust.aggregate_updates``, weighted mean: the job with ``update_aggregation="mean"``), so the two
federations train the same model:
``benchmarks/fedsim_faithfulness.py`` checks it against the simulator, round by round.
Costs are counted as an FL deployment would pay them: bytes of the model state sent to and returned by each
sampled site per round, bytes of any statistics uploads, and wall time of the method (evaluation excluded).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from nvflare_unlearn.method.activations import (
    WIRE_SUMS_DTYPE,
    ClassActivationReport,
    collect_class_activations,
    merge_reports,
)
from nvflare_unlearn.runtime.batches import TensorBatches, site_shuffle_seed
from nvflare_unlearn.runtime.training import train_epochs

__all__ = [
    "FedConfig",
    "CostMeter",
    "Federation",
    "cosine_lr",
    "state_bytes",
    "EMULATIONS",
    "run_fedavg",
    "federated_activation_report",
]


#: "none": this module's own batch seeds ((seed, round, site) hash) and float64 averaging, which earlier results were
#: made with; "nvflare": the NVFlare job's batch seeds (``data.site_shuffle_seed``) and averaging arithmetic
EMULATIONS = ("none", "nvflare")


@dataclass
class FedConfig:
    """One FedAvg schedule: `rounds` rounds, `clients_per_round` sampled sites, cosine lr from `lr` to `lr_min`.

    `emulate="nvflare"` draws each site's batch order as the NVFlare executor does (site ``i`` is named
    ``site-<i+1>``) and averages as NVFlare's server does; the default keeps this simulator's own seeding and
    float64 averaging, which earlier results were made with.
    """

    rounds: int
    clients_per_round: int
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "none"
    seed: int = 0
    precision: str = "fp32"
    emulate: str = "none"

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.clients_per_round < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError(f"invalid FedConfig: {self}")
        if self.emulate not in EMULATIONS:
            raise ValueError(f"emulate must be one of {list(EMULATIONS)}, got {self.emulate!r}")
        if not self.lr > 0 or self.lr_min < 0:
            raise ValueError(f"lr must be > 0 and lr_min >= 0, got {self.lr}, {self.lr_min}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cosine_lr(base: float, round_idx: int, total_rounds: int, floor: float = 0.0) -> float:
    """Cosine decay over rounds (constant within a round): the one schedule family every method uses."""
    if total_rounds <= 1:
        return base
    return floor + 0.5 * (base - floor) * (1.0 + math.cos(math.pi * round_idx / total_rounds))


def state_bytes(model: nn.Module) -> int:
    """Bytes of the state dict FedAvg exchanges (parameters and BN statistics)."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))


@dataclass
class CostMeter:
    """What a method cost: rounds, bytes down (server->sites) and up (sites->server), wall time per phase."""

    rounds: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    wall_s: dict[str, float] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        self.wall_s[phase] = self.wall_s.get(phase, 0.0) + float(seconds)

    @property
    def total_s(self) -> float:
        return float(sum(self.wall_s.values()))

    @property
    def total_bytes(self) -> int:
        return int(self.bytes_down + self.bytes_up)

    @classmethod
    def from_snapshot(cls, snap: Mapping[str, Any]) -> CostMeter:
        """The meter a ``snapshot()`` was taken of: how a resumed run keeps counting where it stopped."""
        return cls(
            rounds=int(snap["rounds"]),
            bytes_down=int(snap["bytes_down"]),
            bytes_up=int(snap["bytes_up"]),
            wall_s={str(k): float(v) for k, v in dict(snap["wall_s"]).items()},
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "bytes_total": self.total_bytes,
            "wall_s": dict(self.wall_s),
            "wall_s_total": self.total_s,
        }


class Federation:
    """Sites as index partitions of one labelled tensor dataset held on the compute device."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        site_indices: Sequence[np.ndarray],
        num_classes: int,
        device: torch.device | str | None = None,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]} labels")
        if not site_indices:
            raise ValueError("a federation needs at least one site")
        dev = torch.device(device) if device is not None else x.device
        self.x, self.y = x.to(dev), y.to(dev)
        self.device = dev
        self.num_classes = int(num_classes)
        self.sites = [np.asarray(s, dtype=np.int64) for s in site_indices]
        self._labels = y.cpu().numpy()

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def site_indices(
        self, site: int, drop_classes: Iterable[int] = (), max_images: int | None = None, seed: int = 0
    ) -> np.ndarray:
        """A site's sample indices without `drop_classes` (sites filter forget classes themselves)."""
        idx = self.sites[site]
        drop = list(drop_classes)
        if drop:
            idx = idx[~np.isin(self._labels[idx], drop)]
        if max_images is not None and idx.size > max_images:
            idx = np.sort(np.random.default_rng([seed, site]).choice(idx, size=max_images, replace=False))
        return idx

    def site_tensors(
        self, site: int, drop_classes: Iterable[int] = (), max_images: int | None = None, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(self.site_indices(site, drop_classes, max_images, seed), device=self.device)
        return self.x[idx], self.y[idx]

    def sample_sites(self, round_idx: int, k: int, seed: int) -> list[int]:
        """`k` distinct sites for a round; depends only on (seed, round), never on the method being run."""
        k = min(int(k), self.num_sites)
        rng = np.random.default_rng([int(seed), int(round_idx) + 1_000_003])
        return sorted(int(s) for s in rng.choice(self.num_sites, size=k, replace=False))

    def class_counts(self) -> np.ndarray:
        return np.stack([np.bincount(self._labels[s], minlength=self.num_classes) for s in self.sites])


def _average_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for key in states[0]:
        ref = states[0][key]
        if ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for st, w in zip(states, weights):
                acc += st[key].to(torch.float64) * (w / total)
            out[key] = acc.to(ref.dtype)
        else:  # integer buffers (BatchNorm num_batches_tracked): keep the largest count
            out[key] = torch.stack([st[key] for st in states]).max(0).values
    return out


def _average_states_nvflare(
    base: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """The job's own aggregation (``protect.robust.aggregate_updates``, weighted mean without clipping or outlier
    filter: the job with ``update_aggregation="mean"``), on the sites' states in the order given (the server sorts
    results by site name)."""
    from nvflare_unlearn.protect.robust import aggregate_updates

    def as_numpy(state):
        return {k: v.detach().cpu().numpy() for k, v in state.items()}

    params, _info = aggregate_updates(
        as_numpy(base), [as_numpy(st) for st in states], weights, aggregation="mean", clip=None, outlier=None
    )
    return {k: torch.as_tensor(params[k]).to(device=ref.device, dtype=ref.dtype) for k, ref in base.items()}


def run_fedavg(
    model: nn.Module,
    fed: Federation,
    cfg: FedConfig,
    drop_classes: Iterable[int] = (),
    meter: CostMeter | None = None,
    eval_fn: Callable[[nn.Module, int], dict[str, Any]] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    site_objective: Callable[[int, int], Any] | None = None,
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
    phase: str = "train",
    stop_fn: Callable[[dict[str, Any]], bool] | None = None,
    start_round: int = 0,
) -> list[dict[str, Any]]:
    """Train `model` in place for `cfg.rounds` FedAvg rounds; returns per-round records.

    Each record holds the round (1-based), lr, sampled sites, cumulative cost and, when `eval_fn` is given,
    its result (evaluation time is not charged to the method). `after_step` runs after every local optimizer
    step (mask-mode pruning re-zeroes channels there). `site_objective(site, round)` gives that site's
    ``unlearning.UnlearningObjective`` (None = cross-entropy), as the NVFlare executor builds it per task
    (``baselines.site_objectives``: both through ``unlearning.site_objective``). `stop_fn(record)` returning True
    ends training after that round (the lr schedule stays the one of `cfg.rounds`): how a benchmark compares models at
    equal accuracy instead of equal rounds. `start_round` resumes a killed run: `model` and `meter` hold the state after
    that many rounds, and since a round depends only on (global model, seed, round), the result is the one an
    uninterrupted run gives; the returned records are those of the rounds run now.
    """
    if not 0 <= start_round <= cfg.rounds:
        raise ValueError(f"start_round must be in [0, {cfg.rounds}], got {start_round}")
    meter = meter if meter is not None else CostMeter()
    drop = sorted(set(int(c) for c in drop_classes))
    history: list[dict[str, Any]] = []
    local = copy.deepcopy(model)
    for r in range(start_round, cfg.rounds):
        t0 = time.perf_counter()
        lr = cosine_lr(cfg.lr, r, cfg.rounds, cfg.lr_min)
        sites = fed.sample_sites(r, cfg.clients_per_round, cfg.seed)
        if cfg.emulate == "nvflare":
            sites = sorted(sites, key=lambda i: f"site-{i + 1}")  # NVFlare's server sorts results by site name
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        nbytes = state_bytes(model)
        states, weights = [], []
        for s in sites:
            xs, ys = fed.site_tensors(s, drop)
            meter.bytes_down += nbytes
            if xs.shape[0] == 0:
                continue  # a site holding only forget classes has nothing to fine-tune on
            local.load_state_dict(global_state)
            order_seed = (
                hash((cfg.seed, r, s)) & 0x7FFFFFFF
                if cfg.emulate == "none"
                else site_shuffle_seed(cfg.seed, f"site-{s + 1}", r)
            )
            batches = TensorBatches(xs, ys, cfg.batch_size, shuffle=True, seed=order_seed, augment=cfg.augment)
            objective = site_objective(s, r) if site_objective is not None else None
            train_epochs(
                local,
                batches,
                cfg.local_epochs,
                lr,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
                after_step=after_step,
                loss_fn=objective.batch_loss if objective is not None else None,
                before_step=objective.before_step if objective is not None else None,
                precision=cfg.precision,
            )
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            weights.append(float(xs.shape[0]))
            meter.bytes_up += nbytes
        if states:
            if cfg.emulate == "nvflare":
                model.load_state_dict(_average_states_nvflare(global_state, states, weights))
            else:
                model.load_state_dict(_average_states(states, weights))
            if after_step is not None:
                after_step(model)
        if fed.device.type == "cuda":
            torch.cuda.synchronize(fed.device)
        meter.rounds += 1
        meter.add_time(phase, time.perf_counter() - t0)
        rec: dict[str, Any] = {"round": meter.rounds, "lr": lr, "sites": sites, **meter.snapshot()}
        if eval_fn is not None:
            rec.update(eval_fn(model, meter.rounds))
        history.append(rec)
        if on_round is not None:
            on_round(r + 1, rec)
        if stop_fn is not None and stop_fn(rec):
            break
    return history


def federated_activation_report(
    model: nn.Module,
    fed: Federation,
    sites: Sequence[int],
    hook_point: str = "conv",
    images_per_site: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    meter: CostMeter | None = None,
) -> ClassActivationReport:
    """The NVFlare job's activation phase in-process: each site's report (sums + counts), then `merge_reports`.

    Every site uses ALL its classes (the forget classes are what we need statistics for). Each report goes
    through the same wire format as in the NVFlare job (sums cast to ``WIRE_SUMS_DTYPE``), and its upload bytes
    are counted (the model is already at the sites after pretraining), as is the phase's wall time.
    """
    t0 = time.perf_counter()
    reports = []
    for s in sites:
        xs, ys = fed.site_tensors(s, (), images_per_site, seed)
        if xs.shape[0] == 0:
            continue
        local = collect_class_activations(
            model, TensorBatches(xs, ys, batch_size), fed.num_classes, hook_point=hook_point, device=fed.device
        )
        # what the NVFlare executor sends: sums cast to the wire dtype, counts as int64
        wire = local.to_dict(sums_dtype=WIRE_SUMS_DTYPE)
        reports.append(ClassActivationReport.from_dict(wire))
        if meter is not None:
            meter.bytes_up += int(sum(np.asarray(a).nbytes for a in wire["sums"].values()) + wire["counts"].nbytes)
    if not reports:
        raise ValueError("no participating site holds any data for the activation phase")
    merged = merge_reports(reports)
    if meter is not None:
        meter.add_time("activation", time.perf_counter() - t0)
    return merged
