"""The way back into the user's pipeline: the unlearned model without the plugin, or as an ordinary nn.Module.

- ``export_checkpoint`` / ``export_model`` write a ``torch.export`` program (``.pt2``; ONNX as an option) that plain
  torch loads (``torch.export.load(path).module()``) with nothing of nvflare_unlearn installed, and check before
  keeping the file that the program gives the model's own outputs.
- ``UnlearnedModel`` is the pruned model as an ``nn.Module`` built from JSON arguments (the checkpoint's path, or
  model name + number of classes + plan): what NVFlare's stock ``FedAvgRecipe(model=...)`` and
  ``PTFileModelPersistor`` instantiate to continue federated training, and what a user's Client API script builds.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from nvflare_unlearn._validation import check_choice
from nvflare_unlearn.method.checkpoint import load_checkpoint
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.method.prune import _clear_masks, apply_pruning_plan, enforce_masks
from nvflare_unlearn.models.registry import build_model, example_input
from nvflare_unlearn.options import EXPORT_FORMATS, PRUNE_MODES

__all__ = ["UnlearnedModel", "export_checkpoint", "export_model"]


def _read_plan(plan: str | Mapping[str, Any] | None) -> PruningPlan | None:
    """A plan given as JSON text, a dict, or the path of a ``pruning_plan.json``."""
    if plan is None or isinstance(plan, PruningPlan):
        return plan
    if isinstance(plan, Mapping):
        return PruningPlan.from_dict(plan)
    if isinstance(plan, str):
        if plan.lstrip().startswith("{"):
            return PruningPlan.from_json(plan)
        if not os.path.isfile(plan):
            raise ValueError(f"plan {plan!r} is neither JSON text nor an existing pruning_plan.json file")
        with open(plan, encoding="utf-8") as fh:
            return PruningPlan.from_json(fh.read())
    raise ValueError(f"plan must be JSON text, a dict or a file path, got {type(plan).__name__}")


class UnlearnedModel(nn.Module):
    """The unlearned model as a plain ``nn.Module`` whose constructor takes JSON values only.

    Either ``ckpt`` (an nvflare_unlearn checkpoint such as ``unlearned_model.pt``: architecture, plan and weights),
    or ``model_name`` + ``num_classes`` (+ ``in_channels``) + ``plan`` (JSON text, dict, or the path of the job's
    ``pruning_plan.json``): the pruned architecture with fresh weights, for sites that receive the weights from the
    server. ``model_name`` / ``num_classes`` given with ``ckpt`` must match it. The layers live under ``net``
    (state_dict keys ``net.<layer>``); every process building this class builds the same keys and shapes.
    """

    def __init__(
        self,
        ckpt: str | None = None,
        model_name: str | None = None,
        num_classes: int | None = None,
        plan: str | dict | None = None,
        in_channels: int | None = None,
        prune_mode: str = "remove",
    ) -> None:
        super().__init__()
        # Stored under the argument names: NVFlare's job export serializes a component from them.
        self.ckpt, self.model_name, self.num_classes = ckpt, model_name, num_classes
        self.plan, self.in_channels, self.prune_mode = plan, in_channels, prune_mode
        if ckpt is not None:
            if plan is not None:
                raise ValueError("give either ckpt (which holds its plan) or plan with model_name, not both")
            net, pruning_plan, _meta = load_checkpoint(ckpt, model_name, num_classes, in_channels)
        else:
            if model_name is None or num_classes is None:
                raise ValueError("UnlearnedModel needs ckpt=..., or model_name=... and num_classes=... (and plan=...)")
            check_choice(prune_mode, "prune_mode", PRUNE_MODES)
            net = build_model(model_name, num_classes, in_channels=in_channels)
            pruning_plan = _read_plan(plan)
            if pruning_plan is not None:
                apply_pruning_plan(net, pruning_plan, mode=prune_mode)
        self.net = net
        self._pruning_plan = pruning_plan

    @property
    def pruning_plan(self) -> PruningPlan | None:
        return self._pruning_plan

    @property
    def forget_classes(self) -> list[int]:
        """The classes the model was made to forget (continue training without them, or they come back)."""
        return [c for c in (self._pruning_plan.forget_classes if self._pruning_plan else []) if c is not None]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        enforce_masks(self.net)  # mask mode: pruned channels stay at zero whatever arrives
        return out

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x)


def _outputs(module: Any, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _max_diff(a: list[torch.Tensor], b: list[Any]) -> float:
    if len(a) != len(b):
        raise ValueError(f"the exported program returns {len(b)} outputs, the model {len(a)}")
    worst = 0.0
    for x, y in zip(a, b):
        y = torch.as_tensor(y)
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(f"the exported program's output has shape {tuple(y.shape)}, the model's {tuple(x.shape)}")
        worst = max(worst, float((x.float() - y.float()).abs().max()) if x.numel() else 0.0)
    return worst


def _program(model: nn.Module, x: torch.Tensor) -> tuple[Any, bool]:
    """``torch.export`` of ``model`` with a dynamic batch dimension where the model allows one, else batch fixed."""
    try:
        return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)), True
    except Exception:  # noqa: BLE001 - some models fix their batch size (e.g. a hard-coded view)
        return torch.export.export(model, (x,)), False


def _write_onnx(program: Any, path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ValueError(
            "ONNX export needs the packages onnx and onnxscript: pip install 'nvflare-unlearn[onnx]' "
            "(or use the default format pt2, which needs nothing but torch)"
        ) from None
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    onnx_program.save(str(path))


def _run_onnx(path: Path, x: torch.Tensor) -> list[Any]:
    """Run the ONNX file with onnxruntime if installed, else onnx's reference evaluator (pure Python, offline)."""
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator

        graph = onnx.load(str(path))
        return ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.numpy()})


def export_model(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    example_inputs: torch.Tensor | None = None,
    fmt: str = "pt2",
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Write ``model`` (eval mode) as a ``torch.export`` program (``fmt="pt2"``) or ONNX file at ``out``.

    ``model`` is not changed. The file is written next to ``out`` first, loaded back and run on a batch other than
    the tracing one; only if its outputs match the model's (max difference <= ``tolerance`` x the outputs' scale)
    is it moved to ``out``. Refuses an existing ``out`` (FileExistsError). Returns what was written and checked.
    """
    check_choice(fmt, "format", EXPORT_FORMATS)
    out = Path(out)
    if out.suffix != f".{fmt}":
        raise ValueError(f"a {fmt} export is written to a file ending in .{fmt}, got {str(out)!r}")
    if out.exists():
        raise FileExistsError(f"{out} already exists; exports never overwrite a file: choose a new path")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"directory {out.parent} does not exist")
    net = copy.deepcopy(model).cpu().eval()
    _clear_masks(net)  # a masked model's weights are already zero; its hooks would put Python control flow in
    if example_inputs is None:
        example_inputs = example_input(net, 2)  # 2: a batch of one would fix the batch size
    x = example_inputs.detach().cpu()
    program, dynamic = _program(net, x)
    check = torch.randn((3 if dynamic else x.shape[0], *x.shape[1:]), generator=torch.Generator().manual_seed(1))
    expected = _outputs(net, check)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}{out.suffix}")  # same folder: os.replace is atomic
    try:
        if fmt == "pt2":
            torch.export.save(program, str(tmp))
            got = _outputs(torch.export.load(str(tmp)).module(), check)
        else:
            _write_onnx(program, tmp)
            got = _run_onnx(tmp, check)
        diff = _max_diff(expected, got)
        scale = max(float(t.abs().max()) for t in expected if t.numel()) or 1.0
        if diff > tolerance * scale:
            raise ValueError(f"the exported program's outputs differ from the model's by {diff:.3g}: not written")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {
        "path": str(out),
        "format": fmt,
        "input_shape": list(x.shape[1:]),
        "dynamic_batch": dynamic,
        "max_abs_diff": diff,
        "params": sum(p.numel() for p in net.parameters()),
        "load_with": (
            f"torch.export.load({str(out)!r}).module()"
            if fmt == "pt2"
            else f"onnxruntime.InferenceSession({str(out)!r})"
        ),
    }


def export_checkpoint(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "pt2",
    model_name: str | None = None,
    num_classes: int | None = None,
    allow_import: Sequence[str] = (),
) -> dict[str, Any]:
    """Export a checkpoint (ours, or a plain state_dict with ``model_name`` + ``num_classes``) with ``export_model``.
    A checkpoint naming its model by import path needs that name as ``model_name`` or its module in
    ``allow_import`` (``load_checkpoint`` never imports a module chosen by a file)."""
    model, plan, meta = load_checkpoint(ckpt, model_name=model_name, num_classes=num_classes, allow_import=allow_import)
    summary = export_model(model, out, fmt=fmt)
    return {
        "checkpoint": str(ckpt),
        "model_name": meta["model_name"],
        "num_classes": meta["num_classes"],
        "prune_mode": meta["prune_mode"],
        "forget_classes": plan.forget_classes if plan is not None else [],
        **summary,
    }
