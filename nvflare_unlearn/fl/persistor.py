"""Server side: a ``ModelPersistor`` for models whose architecture changes during the job.

NVFlare's ``PTFileModelPersistor`` keeps the first model's shapes and rejects a pruned model ("Incoming model
parameter shape mismatch"). This persistor never assumes a shape: the architecture is the registry name plus the
pruning plan carried in the model's meta, and every save writes weights + plan together
(``nvflare_unlearn.method.checkpoint``), so a checkpoint always rebuilds from the model factory alone.

Loads (via ``load_checkpoint``): our checkpoint (weights + plan), a plain ``state_dict`` ``.pt``, or NVFlare's
``FL_global_model.pt`` (``{"model": state_dict, ...}``) from an ordinary FedAvg job; without ``initial_ckpt``
a freshly initialised model (seeded) for training from scratch. Saves into the job's run directory under a new
name; the original checkpoint is never written.

Paths follow NVFlare 2.9's recipes (``nvflare.recipe.utils.prepare_initial_ckpt``): an absolute path is a file on
the server machine; a relative one names a file the job carries in the server app's ``custom/`` folder.
``resume_from`` names a checkpoint an earlier run of the unlearning job saved after a fine-tuning round: it holds
the weights, the plan and the job's state, and the job goes on from the round after it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from nvflare.apis.fl_constant import FLContextKey, WorkspaceConstants
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from torch import nn

from nvflare_unlearn.fl.defs import (
    FINAL_MODEL_FILE,
    META_ORIGINAL_CKPT,
    META_OUTPUT_FILE,
    META_PLAN,
    META_PRUNE_MODE,
    META_RESUME,
)
from nvflare_unlearn.fl.model_state import load_numpy_state, plan_from_meta, rebuild_model, state_to_numpy
from nvflare_unlearn.method.plan import PruningPlan
from nvflare_unlearn.options import PRUNE_MODES


def load_initial_model(
    path: str, model_name: str, num_classes: int, in_channels: Optional[int] = None, prune_mode: str = "remove"
) -> tuple[nn.Module, Optional[PruningPlan]]:
    """(model, plan or None) from any supported checkpoint file; a clear ValueError for anything else."""
    from nvflare_unlearn.method.checkpoint import load_checkpoint

    if not os.path.isfile(path):
        raise ValueError(f"initial checkpoint {path!r} does not exist (give the path as seen by the server)")
    model, plan, meta = load_checkpoint(path, model_name=model_name, num_classes=num_classes, in_channels=in_channels)
    stored_mode = meta.get("prune_mode", "none")
    if plan is not None and plan.steps and stored_mode != prune_mode:
        raise ValueError(
            f"checkpoint {path!r} was pruned in {stored_mode!r} mode but the job uses prune_mode={prune_mode!r}: "
            "keep the mode of the checkpoint"
        )
    return model, plan


def server_path(path: str, fl_ctx: FLContext) -> str:
    """An absolute path as is; a relative one inside the server app's ``custom/`` folder (what the job carried)."""
    if os.path.isabs(path):
        return path
    app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT) or ""
    return os.path.join(app_root, WorkspaceConstants.CUSTOM_FOLDER_NAME, path)


def resume_state(path: str) -> dict:
    """The job state stored in a round checkpoint (``extra["resume"]``); a clear ValueError for any other file."""
    from nvflare_unlearn.method.checkpoint import load_checkpoint

    _model, plan, meta = load_checkpoint(path)
    state = (meta.get("extra") or {}).get("resume")
    if not isinstance(state, dict) or "round" not in state:
        raise ValueError(
            f"{path!r} holds no resumable job state: resume from the unlearned_model.pt (or pruned_model.pt) that an "
            "unlearning job wrote into its run directory"
        )
    if plan is None:
        raise ValueError(f"{path!r} holds no pruning plan: it cannot continue an unlearning job")
    return state


class UnlearningModelPersistor(ModelPersistor):
    def __init__(
        self,
        model_name: str,
        num_classes: int,
        initial_ckpt: Optional[str] = None,
        output_file: str = FINAL_MODEL_FILE,
        prune_mode: str = "remove",
        in_channels: Optional[int] = None,
        seed: int = 0,
        resume_from: Optional[str] = None,
    ):
        """
        Args:
            model_name / num_classes / in_channels: registry architecture (``nvflare_unlearn.build_model``).
            initial_ckpt: checkpoint to start from: absolute = on the server, relative = carried in the server app's
                ``custom/`` folder; None = fresh model from ``seed``.
            output_file: file name in the server's run directory that receives each saved global model.
            prune_mode: how the plan in the meta is replayed when rebuilding ("remove" or "mask").
            resume_from: a round checkpoint of an earlier run of the same unlearning job (same paths rule): its
                weights, plan and job state are loaded instead of ``initial_ckpt``'s weights; ``initial_ckpt`` is still
                hashed for the audit record.
        """
        super().__init__()
        if prune_mode not in PRUNE_MODES:
            raise ValueError(f"prune_mode must be one of {list(PRUNE_MODES)}, got {prune_mode!r}")
        if not output_file or os.path.basename(output_file) != output_file:
            raise ValueError(f"output_file must be a plain file name inside the run directory, got {output_file!r}")
        if resume_from is not None and not initial_ckpt:
            raise ValueError("resume_from needs initial_ckpt (the original model the audit record names)")
        self.model_name = model_name
        self.num_classes = num_classes
        self.initial_ckpt = initial_ckpt
        self.output_file = output_file
        self.prune_mode = prune_mode
        self.in_channels = in_channels
        self.seed = seed
        self.resume_from = resume_from
        self.saved_path: Optional[str] = None
        self._protected: list[str] = []  # files this persistor must never write (the original, the resume source)

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        from nvflare_unlearn.protect.record import sha256_file

        plan = None
        meta: dict = {META_PRUNE_MODE: self.prune_mode, META_OUTPUT_FILE: self.output_file}
        if self.initial_ckpt:
            path = os.path.abspath(server_path(self.initial_ckpt, fl_ctx))
            self._protected.append(path)
            meta[META_ORIGINAL_CKPT] = {"path": path, "sha256": sha256_file(path) if os.path.isfile(path) else None}
            if self.resume_from:
                source = os.path.abspath(server_path(self.resume_from, fl_ctx))
                self._protected.append(source)
                if not os.path.isfile(source):
                    raise ValueError(f"resume_from {source!r} does not exist (give the path as seen by the server)")
                model, plan = load_initial_model(
                    source, self.model_name, self.num_classes, self.in_channels, self.prune_mode
                )
                meta[META_RESUME] = {**resume_state(source), "path": source, "sha256": sha256_file(source)}
                self.log_info(fl_ctx, f"resuming from {source} after round {meta[META_RESUME]['round']}")
            else:
                model, plan = load_initial_model(
                    path, self.model_name, self.num_classes, self.in_channels, self.prune_mode
                )
                self.log_info(fl_ctx, f"loaded initial model from {path} (plan: {'yes' if plan else 'no'})")
        else:
            torch.manual_seed(self.seed)
            from nvflare_unlearn.models import build_model

            model = build_model(self.model_name, self.num_classes, in_channels=self.in_channels)
            self.log_info(fl_ctx, f"initialised a fresh {self.model_name} (seed {self.seed})")
        if plan is not None:
            meta[META_PLAN] = plan.to_json()
        return make_model_learnable(weights=state_to_numpy(model), meta_props=meta)

    def save_model(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> None:
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        self.saved_path = self.save_to(os.path.join(run_dir, self.output_file), model_learnable)
        self.log_info(fl_ctx, f"saved global model (weights + plan) to {self.saved_path}")

    def save_to(self, path: str, model_learnable: ModelLearnable) -> str:
        """Write weights + plan (+ the job state to resume from, when the controller attached it) to ``path``
        atomically, replacing an earlier round's file, never the original or the resume source."""
        from nvflare_unlearn.method.checkpoint import save_checkpoint

        protected = list(self._protected)
        if self.initial_ckpt and os.path.isabs(self.initial_ckpt):
            protected.append(self.initial_ckpt)
        if any(os.path.abspath(path) == os.path.abspath(p) for p in protected):
            raise ValueError(f"refusing to overwrite the original checkpoint or the resume source {path!r}")
        meta = model_learnable.get(ModelLearnableKey.META) or {}
        plan = plan_from_meta(meta)  # the model's meta is where the plan enters the persistor: parsed once, here
        mode = meta.get(META_PRUNE_MODE, self.prune_mode)
        model = rebuild_model(self.model_name, self.num_classes, plan, mode, self.in_channels)
        load_numpy_state(model, model_learnable[ModelLearnableKey.WEIGHTS])
        resume = meta.get(META_RESUME)
        extra = {"resume": resume} if isinstance(resume, dict) else None
        save_checkpoint(path, model, plan, self.model_name, self.num_classes, extra=extra, overwrite=True)
        return path


class UnlearnModelPersistor(UnlearningModelPersistor):
    """Deprecated name of ``UnlearningModelPersistor`` (kept for job configs of version 0.1)."""

    def __init__(self, *args, **kwargs):
        import warnings

        warnings.warn("UnlearnModelPersistor is deprecated, use UnlearningModelPersistor", FutureWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
