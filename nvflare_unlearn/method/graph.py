"""The model's structure as torch-pruning sees it: which Conv2d output channels are tied, and which cannot go.

Every structural question (coupled groups, what a group removes, conv widths) goes through torch-pruning's
``DependencyGraph``; nothing here knows any particular architecture. ``analyse_structure`` also decides which
channels cannot be removed safely (grouped convs, the model's outputs, shared weights, ...) and says why, and checks
its answer by removing one channel of every group from a copy and running it (eval and train mode): a group that
breaks the copy is excluded too, so a plan never produces a broken model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn as nn
import torch_pruning as tp

from nvflare_unlearn.models.registry import INPUT_SHAPE_ATTR, example_input

if TYPE_CHECKING:
    from nvflare_unlearn.method.plan import PruningPlan


def resolve_example_inputs(model: nn.Module, example_inputs: torch.Tensor | None, plan: PruningPlan | None = None):
    """Example batch for tracing, on the model's device: explicit > the model's registry shape > the plan's shape."""
    if example_inputs is not None:
        if not isinstance(example_inputs, torch.Tensor):
            raise ValueError(f"example_inputs must be a tensor batch, got {type(example_inputs).__name__}")
        x = example_inputs
    elif getattr(model, INPUT_SHAPE_ATTR, None) is None and plan is not None and plan.input_shape:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((1, *plan.input_shape), generator=gen)
    else:
        x = example_input(model)
    first = next(model.parameters(), None)
    return x.to(first.device) if first is not None else x


def build_dependency_graph(model: nn.Module, example_inputs: torch.Tensor, train: bool = False) -> tp.DependencyGraph:
    """Trace ``model`` itself (not a copy) in eval mode with autograd on; restores every module's train flag.

    Tracing in train mode would update BatchNorm running statistics (``train=True`` does it: for copies only, to
    see the layers a model uses only in training), and torch-pruning needs autograd.
    """
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    x = example_inputs.detach().to(device)
    if x.shape[0] == 1:  # a batch of one makes size-1 dimensions ambiguous to the tracer (a flatten read as unbind)
        x = _trial_batch(x)
    x = x.clone().requires_grad_(True)
    modes = {m: m.training for m in model.modules()}
    forward = (lambda m, inputs: m.train()(inputs)) if train else None
    try:
        model.eval()
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=x, forward_fn=forward, verbose=False)
    except Exception as exc:  # noqa: BLE001 - torch-pruning fails in many ways on graphs it cannot follow
        raise ValueError(
            f"torch-pruning cannot trace {type(model).__name__} with an input of shape {tuple(x.shape)} "
            f"({type(exc).__name__}: {exc}); its channels cannot be pruned"
        ) from exc
    finally:
        for m, training in modes.items():
            m.train(training)


def conv_modules(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def is_depthwise(module: nn.Module) -> bool:
    """One filter per channel (groups == in == out): torch-pruning removes its input and output channels together."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def group_members(dg: tp.DependencyGraph, group: Any, names: Mapping[nn.Module, str]) -> list[str]:
    """Conv2d whose output channels a torch-pruning group removes (a depthwise conv's count as its outputs)."""
    return [
        names[dep.target.module]
        for dep, _ in group
        if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, nn.Conv2d)
    ]


def group_problem(
    dg: tp.DependencyGraph, group: Any, names: Mapping[nn.Module, str], calls: Mapping[nn.Module, int] | None = None
) -> str | None:
    """Why removing this group's channels would break the model or change what it computes elsewhere, or None.

    The rules are about layer types torch-pruning handles only partly, never about an architecture: the model's
    outputs (class scores) must keep their width; a grouped conv (1 < groups, not depthwise) must keep equal channels
    per group, which torch-pruning's channel removal does not; a depthwise conv on the model input would need input
    channels removed; GroupNorm must keep its channels divisible by its groups; a layer called several times per
    forward (shared weights) is traced once per call.
    """
    for dep, _ in group:
        node, module = dep.target, dep.target.module
        name = names.get(module, getattr(node, "name", "?"))
        if dg.is_out_channel_pruning_fn(dep.handler) and not node.outputs:
            return "they are channels of the model's output (e.g. the class scores)"
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            if not is_depthwise(module):
                return (
                    f"they feed or come from grouped conv {name!r} (groups={module.groups}, {module.in_channels} -> "
                    f"{module.out_channels} channels): channel removal cannot keep its channels per group equal"
                )
            if not node.inputs:
                return f"depthwise conv {name!r} reads the model input, whose channels cannot be removed"
        if isinstance(module, nn.GroupNorm) and module.num_groups > 1:
            return f"they pass through GroupNorm {name!r}, whose {module.num_groups} groups need equal channel counts"
        if calls is not None and isinstance(module, nn.Module) and calls.get(module, 1) > 1:
            return f"{name!r} is called {calls[module]} times per forward (shared weights)"
    return None


@dataclass
class Structure:
    """What a model's conv channels allow: coupled groups (first member = key) and the convs left out, with why."""

    groups: list[list[str]] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)


def _with_params(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def _call_counts(model: nn.Module, x: torch.Tensor) -> dict[nn.Module, int]:
    """How often one eval forward calls each module that holds parameters (0: not used, > 1: shared weights)."""
    counts = {m: 0 for m in _with_params(model)}

    def hook(module: nn.Module, _args: Any, _out: Any) -> None:
        counts[module] += 1

    handles = [m.register_forward_hook(hook) for m in counts]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    return counts


def _shapes(out: Any) -> Any:
    """The structure of a forward's output with every tensor replaced by its shape."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, Mapping):
        return {k: _shapes(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out).__name__, [_shapes(v) for v in out]
    return type(out).__name__


def output_shapes(model: nn.Module, x: torch.Tensor, train: bool = False) -> Any:
    """Output shapes of one forward without gradients; ``train=True`` runs train mode on the model as given (use a
    copy: BatchNorm statistics move) with the RNG state restored after (dropout draws from it)."""
    modes = {m: m.training for m in model.modules()}
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    try:
        model.train(train)
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            return _shapes(model(x))
    finally:
        for m, training in modes.items():
            m.train(training)


def _trial_batch(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:1], -x[:1]])  # two different samples: train-mode BatchNorm needs more than one value


def _reference(model: nn.Module, xb: torch.Tensor) -> tuple[Any, Any]:
    """Eval and train output shapes of the unpruned model (train is None where train mode does not run at all)."""
    evaluated = output_shapes(model, xb)
    try:
        trained = output_shapes(copy.deepcopy(model), xb, train=True)
    except Exception:  # noqa: BLE001 - a model that cannot run in train mode here is checked in eval mode only
        trained = None
    return evaluated, trained


def _trial(clone: nn.Module, dg: tp.DependencyGraph, keys: list[str], xb: torch.Tensor, ref: tuple[Any, Any]):
    """Remove one channel of each group keyed in ``keys`` from ``clone`` (traced as ``dg``) and run it: None if the
    clone still runs with the same output shapes in eval and train mode, else what went wrong."""
    convs = conv_modules(clone)
    mode = "eval"
    try:
        for key in keys:
            dg.get_pruning_group(convs[key], tp.prune_conv_out_channels, [convs[key].out_channels - 1]).prune()
        evaluated = output_shapes(clone, xb)
        mode = "train"
        trained = output_shapes(clone, xb, train=True) if ref[1] is not None else None
    except Exception as exc:  # noqa: BLE001 - any failure of the pruned copy is the answer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return f"removing one of their channels breaks the forward pass in {mode} mode ({type(exc).__name__}: {first})"
    if evaluated != ref[0]:
        return f"removing one of their channels changes the model's output shapes ({ref[0]} -> {evaluated})"
    if trained != ref[1]:
        return f"removing one of their channels changes the model's output shapes in train mode ({ref[1]} -> {trained})"
    return None


def _breaking(model: nn.Module, x: torch.Tensor, keys: list[str], xb: torch.Tensor, ref) -> dict[str, str]:
    """Group keys whose trial removal breaks a fresh copy (bisection: one trace per half that fails)."""
    clone = copy.deepcopy(model)
    problem = _trial(clone, build_dependency_graph(clone, x), keys, xb, ref)
    if problem is None:
        return {}
    if len(keys) == 1:
        return {keys[0]: problem}
    half = len(keys) // 2
    found = {**_breaking(model, x, keys[:half], xb, ref), **_breaking(model, x, keys[half:], xb, ref)}
    if not found:
        raise ValueError(f"pruning the model's conv groups together breaks it although each half works: {problem}")
    return found


def _train_only_layers(model: nn.Module, x: torch.Tensor, unused: set[str]):
    """conv name -> None, or the reason its group cannot go: it also feeds a layer the model runs only in train mode
    (an auxiliary head), which the eval-mode trace does not see. Traced in train mode on a copy, only if needed."""
    if not unused:
        return lambda name: None
    clone = copy.deepcopy(model)
    try:
        dg = build_dependency_graph(clone, _trial_batch(x), train=True)
    except Exception:  # noqa: BLE001 - no train-mode trace: the trial removal still checks train mode
        return lambda name: None
    convs, names = conv_modules(clone), {m: n for n, m in clone.named_modules()}

    def check(name: str) -> str | None:
        conv = convs[name]
        if conv not in dg.module2node:
            return None
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)))
        hit = sorted({names[d.target.module] for d, _ in group if names.get(d.target.module) in unused})
        return f"they also feed {hit} that run only in train mode (e.g. an auxiliary head)" if hit else None

    return check


def analyse_structure(model: nn.Module, example_inputs: torch.Tensor | None = None) -> Structure:
    """Coupled groups of Conv2d names (model order) and the convs whose channels are excluded, with the reason.

    ``model`` is not modified (traced and trial-pruned on copies).
    """
    convs = conv_modules(model)
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer: there are no channels to prune")
    x = resolve_example_inputs(model, example_inputs)
    clone = copy.deepcopy(model)
    calls = _call_counts(clone, x)
    dg = build_dependency_graph(clone, x)
    clone_convs = conv_modules(clone)
    order = {name: i for i, name in enumerate(clone_convs)}
    names = {m: n for n, m in clone.named_modules()}
    train_only = _train_only_layers(model, x, {names[m] for m, c in calls.items() if c == 0})
    out = Structure()
    seen: set[str] = set()
    for name, conv in clone_convs.items():
        if name in seen:
            continue
        if conv not in dg.module2node:
            seen.add(name)
            out.excluded[name] = "not used by the eval-mode forward pass (e.g. an auxiliary head used only in training)"
            continue
        g = dg.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)))
        members = sorted(set(group_members(dg, g, names)) | {name}, key=order.__getitem__)
        seen.update(members)
        problem = group_problem(dg, g, names, calls) or train_only(name)
        widths = sorted({clone_convs[m].out_channels for m in members})
        if problem is None and len(widths) != 1:
            problem = f"the coupled convs {members} have different widths {widths}"
        if problem is not None:
            out.excluded.update({m: problem for m in members})
            continue
        out.groups.append(members)
    if out.groups:
        xb = _trial_batch(x)
        ref = _reference(model, xb)
        keys = [g[0] for g in out.groups]
        if _trial(clone, dg, keys, xb, ref) is not None:
            broken = _breaking(model, x, keys, xb, ref)
            for g in [g for g in out.groups if g[0] in broken]:
                out.excluded.update({m: broken[g[0]] for m in g})
            out.groups = [g for g in out.groups if g[0] not in broken]
    out.excluded = {n: out.excluded[n] for n in convs if n in out.excluded}  # model order
    return out


def coupled_groups(model: nn.Module, example_inputs: torch.Tensor | None = None) -> list[list[str]]:
    """Groups of Conv2d names whose output channels are tied and can be removed, in model order (traced on a copy)."""
    return analyse_structure(model, example_inputs).groups


def conv_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d by ``named_modules()`` name: the shapes a valid activation report has."""
    return {name: int(m.out_channels) for name, m in conv_modules(model).items()}
