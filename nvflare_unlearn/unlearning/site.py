"""The site side, written once: the objective a site trains with this round.

The NVFlare executor, the Client API helpers (a user's own script) and the in-process federation of the benchmarks
all call ``site_objective``; they differ only in where the teacher and the forget-class images come from, so
those are passed as values or as callables (built only when the method needs them). A site that holds none of the
forget classes trains on the retained term alone and says so in its report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

from torch import nn

from nvflare_unlearn.unlearning.objective import UnlearningObjective
from nvflare_unlearn.unlearning.options import MethodOptions

__all__ = ["site_objective"]

Lazy = Union[Callable[[], Any], Any]


def _value(lazy: Lazy) -> Any:
    return lazy() if callable(lazy) and not isinstance(lazy, nn.Module) else lazy


def _is_empty(loader: Iterable | None) -> bool:
    if loader is None:
        return True
    try:
        return len(loader) == 0  # type: ignore[arg-type]
    except TypeError:  # an iterable without a length: let the objective find out
        return False


def site_objective(
    options: MethodOptions | Mapping[str, Any] | None,
    forget_classes: Sequence[int],
    num_classes: int,
    teacher: Lazy = None,
    forget_loader: Lazy = None,
    seed: int = 0,
) -> UnlearningObjective | None:
    """This site's objective for one training round, or None when the task names no method or no forget class
    (pretraining, retraining from scratch: plain cross-entropy).

    ``teacher``: the original model, or a callable building it (called only when the method distils).
    ``forget_loader``: batches of this site's forget-class images, or a callable giving them (called only when the
    method uses them); None or empty: the site holds none, so it trains on the retained term alone
    (``MethodOptions.without_forget_data``) and its report says so.
    """
    forget = sorted(int(c) for c in forget_classes)
    if options is None or not forget:
        return None
    opts = MethodOptions.from_dict(options).resolved()
    loader = None
    if opts.needs_forget_data:
        loader = _value(forget_loader)
        if _is_empty(loader):
            opts, loader = opts.without_forget_data(), None
    model = _value(teacher) if opts.needs_teacher else None
    return UnlearningObjective(opts, forget, num_classes, teacher=model, forget_loader=loader, seed=seed)
