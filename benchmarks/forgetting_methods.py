"""The forgetting benchmark's method vocabulary, in one place: what ``--methods`` may name and what each name runs.

A benchmarked method is a registered method plus options, spelled as the registry spells it
(``unlearning.parse_variant``: ``prune@0.2+kd``, ``neggrad+kd``, ``scrub``, ``retarget``), or a baseline that is not a
job method (``fisher``); each becomes a preparation of the original (``evaluation.baselines.METHODS``) and the
objective the sites minimise while fine-tuning (``unlearning.MethodOptions``). The job's default rule
(``unlearning.defaults``) reads the runs by these names.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvflare_unlearn.evaluation.baselines import METHODS
from nvflare_unlearn.unlearning import MethodOptions, get_method, method_names, parse_variant
from nvflare_unlearn.unlearning.registry import VARIANT_ALIASES

#: the methods a run compares when ``--methods`` is not given
DEFAULT_METHODS = "finetune,row_reset,fisher,prune"


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked method: how the original is prepared, what the sites minimise, the prune ratio.

    Written ``<prepare>[@<ratio>][+kd]``: ``prune@0.2+kd`` prunes 20 % then fine-tunes with distillation;
    ``neggrad+kd`` is NegGrad+ with a distilled retained term; ``scrub`` distils by definition.
    """

    name: str
    prepare: str
    objective: MethodOptions
    ratio: float | None


#: preparations the benchmark compares that are not methods of the job (``evaluation.baselines``)
BASELINES = ("fisher",)


def parse_method(spec: str, default_ratio: float) -> MethodSpec:
    """A registered method variant (``unlearning.parse_variant``: ``<method>[@<ratio>][+kd]``), or a baseline."""
    base = spec.partition("+")[0].partition("@")[0]
    if base == "retrain":
        raise SystemExit(f"{spec!r}: retraining is the references, not a method to compare")
    if base in BASELINES:
        if spec != base:
            raise SystemExit(f"baseline {base!r} takes no @ratio or +kd")
        return MethodSpec(spec, base, MethodOptions(method="finetune", recovery="ce"), None)
    try:
        flat = parse_variant(spec)
    except ValueError as e:
        known = sorted(set(method_names()) | set(VARIANT_ALIASES) | set(BASELINES))
        raise SystemExit(f"{e}; choose from {known} (retraining is the references)") from None
    method = get_method(flat["method"])
    opts = MethodOptions(method=method.name, recovery=flat["recovery"])
    # the baselines' preparation: pruning for a method that needs a plan, else the model as it is
    prepare = base if base in METHODS else ("prune" if method.prunes else "finetune")
    ratio = flat.get("prune_ratio", default_ratio) if method.prunes else None
    return MethodSpec(spec, prepare, opts, ratio)
