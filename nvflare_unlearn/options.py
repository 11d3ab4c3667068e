"""Every option a user sets, in typed groups; each group is documented and validated here, once.

The groups are plain frozen dataclasses of strings and numbers, so they cross every boundary as dicts
(``to_dict`` / ``from_dict``): recipe keyword arguments, NVFlare component arguments in an exported job's JSON,
CLI flags (generated from the fields, help text included) and the job's metrics record all use the same names.
``from_dict`` is the boundary check: an unknown key, a wrong type or a value out of range raises ``ValueError``
naming the option, whether it came from Python, a job config or the command line.

Old names keep working for one release (``DEPRECATED_NAMES``), with a ``FutureWarning``.

This module is a leaf: it imports nothing from the package except ``_validation``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, TypeVar

from nvflare_unlearn._validation import check_choice, check_ratio, normalize_text

IDF_VARIANTS = ("paper", "reference")
TF_NORMS = ("share", "width", "balance")
HOOK_POINTS = ("conv", "bn")
AGGREGATIONS = ("mean", "median", "trimmed_mean")
DP_UNITS = ("swap_within_class", "add_remove_image")
MAX_SITES = 10_000
SCOPES = ("global", "per_layer")
DIRECTIONS = ("highest", "lowest")
PRUNE_MODES = ("remove", "mask", "reinit")
PARTITIONS = ("iid", "dirichlet", "biased", "none")
DATASET_NAMES = ("digits", "cifar10", "cifar100")
EXPORT_FORMATS = ("pt2", "onnx")  # torch.export program, ONNX (needs the onnx extra)

_STOP_COND = re.compile(r"(r_acc|u_acc|acc) (>=|<=|>|<|=) (\d+(\.\d*)?|\.\d+)")

#: old keyword -> current name (accepted with a FutureWarning until the next minor release)
DEPRECATED_NAMES = {
    "n_clients": "num_clients",
    "n_sites": "num_clients",
    "ratio": "prune_ratio",
    "mode": "prune_mode",
}


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - the CLI's word for it
    return field(default=default, metadata={"help": help})


def _int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def _real(
    name: str,
    value: Any,
    *,
    low: float,
    low_open: bool,
    high: float = math.inf,
    high_open: bool = True,
    allow_none: bool = False,
) -> None:
    if value is None and allow_none:
        return
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")


G = TypeVar("G", bound="OptionGroup")


class OptionGroup:
    """Shared dict round-trip and the boundary check of every group."""

    GROUP: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[G], data: Mapping[str, Any] | G | None) -> G:
        """The group from a dict (a job config, JSON); unknown keys and bad values raise ValueError."""
        if data is None:
            return cls()
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.GROUP} options must be a dict, got {type(data).__name__}")
        data = rename_deprecated(dict(data), f"{cls.GROUP} options")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.GROUP} option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def help(cls, name: str) -> str:
        return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)  # type: ignore


@dataclass(frozen=True)
class ScoringOptions(OptionGroup):
    """How the sites' activation statistics become per-channel scores (paper Sec. 3.2, Eq. 6-8)."""

    GROUP: ClassVar[str] = "scoring"
    idf: str = _opt("paper", "IDF variant: paper (Eq. 7, never negative) or reference (the released code)")
    tf_norm: str = _opt("share", "TF: share (paper), width (share x channels: fair to wide layers), balance (code)")
    coe: float | None = _opt(None, "balance coefficient's constant (tf_norm=balance only)")
    hook_point: str = _opt("conv", "where activations are read: conv (raw conv output, paper) or bn")
    aggregation: str = _opt(
        "median", "how site reports combine: median (robust, default), trimmed_mean (robust), mean (exact, the paper)"
    )
    trim: float = _opt(0.1, "fraction trimmed at each end by aggregation=trimmed_mean")
    max_activation_batches: int | None = _opt(None, "cap on each site's activation pass (batches; None = all)")

    def __post_init__(self) -> None:
        check_choice(self.idf, "idf", IDF_VARIANTS)
        check_choice(self.tf_norm, "tf_norm", TF_NORMS)
        check_choice(self.hook_point, "hook_point", HOOK_POINTS)
        check_choice(self.aggregation, "aggregation", AGGREGATIONS)
        _real("trim", self.trim, low=0.0, low_open=False, high=0.5)
        if self.tf_norm == "balance":
            _real("coe (tf_norm='balance')", self.coe, low=0.0, low_open=True)
        elif self.coe is not None:
            raise ValueError(f"coe is only used with tf_norm='balance' (got tf_norm={self.tf_norm!r}); drop coe")
        _int("max_activation_batches", self.max_activation_batches, 1, allow_none=True)


@dataclass(frozen=True)
class PlanOptions(OptionGroup):
    """Which channels one forget class's plan step removes, and how the plan is applied."""

    GROUP: ClassVar[str] = "plan"
    prune_ratio: float = _opt(0.05, "fraction of all prunable conv channels removed per forget class, in (0, 1)")
    scope: str = _opt("global", "global (one threshold over all layers, paper) or per_layer")
    direction: str = _opt("highest", "prune the highest TF-IDF scores (paper) or the lowest (released code)")
    min_channels: int = _opt(1, "channels every layer keeps")
    prune_mode: str = _opt(
        "remove",
        "remove (physically, smaller model), mask (shapes kept, channels held at 0) or reinit (the chosen channels "
        "re-initialised and trained anew, shapes kept)",
    )
    deep_fraction: float | None = _opt(None, "prune only the deepest fraction of conv layers (None = all layers)")

    def __post_init__(self) -> None:
        check_ratio(self.prune_ratio, "prune_ratio")
        check_choice(self.scope, "scope", SCOPES)
        check_choice(self.direction, "direction", DIRECTIONS)
        check_choice(self.prune_mode, "prune_mode", PRUNE_MODES)
        _int("min_channels", self.min_channels, 1)
        _real("deep_fraction", self.deep_fraction, low=0.0, low_open=True, high=1.0, high_open=False, allow_none=True)
        if self.deep_fraction is not None and self.scope != "global":
            raise ValueError("deep_fraction restricts the global ranking; use scope='global' with it")


@dataclass(frozen=True)
class PrivacyOptions(OptionGroup):
    """What the sites do to their activation upload before it leaves (docs/reliability.md states the guarantee)."""

    GROUP: ClassVar[str] = "privacy"
    min_count: int = _opt(0, "sites do not report a class they hold fewer images of")
    clip_bound: float | None = _opt(None, "sites clip each image's pooled activation to [0, B] before summing")
    dp_epsilon: float | None = _opt(None, "Gaussian noise on the uploads: epsilon for the whole request")
    dp_delta: float | None = _opt(None, "Gaussian noise on the uploads: delta for the whole request")
    dp_unit: str = _opt(
        "swap_within_class",
        "what one unit of privacy is: swap_within_class (one image replaced by another of its class; class counts "
        "released exactly) or add_remove_image (one image added or removed; counts noised too)",
    )
    dp_budget_epsilon: float | None = _opt(
        None, "a site's total epsilon over all requests (its ledger refuses more; default: one request's)"
    )
    dp_budget_delta: float | None = _opt(None, "a site's total delta over all requests (default: one request's)")
    dp_ledger: str | None = _opt(
        None, "the site's privacy ledger file (may contain {site_name}); default: in the site's workspace"
    )

    def __post_init__(self) -> None:
        _int("min_count", self.min_count, 0)
        _real("clip_bound", self.clip_bound, low=0.0, low_open=True, allow_none=True)
        if (self.dp_epsilon is None) != (self.dp_delta is None):
            raise ValueError("give dp_epsilon and dp_delta together (Gaussian noise needs both), or neither")
        if self.dp_epsilon is not None:
            if self.clip_bound is None:
                raise ValueError(
                    "dp_epsilon needs clip_bound: the noise is calibrated to activations clipped to [0, B]"
                )
            _real("dp_epsilon", self.dp_epsilon, low=0.0, low_open=True)
            _real("dp_delta", self.dp_delta, low=0.0, low_open=True, high=1.0)
        check_choice(self.dp_unit, "dp_unit", DP_UNITS)
        _real("dp_budget_epsilon", self.dp_budget_epsilon, low=0.0, low_open=True, allow_none=True)
        _real("dp_budget_delta", self.dp_budget_delta, low=0.0, low_open=True, high=1.0, allow_none=True)
        if self.dp_ledger is not None and (not isinstance(self.dp_ledger, str) or not self.dp_ledger):
            raise ValueError(f"dp_ledger must be a file path or None, got {self.dp_ledger!r}")

    @property
    def dp(self) -> bool:
        return self.dp_epsilon is not None


@dataclass(frozen=True)
class SiteDataOptions(OptionGroup):
    """How each site finds its own data (the plugin's executor; a user's own script loads its own)."""

    GROUP: ClassVar[str] = "site_data"
    dataset: str = _opt("digits", "digits (built in), cifar10, cifar100")
    data_root: str | None = _opt(None, "dataset folder (.npz or torchvision layout); may contain {site_name}")
    partition: str = _opt("iid", "iid, dirichlet, biased (the paper's), none (each site has its own folder)")
    num_clients: int = _opt(2, "number of sites the dataset is split across")
    alpha: float = _opt(0.5, "Dirichlet concentration (partition=dirichlet)")
    q: float = _opt(0.5, "bias probability (partition=biased)")
    data_seed: int = _opt(0, "seed of the partition")
    train_subset: int | None = _opt(None, "use only this many training images (class-balanced)")
    normalize: str = _opt(
        "dataset",
        "input normalisation: dataset (CIFAR's published channel mean/std; digits none), none (pixels in [0, 1]), "
        'or JSON {"mean": [...], "std": [...]} as torchvision\'s Normalize after ToTensor: match your own script\'s',
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalize", normalize_text(self.normalize))  # one spelling in the job config
        check_choice(self.dataset, "dataset", DATASET_NAMES)
        check_choice(self.partition, "partition", PARTITIONS)
        _int("num_clients", self.num_clients, 1)
        if self.partition == "dirichlet":
            _real("alpha", self.alpha, low=0.0, low_open=True)
        if self.partition == "biased":
            _real("q", self.q, low=0.0, low_open=False, high=1.0, high_open=False)
        _int("data_seed", self.data_seed, 0)
        _int("train_subset", self.train_subset, 1, allow_none=True)
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise ValueError(f"data_root must be a folder path or None, got {self.data_root!r}")


@dataclass(frozen=True)
class TrainingOptions(OptionGroup):
    """Local SGD at each site per fine-tuning (or training) round."""

    GROUP: ClassVar[str] = "training"
    local_epochs: int = _opt(1, "local epochs per round")
    lr: float = _opt(0.01, "local SGD learning rate")
    batch_size: int = _opt(32, "local batch size")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "SGD weight decay")
    seed: int = _opt(0, "seed of the model's initialisation and the sites' batch order")

    def __post_init__(self) -> None:
        _int("local_epochs", self.local_epochs, 0)
        _real("lr", self.lr, low=0.0, low_open=True)
        _int("batch_size", self.batch_size, 1)
        _real("momentum", self.momentum, low=0.0, low_open=False)
        _real("weight_decay", self.weight_decay, low=0.0, low_open=False)
        _int("seed", self.seed, 0)


#: the server's phases, each with its own quorum and task timeout (``FederationOptions.for_phase``)
PHASES = ("activation", "train", "validate")


@dataclass(frozen=True)
class FederationOptions(OptionGroup):
    """The server's rounds and how long it waits for which sites (per phase: activation, train, validate)."""

    GROUP: ClassVar[str] = "federation"
    num_rounds: int = _opt(3, "FedAvg rounds (fine-tuning rounds for unlearning; 0 = none)")
    min_clients: int | None = _opt(
        None,
        "fewest sites whose results a task needs (None = all sites but one, at least 1: survives one dead site)",
    )
    activation_min_clients: int | None = _opt(None, "min_clients of the activation phase (None = min_clients)")
    train_min_clients: int | None = _opt(None, "min_clients of the fine-tuning / training rounds (None = min_clients)")
    validate_min_clients: int | None = _opt(None, "min_clients of the federated evaluations (None = min_clients)")
    task_timeout: int = _opt(3600, "seconds a site may take per task, from the second task on (0 = no limit)")
    activation_timeout: int | None = _opt(None, "task_timeout of the activation phase (None = task_timeout)")
    train_timeout: int | None = _opt(None, "task_timeout of a training round (None = task_timeout)")
    validate_timeout: int | None = _opt(None, "task_timeout of an evaluation (None = task_timeout)")
    wait_time_after_min_received: int = _opt(10, "seconds to wait for other sites once min_clients answered")
    stop_cond: str | None = _opt(
        None,
        "stop early when a federated metric meets it, NVFlare's syntax: 'r_acc >= 0.95' (metrics: r_acc, u_acc, acc)",
    )

    def __post_init__(self) -> None:
        _int("num_rounds", self.num_rounds, 0)
        _int("min_clients", self.min_clients, 1, allow_none=True)
        _int("task_timeout", self.task_timeout, 0)
        for phase in PHASES:
            _int(f"{phase}_min_clients", getattr(self, f"{phase}_min_clients"), 1, allow_none=True)
            _int(f"{phase}_timeout", getattr(self, f"{phase}_timeout"), 0, allow_none=True)
        _int("wait_time_after_min_received", self.wait_time_after_min_received, 0)
        if self.stop_cond is not None and not _STOP_COND.fullmatch(str(self.stop_cond)):
            raise ValueError(
                f"stop_cond must read '<metric> <op> <value>' with metric r_acc, u_acc or acc and op one of "
                f">=, <=, >, <, = (e.g. 'r_acc >= 0.95'), got {self.stop_cond!r}"
            )

    @staticmethod
    def default_quorum(num_sites: int) -> int:
        """All sites but one (at least one): the default that lets a job finish when one site dies."""
        return max(1, int(num_sites) - 1)

    def for_phase(self, phase: str, num_sites: int) -> tuple[int, int]:
        """(quorum, task timeout) of ``phase`` in a federation of ``num_sites`` sites."""
        check_choice(phase, "phase", PHASES)
        quorum = getattr(self, f"{phase}_min_clients")
        if quorum is None:
            quorum = self.min_clients if self.min_clients is not None else self.default_quorum(num_sites)
        timeout = getattr(self, f"{phase}_timeout")
        return int(quorum), int(self.task_timeout if timeout is None else timeout)

    def quorums(self, num_sites: int) -> dict[str, int]:
        return {phase: self.for_phase(phase, num_sites)[0] for phase in PHASES}


def _site_table(name: str, value: Any) -> None:
    """None, or a dict of site name -> positive integer (images), as the server admin writes it."""
    if value is None:
        return
    if not isinstance(value, Mapping) or len(value) > MAX_SITES:
        raise ValueError(f"{name} must map site names to image counts (at most {MAX_SITES} sites), got {value!r:.80}")
    for site, n in value.items():
        if not isinstance(site, str) or not site or len(site) > 256:
            raise ValueError(f"{name}: site names must be non-empty strings, got {site!r:.80}")
        _int(f"{name}[{site!r}]", n, 1)


@dataclass(frozen=True)
class SecurityOptions(OptionGroup):
    """What the server trusts a site with (its data sizes, its updates, its evaluation), and how it signs the record.

    The sizes are the server admin's: they are part of the job configuration, which no site can change, so a site
    that lies about its counts cannot raise its own weight above them (docs/reliability.md, threat model).
    """

    GROUP: ClassVar[str] = "security"
    site_sizes: dict[str, int] | None = _opt(
        None, "the server admin's table site -> training images: caps a site's weight (JSON, e.g. '{\"site-1\": 600}')"
    )
    site_test_sizes: dict[str, int] | None = _opt(
        None, "site -> test images: caps a site's share of the federated evaluation (JSON)"
    )
    size_cap_factor: float = _opt(2.0, "a site missing from the size tables weighs at most this x the median site")
    update_aggregation: str = _opt(
        "median", "how fine-tuning combines the sites' models: median (robust, default), trimmed_mean, mean (FedAvg)"
    )
    update_trim: float = _opt(0.2, "fraction trimmed at each end by update_aggregation=trimmed_mean")
    update_clip: float | None = _opt(
        2.0, "clip each site's update to this x the round's median update norm (None = no clipping)"
    )
    update_outlier: float | None = _opt(
        2.0,
        "leave out a site whose update is further than this x the median distance from the coordinate-wise median "
        "update (>= 1; None = keep every site)",
    )
    eval_outlier_tol: float = _opt(
        0.1, "a site whose U or R accuracy is further than this (+ 3 binomial SE) from the sites' median is left out"
    )
    signing_key: str | None = _opt(
        None,
        "private key (PEM) the server signs the audit record with; default: the provisioned server key, else a "
        "key of this user outside the run folder",
    )

    def __post_init__(self) -> None:
        _site_table("site_sizes", self.site_sizes)
        _site_table("site_test_sizes", self.site_test_sizes)
        _real("size_cap_factor", self.size_cap_factor, low=0.0, low_open=True)
        check_choice(self.update_aggregation, "update_aggregation", AGGREGATIONS)
        _real("update_trim", self.update_trim, low=0.0, low_open=False, high=0.5)
        _real("update_clip", self.update_clip, low=0.0, low_open=True, allow_none=True)
        _real("update_outlier", self.update_outlier, low=1.0, low_open=False, allow_none=True)
        _real("eval_outlier_tol", self.eval_outlier_tol, low=0.0, low_open=False, high=1.0, high_open=False)
        if self.signing_key is not None and (not isinstance(self.signing_key, str) or not self.signing_key):
            raise ValueError(f"signing_key must be a file path or None, got {self.signing_key!r}")


#: the option groups of this module (``unlearning.options.MethodOptions`` joins them in a job)
GROUPS: tuple[type[OptionGroup], ...] = (
    ScoringOptions,
    PlanOptions,
    PrivacyOptions,
    SiteDataOptions,
    TrainingOptions,
    FederationOptions,
    SecurityOptions,
)


def rename_deprecated(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """Map old option names to current ones (FutureWarning); both given at once is an error."""
    if "target_r_acc" in kwargs:
        value = kwargs.pop("target_r_acc")
        if value is not None:
            if kwargs.get("stop_cond") is not None:
                raise ValueError(f"{where}: give stop_cond only (target_r_acc is its deprecated form)")
            _real("target_r_acc", value, low=0.0, low_open=True, high=1.0, high_open=False)
            warnings.warn(
                f"{where}: target_r_acc is deprecated, use stop_cond='r_acc >= {value}'", FutureWarning, stacklevel=3
            )
            kwargs["stop_cond"] = f"r_acc >= {float(value)}"
    for old, new in DEPRECATED_NAMES.items():
        if old in kwargs:
            if new in kwargs:
                raise ValueError(f"{where}: give {new!r} only ({old!r} is its deprecated name)")
            warnings.warn(f"{where}: {old!r} is deprecated, use {new!r}", FutureWarning, stacklevel=3)
            kwargs[new] = kwargs.pop(old)
    return kwargs


def split_options(
    flat: Mapping[str, Any],
    groups: tuple[type[OptionGroup], ...],
    where: str,
    given: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sort flat keyword options into ``groups``; returns ({group name: validated group}, the other keywords).

    ``given`` holds groups passed whole (``{"plan": {...}}`` or a group object); a name given both ways is an error.
    Each field name belongs to exactly one group, so the flat form is never ambiguous.
    """
    flat = rename_deprecated(dict(flat), where)
    out: dict[str, Any] = {}
    for g in groups:
        base = (given or {}).get(g.GROUP)
        base = dict(base.to_dict() if isinstance(base, OptionGroup) else (base or {}))
        for k in g.names():
            if k in flat:
                if k in base:
                    raise ValueError(f"{where}: {k!r} given both on its own and inside {g.GROUP}=")
                base[k] = flat.pop(k)
        out[g.GROUP] = g.from_dict(base)
    return out, flat


def fold_legacy(
    given: Mapping[str, Any], legacy: Mapping[str, Any], groups: tuple[type[OptionGroup], ...], where: str
) -> dict[str, dict[str, Any]]:
    """A component's flat keywords of version 0.1 folded into its option-group dicts (with a FutureWarning)."""
    warnings.warn(
        f"{where}: flat option keywords are deprecated; pass the option groups "
        f"({', '.join(g.GROUP + '={...}' for g in groups)})",
        FutureWarning,
        stacklevel=3,
    )
    out, rest = split_options(legacy, groups, where, given)
    if rest:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {sorted(rest)}")
    return {name: group.to_dict() for name, group in out.items()}
